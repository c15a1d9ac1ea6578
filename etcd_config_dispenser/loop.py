"""The loop that joins them: etcd source -> key rules -> snapshot writer -> signal.

Runs in its own thread. The main thread only supervises the child; this one
only moves data one way, and calls ``notify`` after each flip that changed
files.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import tenacity

from .health import Stats
from .keys import MAX_PATH, InvalidKey, KeyTree, key_to_relpath
from .snapshot import SNAPSHOT_NAME_MAX, SnapshotError, SnapshotWriter
from .source import Batch, Compacted, EtcdSource, EtcdUnavailable

log = logging.getLogger(__name__)

HEALTHY_AFTER = 10.0  # a watch that lasted this long resets the backoff
# A watch can hang silently: a dead connection (python-etcd3 issue 88), an
# expired auth token (issue 1227), a frozen server. Every LIVENESS_INTERVAL a
# cheap read must answer within LIVENESS_TIMEOUT, or the watch is cut and
# everything is read again: a dead watch is noticed within about 5 s.
LIVENESS_INTERVAL = 3.0
LIVENESS_TIMEOUT = 2.0
ONCE_ATTEMPTS = 4  # --once gives up after this many failed reads (about 3 s)


class Dispenser:
    """Keeps the target directory equal to the etcd prefix, one snapshot per change."""

    def __init__(
        self,
        source: EtcdSource,
        writer: SnapshotWriter,
        notify: Callable[[], None],
        backoff_max: float = 30.0,
        once: bool = False,
        liveness_interval: float = LIVENESS_INTERVAL,
        wait: tuple[float, float] | None = None,
        check: Callable[[], tuple[int, str]] | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.source = source
        self.writer = writer
        self.notify = notify
        self.backoff_max = backoff_max
        self.once = once
        self.liveness_interval = liveness_interval
        self.wait = wait  # (quiet, most) seconds, or None: publish every change at once
        self.check = check  # runs once a new snapshot is live; non-zero: put the old one back
        self.stats = stats or Stats()
        self.tree = KeyTree()
        self.revision = 0
        self.first_sync = threading.Event()
        self.stopping = threading.Event()
        self.done = threading.Event()
        self._pending: set[str] = set()
        self.first_rejected = False  # --check refused the first snapshot (--once exits 1)
        target_len = len(os.fsencode(writer.target))
        self.max_path = MAX_PATH - target_len - SNAPSHOT_NAME_MAX - 2

    # -- the thread ---------------------------------------------------------

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="dispenser", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.source.interrupt()

    def run(self) -> None:
        """Sync until stopped; each failure is logged and retried with backoff and jitter."""
        try:
            while not self.stopping.is_set():
                stop: tenacity.stop.stop_base = tenacity.stop_when_event_set(self.stopping)
                if self.once:
                    stop = stop | tenacity.stop_after_attempt(ONCE_ATTEMPTS)
                retrying = tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type((EtcdUnavailable, SnapshotError)),
                    # Exponential with jitter, never above --backoff-max: half of
                    # it grows steadily, the other half is random ("equal jitter").
                    wait=tenacity.wait_exponential(multiplier=0.1, max=self.backoff_max / 2)
                    + tenacity.wait_random_exponential(multiplier=0.1, max=self.backoff_max / 2),
                    stop=stop,
                    sleep=self._sleep,
                    before_sleep=self._log_retry,
                    reraise=True,
                )
                try:
                    retrying(self._session)
                except (EtcdUnavailable, SnapshotError) as err:
                    if not self.stopping.is_set():  # only --once gives up
                        log.error("giving up: %s", err)
                    return
                if self.once and self.first_sync.is_set():
                    return
        except Exception:  # a bug: logged whole; the supervisor sees done and stops
            log.exception("sync loop failed")
        finally:
            self.source.close()
            self.done.set()

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake up at once when asked to stop."""
        self.stopping.wait(seconds)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        serving = f"serving r{self.revision}" if self.first_sync.is_set() else "nothing served yet"
        self.stats.connected = False
        self.stats.last_error = str(err)
        log.warning(
            "etcd sync failed (attempt %d): %s; %s; retrying in %.1fs",
            state.attempt_number,
            err,
            serving,
            delay,
        )

    def _session(self) -> None:
        """Connect, read everything, then follow the watch until it fails.

        Returns normally (resetting the backoff) after a watch that stayed up
        a while or a compaction; raises when etcd failed straight away.
        """
        if self.stopping.is_set():
            return
        self.source.connect()
        revision, kvs = self.source.read_all()
        log.info("r%d: connected to %s", revision, self.source.endpoint)
        self.stats.reconnects += 1 if self.stats.last_ok else 0
        self.stats.alive()
        self._resync(revision, kvs)
        if self.once:
            return
        started = time.monotonic()
        watching = threading.Event()
        watchdog = threading.Thread(
            target=self._check_liveness, args=(watching,), name="liveness", daemon=True
        )
        watchdog.start()
        try:
            batches = self.source.watch(revision + 1)
            if self.wait is None:
                for batch in batches:
                    self._publish(batch.revision, self._absorb(batch), "watch")
            else:
                self._follow_with_wait(batches, *self.wait)
        except Compacted as err:
            log.warning("watch from r%d: %s; reading everything again", self.revision + 1, err)
        except EtcdUnavailable as err:
            if self.stopping.is_set() or time.monotonic() - started < HEALTHY_AFTER:
                raise
            log.warning("etcd watch failed: %s; reconnecting", err)
        finally:
            watching.set()

    def _check_liveness(self, done: threading.Event) -> None:
        """While the watch runs: cut it if etcd stops answering a cheap read."""
        while not done.wait(self.liveness_interval):
            try:
                self.source.check(LIVENESS_TIMEOUT)
                self.stats.alive()
            except EtcdUnavailable as err:
                if not done.is_set():
                    log.warning("etcd liveness check failed: %s; restarting the watch", err)
                    self.source.interrupt(move_on=True)
                return

    # -- one step -----------------------------------------------------------

    def _relpath(self, key: bytes, revision: int) -> str | None:
        try:
            return key_to_relpath(key, self.source.prefix, self.max_path)
        except InvalidKey as err:
            log.warning("r%d: skipping key %r: it %s", revision, key, err)
            self.stats.skipped_keys += 1
            return None

    def _resync(self, revision: int, kvs: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the whole state with a full read; publish only what differs."""
        tree = KeyTree()
        for key, value in kvs:
            path = self._relpath(key, revision)
            if path is not None:
                tree.put(path, value)
        for path, shadow in tree.hidden():
            log.warning("r%d: skipping key %r: %r is a file", revision, path, shadow)
            self.stats.skipped_keys += 1
        old = self.tree.files
        changed = {p for p in old.keys() | tree.files.keys() if old.get(p) != tree.files.get(p)}
        self.tree = tree
        self._publish(revision, changed, "read")

    def _follow_with_wait(self, batches: Iterator[Batch], quiet: float, most: float) -> None:
        """--wait: after a change, wait for ``quiet`` seconds without one (at most
        ``most`` in all), then publish everything that came as one snapshot."""
        inbox: queue.Queue[Batch | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for batch in batches:
                    inbox.put(batch)
                inbox.put(None)
            except BaseException as err:  # handed to the sync thread
                inbox.put(err)

        reader = threading.Thread(target=read, name="watch-reader", daemon=True)
        reader.start()
        changed: set[str] = set()
        try:
            while True:
                item = inbox.get()
                deadline = time.monotonic() + most
                while True:
                    if item is None:
                        raise EtcdUnavailable(f"{self.source.endpoint}: watch stream ended")
                    if isinstance(item, BaseException):
                        raise item
                    changed |= self._absorb(item)
                    revision = item.revision
                    try:
                        timeout = max(0.0, min(quiet, deadline - time.monotonic()))
                        item = inbox.get(timeout=timeout)
                    except queue.Empty:
                        break
                self._publish(revision, changed, "watch")
                changed = set()
        finally:
            # Absorbed but not published: the tree is past them (see _publish).
            self._pending |= changed
            self.source.interrupt(later=False)  # this reader's stream if still open, no other
            reader.join(5.0)

    def _first_sync_done(self) -> None:
        """A snapshot is live: the child may start, /healthz may say ok."""
        self.stats.first_sync = True
        self.first_sync.set()

    def _count_snapshot(self, revision: int) -> None:
        self.stats.revision = revision
        self.stats.snapshots += 1
        self.stats.last_sync = time.time()

    def _checked(self, revision: int, changed: set[str]) -> bool:
        """--check on the snapshot just made live; on failure put the previous one back."""
        assert self.check is not None
        self._pending = set(changed)  # until it passes, they are not served for good
        code, output = self.check()
        if code == 0:
            self._pending = set()
            return True
        tail = " | ".join(output.strip().splitlines()[-5:]) or "no output"
        previous = self.writer.rollback()
        self.stats.check_failures += 1
        log.error(
            "r%d: check failed with exit code %d, %s is live again, no signal: %s",
            revision,
            code,
            previous,
            tail,
        )
        return False

    def _absorb(self, batch: Batch) -> set[str]:
        """Apply one batch to the key tree; return the file paths it changed."""
        changed: set[str] = set()
        for change in batch.changes:
            path = self._relpath(change.key, batch.revision)
            if path is None:
                continue
            if change.value is None:
                changed |= self.tree.delete(path)
            else:
                changed |= self.tree.put(path, change.value)
                shadow = self.tree.shadowing_key(path)
                if shadow is not None:
                    log.warning("r%d: skipping key %r: %r is a file", batch.revision, path, shadow)
                    self.stats.skipped_keys += 1
        return changed

    def _publish(self, revision: int, changed: set[str], how: str) -> None:
        first = not self.first_sync.is_set()
        # Paths of a failed publish stay pending: the tree is already past them.
        changed |= self._pending
        try:
            published = self.writer.publish(self.tree.files, changed, revision)
        except SnapshotError:
            self._pending = changed
            raise
        self._pending = set()
        self.revision = revision
        self.stats.alive()
        if not published:
            log.debug("r%d: %s: no file changed", revision, how)
            return
        # --check, whenever there is a snapshot to go back to: after every change,
        # and at start-up over a snapshot a previous process left.
        checked = self.check is not None and self.writer.can_roll_back
        if checked and not self._checked(revision, changed):
            if first:  # the child starts, with the snapshot that was put back
                self.first_rejected = True
                self._first_sync_done()
            self.writer.finish(prepare=not self.once)
            return
        if first:
            log.info("r%d: %s: first snapshot live, %d files", revision, how, len(self.tree.files))
            self._count_snapshot(revision)
            self._first_sync_done()
        else:
            self._count_snapshot(revision)
            self.notify()
            self.stats.signals += 1
            written = sorted(p for p in changed if p in self.tree.files)
            removed = sorted(p for p in changed if p not in self.tree.files)
            log.info(
                "r%d: %s: wrote %s; removed %s", revision, how, _names(written), _names(removed)
            )
        self.writer.finish(prepare=not self.once)


def _names(paths: list[str], most: int = 10) -> str:
    if not paths:
        return "nothing"
    shown = ", ".join(paths[:most])
    return shown if len(paths) <= most else f"{shown} (+{len(paths) - most} more)"
