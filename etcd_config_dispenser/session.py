"""The etcd side of the flow: keep a session alive and hand on what etcd says, in order.

Runs in its own thread. Connects, reads the whole prefix (one ``FullRead``),
then follows the watch from the next revision (one ``Batch`` per watch
response), and starts again with backoff and jitter whenever etcd fails. It
knows nothing of files: everything goes into ``inbox`` for the publisher,
which never waits on etcd and is never held up by it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import tenacity

from .events import Ended, Event, FullRead
from .health import Stats
from .logs import fields
from .source import Compacted, EtcdSource, EtcdUnavailable
from .values import kept, open_spool

log = logging.getLogger(__name__)

HEALTHY_AFTER = 10.0  # a watch that lasted this long resets the backoff
# A watch can hang silently: a dead connection (python-etcd3 issue 88), an
# expired auth token (issue 1227), a frozen server. Every LIVENESS_INTERVAL a
# cheap read must answer within LIVENESS_TIMEOUT, or the watch is cut and
# everything is read again: a dead watch is noticed within about 5 s.
LIVENESS_INTERVAL = 3.0
LIVENESS_TIMEOUT = 2.0


class EtcdSession:
    """Keeps one etcd session alive; everything etcd says goes to ``inbox``."""

    def __init__(
        self,
        source: EtcdSource,
        inbox: queue.Queue[Event],
        stats: Stats,
        backoff_max: float = 30.0,
        liveness_interval: float = LIVENESS_INTERVAL,
        sleep: Callable[[float], None] | None = None,
        spool_at: int | None = None,
    ) -> None:
        self.source = source
        self.spool_at = spool_at  # the open directory a full read's values go to: the target
        self.inbox = inbox
        self.stats = stats
        self.backoff_max = backoff_max
        self.liveness_interval = liveness_interval
        self.stopping = threading.Event()
        self.sleep = sleep or self._sleep

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="etcd-session", daemon=True)
        thread.start()
        return thread

    def reread(self) -> None:
        """Read everything again, now (from any thread): a value was lost from its spool
        (see ``values``). The watch is cut, or the next one if none is open (a full read
        already put in the inbox may have been the one the lost value came from); the
        cut is then no failure: not counted, no backoff."""
        self.source.ask_reread()

    def stop(self) -> None:
        self.stopping.set()
        self.source.interrupt()

    def run(self) -> None:
        """Until stopped: each failure logged, then retried (--once: the app stops it)."""
        error: str | None = None
        try:
            while not self.stopping.is_set():
                try:
                    self._retrying()(self._session)
                except EtcdUnavailable:  # only when stopped
                    return
        except Exception:  # a bug: logged whole; the publisher ends, the supervisor stops
            log.exception("etcd session failed")
            error = "etcd session failed"
        finally:
            self.source.close()
            self.inbox.put(Ended(error))

    def _retrying(self) -> tenacity.Retrying:
        stop = tenacity.stop_when_event_set(self.stopping)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(EtcdUnavailable),
            # Exponential with jitter, never above --backoff-max: half of it
            # grows steadily, the other half is random ("equal jitter").
            wait=tenacity.wait_exponential(multiplier=0.1, max=self.backoff_max / 2)
            + tenacity.wait_random_exponential(multiplier=0.1, max=self.backoff_max / 2),
            stop=stop,
            sleep=self.sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake up at once when asked to stop."""
        self.stopping.wait(seconds)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        self.stats.etcd_failed(str(err))
        log.warning(
            "etcd sync failed (attempt %d): %s; %s; retrying in %.1fs",
            state.attempt_number,
            err,
            self.stats.serving_text(),
            delay,
            extra=fields("etcd_failed", error=err),
        )

    def _session(self) -> None:
        """Connect, read everything, then follow the watch until it fails.

        Returns normally (resetting the backoff) after a watch that stayed up
        a while or a compaction; raises when etcd failed straight away.
        """
        if self.stopping.is_set():
            return
        self.source.connect()
        everything = self._read_all()
        revision = everything.revision
        log.info(
            "r%d: connected to %s",
            revision,
            self.source.endpoint,
            extra=fields("connected", revision=revision),
        )
        self.stats.etcd_answered(reconnect=True)
        self.source.take_reread()  # this read answers any request made before it goes out
        self.inbox.put(everything)
        del everything  # the spool goes with its last value: this frame must not hold one
        started = time.monotonic()
        watching = threading.Event()
        threading.Thread(
            target=self._check_liveness, args=(watching,), name="liveness", daemon=True
        ).start()
        try:
            for batch in self.source.watch(revision + 1):
                self.stats.etcd_answered()
                self.inbox.put(batch)
        except Compacted as err:
            log.warning(
                "watch from r%d: %s; reading everything again",
                revision + 1,
                err,
                extra=fields("compacted", revision=revision + 1),
            )
        except EtcdUnavailable as err:
            if self.source.take_reread() and not self.stopping.is_set():  # asked for: no failure
                log.info("r%d: reading everything again", revision, extra=fields("reread"))
                return
            if self.stopping.is_set() or time.monotonic() - started < HEALTHY_AFTER:
                raise
            self.stats.etcd_failed(str(err))
            log.warning(
                "etcd watch failed: %s; reconnecting", err, extra=fields("etcd_failed", error=err)
            )
        finally:
            watching.set()

    def _read_all(self) -> FullRead:
        """Every key, the values spooled (one spool per full read: see ``values``)."""
        spool = open_spool(self.spool_at)
        return FullRead(*self.source.read_all(lambda values: kept(spool, values)))

    def _check_liveness(self, done: threading.Event) -> None:
        """While the watch runs: cut it if etcd stops answering a cheap read."""
        while not done.wait(self.liveness_interval):
            try:
                self.source.probe(LIVENESS_TIMEOUT)
                self.stats.etcd_answered()
            except EtcdUnavailable as err:
                if not done.is_set():
                    log.warning(
                        "etcd liveness check failed: %s; restarting the watch",
                        err,
                        extra=fields("etcd_failed", error=err),
                    )
                    # Only a stream still open: a flag left for the next one would cut
                    # the good watch after the reconnect (a second, needless full read).
                    self.source.interrupt(move_on=True, later=False)
                return
