"""The file side of the flow: etcd events -> key rules -> snapshot writer -> signal.

Runs in its own thread and consumes what the etcd session puts in its
inbox. Events already waiting when a snapshot starts are applied together,
as one snapshot (a revision is never split; several may be coalesced), so a
burst does not signal the child hundreds of times. A snapshot that cannot be
written is the target's problem, not etcd's: it is retried with backoff from
the key tree it already has, and the etcd session is left alone.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from . import certs
from .events import Ended, Event, FullRead
from .health import Stats
from .intake import KeyIntake
from .keys import show
from .logs import fields, output_tail
from .rules import KeySelection
from .snapshot import Published, SnapshotWriter, max_key_path
from .values import readable

log = logging.getLogger(__name__)

HOUR, DAY = 3600.0, 86400.0
GATE_RECHECK = 5.0  # seconds between looks at a refused certificate, changes or not
# After each change made live: (revision, every file, paths written, paths removed).
Listener = Callable[[int, Mapping[str, bytes], list[str], list[str]], None]
RETRY_FIRST, RETRY_MAX = 0.1, 10.0  # seconds between tries to write the target
# Seconds of making a spare between two looks at the inbox: a change that comes
# meanwhile waits at most about this long (plus one step of links).
HOUSEKEEPING_STEP = 0.0002
ONCE_WRITE_ATTEMPTS = 3  # --once gives up writing the target after this many tries


def window_closes(first_at: float, last_at: float, quiet: float, most: float) -> float:
    """--wait (consul-template's ``wait``): when changes that came at ``first_at`` ..
    ``last_at`` are published: ``quiet`` after the last one, at the latest ``most``
    after the first one."""
    return min(last_at + quiet, first_at + most)


def retry_delay(failures: int, most: float = RETRY_MAX) -> float:
    """Backoff between tries to write the target: doubling from RETRY_FIRST, capped."""
    return float(min(most, RETRY_FIRST * 2 ** max(0, failures - 1)))


@dataclass(frozen=True)
class Rules:
    """What a snapshot must pass besides the key rules, and who hears of each one."""

    selection: KeySelection | None = None  # --include, --exclude
    required: Collection[str] = ()  # --require
    listeners: Sequence[Listener] = ()  # --on-change, --status-prefix
    verify_certs: bool = False
    expiry_warning: float = 14 * DAY
    verify_tls: Callable[[Mapping[str, bytes], int], str | None] | None = None
    rollback_on_failure: bool = False
    reread: Callable[[], None] = lambda: None  # etcd is asked for everything again


class RequiredKeys:
    """--require: no snapshot without these paths. Not only none at the start: a
    certificate deleted by mistake must not take the key nginx needs with it."""

    def __init__(self, paths: Collection[str], stats: Stats) -> None:
        self.paths = frozenset(paths)
        self.stats = stats
        self._missing: frozenset[str] = frozenset()  # as last logged

    def lacking(self, files: Collection[str], revision: int) -> bool:
        """Whether one is missing from ``files``; logged when what is missing changes."""
        missing = frozenset(p for p in self.paths if p not in files)
        if missing != self._missing:
            self._missing = missing
            self.stats.missing_required = sorted(missing)
            if missing:
                log.warning(
                    "r%d: waiting for required keys: %s; %s",
                    revision,
                    ", ".join(show(p) for p in sorted(missing)),
                    self.stats.serving_text(),
                    extra=fields("required_missing", revision=revision),
                )
            else:
                log.info("r%d: every required key is there", revision)
        return bool(missing)


class CertificateGate:
    """--verify-certs: no snapshot in which a certificate a change touched is expired,
    not yet valid, out of chain order or not matched by its key (see ``certs``).
    Checked before the flip, unlike --check: nothing wrong is ever live."""

    def __init__(self, stats: Stats, clock: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self.clock = clock
        # While refused, look again now and then even without a change: a certificate
        # that is not valid yet becomes valid by itself (monotonic, as the publisher's).
        self.recheck_at: float | None = None

    def refuses(self, files: Mapping[str, bytes], changed: Collection[str], revision: int) -> bool:
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        found = certs.refusals(files, changed, now)
        self.recheck_at = time.monotonic() + GATE_RECHECK if found else None
        if not found:
            self.stats.certificate_refused = ""
            return False
        why = "; ".join(f"{show(pair)}: {reason}" for pair, reason in sorted(found.items()))
        if why != self.stats.certificate_refused:  # once per problem, not per retry
            self.stats.certificate_failures += 1
            log.error(
                "r%d: certificate refused, snapshot not published: %s; %s",
                revision,
                why,
                self.stats.serving_text(),
                extra=fields("certificate_refused", revision=revision, error=why),
            )
        self.stats.certificate_refused = why
        return True


class Expiry:
    """The expiry of every delivered certificate, for /metrics, and a warning ahead of it."""

    def __init__(self, stats: Stats, warn_before: float, clock: Callable[[], float] = time.time):
        self.stats = stats
        self.warn_before = warn_before
        self.clock = clock
        self.warned: dict[str, float] = {}  # path -> when it was last warned about

    def warn_due(self, due: float, now: float) -> float:
        """``warn`` once ``now`` (the caller's clock) reaches ``due``; when it is due next."""
        if now < due:
            return due
        self.warn()
        return now + HOUR

    def update(self, files: Mapping[str, bytes], changed: Collection[str]) -> None:
        not_after = dict(self.stats.not_after)  # replaced whole: other threads iterate it
        for path in changed:
            value = readable(files, path)
            when = certs.not_after(value) if value is not None else None
            if when is None:
                not_after.pop(path, None)
            else:
                not_after[path] = when
                self.warned.pop(path, None)
        self.stats.not_after = not_after
        self.warn()

    def warn(self) -> None:
        """Once a day per certificate, while it expires within ``warn_before``."""
        now = self.clock()
        for path, when in sorted(self.stats.not_after.items()):
            if when - now < self.warn_before and now - self.warned.get(path, 0) > DAY:
                self.warned[path] = now
                left = f"in {(when - now) / DAY:.1f} days" if when > now else "already"
                log.warning(
                    "certificate %s expires %s (%s UTC)",
                    show(path),
                    left,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)),
                    extra=fields("certificate_expiring"),
                )


class ReloadProof:
    """--verify-tls after the signal for a change that touched a certificate."""

    def __init__(
        self, verify: Callable[[Mapping[str, bytes], int], str | None], rollback: bool, stats: Stats
    ) -> None:
        self.verify = verify
        self.rollback = rollback  # --rollback-on-failure
        self.stats = stats

    def failed(self, files: Mapping[str, bytes], revision: int, result: Published) -> str | None:
        """Why the child does not serve this change's certificates (logged), or None.

        Checked when the change touched a certificate, and after any change while the
        last check failed (a fix may be elsewhere: an include nginx reads). A change
        that touches none is verified as it stands: ``wait`` counts it."""
        touched = set(result.written) | set(result.removed)
        if not self.stats.reload_failed and not any(
            pair.cert in touched for pair in certs.pairs(touched)
        ):
            self.stats.reload_checked = revision
            return None
        why = self.verify(files, revision)
        self.stats.reload_failed, self.stats.reload_checked = why or "", revision
        if why is not None:
            self.stats.reload_failures += 1
            failed = fields("reload_failed", revision=revision, error=why)
            log.error("r%d: %s", revision, why, extra=failed)
        return why


class Publisher:
    """Keeps the target equal to what etcd said, one snapshot per batch of changes."""

    def __init__(
        self,
        writer: SnapshotWriter,
        inbox: queue.Queue[Event],
        prefix: bytes,
        notify: Callable[[], tuple[str, int] | None],
        stats: Stats,
        once: bool = False,
        wait: tuple[float, float] | None = None,
        check: Callable[[], tuple[int, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rules: Rules | None = None,
    ) -> None:
        self.writer = writer
        self.inbox = inbox
        self.prefix = prefix
        self.notify = notify  # signals the child: (signal name, pid), or None if not sent
        self.stats = stats
        self.once = once
        self.wait = wait  # (quiet, most) seconds, or None: publish every change at once
        self.check = check  # runs once a new snapshot is live; non-zero: put the old one back
        self.clock = clock
        rules = rules or Rules()
        selection, spool_at = rules.selection, writer.target_fd  # values spool in the target
        self.keys = KeyIntake(prefix, max_key_path(writer.target), selection, spool_at)
        self.required = RequiredKeys(rules.required, stats)  # no snapshot without them
        self.listeners = rules.listeners  # told of each change made live: --on-change, status
        self.gate = CertificateGate(stats) if rules.verify_certs else None
        self.expiry = Expiry(stats, rules.expiry_warning)
        verify, rollback = rules.verify_tls, rules.rollback_on_failure
        self.proof = ReloadProof(verify, rollback, stats) if verify else None
        self.reread = rules.reread
        self._rejected: tuple[int, str] | None = None  # --check failed, not yet put back
        self.first_sync = threading.Event()  # a snapshot is live: the child may start
        self.done = threading.Event()  # the thread has ended
        self.first_rejected = False  # --check refused the first snapshot (--once exits 1)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="publisher", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a bug: logged whole; the supervisor sees done and stops
            log.exception("publisher failed")
        finally:
            self.done.set()

    def _run(self) -> None:
        changed: set[str] = set()  # paths absorbed and not yet handed to the writer
        owed: int | None = None  # the revision a publish is owed for
        window: tuple[float, float] | None = None  # --wait: (first, last) change times
        retry_at: float | None = None  # after a failed write
        failures = 0
        housekeeping_at: float | None = None
        event: Event | None = None
        expiry_at = self.clock() + HOUR  # a certificate nearing its end, changed or not
        while True:
            gate_at = self.gate.recheck_at if self.gate else None
            waits = [t for t in (retry_at, housekeeping_at, expiry_at, gate_at) if t is not None]
            if window is not None and self.wait is not None:
                waits.append(window_closes(*window, *self.wait))
            timeout = max(0.0, min(waits) - self.clock()) if waits else None
            events = take(self.inbox, timeout)
            ended = bool(events) and isinstance(events[-1], Ended)
            while events:  # each one dropped once absorbed: a full read's spool goes with it
                event = events.pop(0)
                if isinstance(event, Ended):  # last: what came before it is still published
                    window = None
                    break
                changed = _merged(changed, self.keys.absorb(event))
                self.stats.skipped_keys = self.keys.skipped
                owed = event.revision
                now = self.clock()
                if isinstance(event, FullRead) or self.wait is None:
                    window = None
                else:
                    window = (window[0] if window else now, now)
            event = None
            now = self.clock()
            if window is not None and self.wait is not None:
                if now < window_closes(*window, *self.wait):
                    continue
                window = None
            files = self.keys.tree.files
            if owed is not None and (
                self.required.lacking(files, owed)
                or (self.gate is not None and self.gate.refuses(files, changed, owed))
            ):
                pass  # the changes stay owed: tried again with the next change
            elif owed is not None and (retry_at is None or now >= retry_at):
                try:
                    self._publish(owed, changed)
                except OSError as err:  # SnapshotError, or the target failing us otherwise
                    self.writer.owe(changed)  # what never reached the writer is owed too
                    failures += 1
                    retry_at = now + retry_delay(failures)
                    self.stats.write_failed(str(err))
                    log.error(
                        "r%d: cannot write the target: %s; %s; retrying in %.1fs",
                        owed,
                        err,
                        self.stats.serving_text(),
                        retry_at - now,
                        extra=fields("write_failed", revision=owed, error=err),
                    )
                    if self.once and failures >= ONCE_WRITE_ATTEMPTS:
                        return
                else:
                    failures, retry_at, owed = 0, None, None
                    self.stats.write_ok()
                    if self.once:
                        return
                changed = set()  # the writer owes what it could not serve
                housekeeping_at = self.clock()
            if self.keys.lost():  # a spooled value cannot be read back: etcd has it
                self.reread()
            if ended:
                return
            expiry_at = self.expiry.warn_due(expiry_at, self.clock())
            # Housekeeping when due, and only when no change is waiting: changes first.
            due = housekeeping_at is not None and self.clock() >= housekeeping_at
            if due and self.inbox.empty():
                housekeeping_at = self.writer.maintain(HOUSEKEEPING_STEP)
                if self.keys.spill() or self.keys.tree.unreadable:  # more to move, or a
                    housekeeping_at = self.clock()  # value lost: round again at once

    def _publish(self, revision: int, changed: set[str]) -> None:
        """Make the tree live; --check it; signal the child. Raises SnapshotError."""
        first = not self.first_sync.is_set()
        if self._rejected is not None:  # a rejected change is still live: put it back first
            self._reject(*self._rejected, first)
            if not changed:
                return
            first = not self.first_sync.is_set()
        result = self.writer.publish(self.keys.tree.files, changed, revision)
        if result is None:
            log.debug("r%d: no file changed", revision)
            self.stats.served(revision, self.writer.serving)
            return
        _log_skipped(revision, result.failed)
        # --check, whenever there is a snapshot to go back to (a previous run's too).
        if self.check is not None and self.writer.can_roll_back:
            code, output = self.check()
            if code != 0:
                self.stats.check_failures += 1
                tail = output_tail(output) or "no output"
                self._rejected = (revision, f"--check failed with exit code {code}: {tail}")
                self._reject(*self._rejected, first)
                return
        self.stats.served(revision, result.name, len(self.keys.tree.files) - len(result.failed))
        _log_published(revision, result, len(self.keys.tree.files), first, self.prefix)
        if first:  # the child may start; the rest is bookkeeping (the expiries read
            self.first_sync.set()  # every value again: 50 ms at 10,000 keys)
        self.expiry.update(self.keys.tree.files, [*result.written, *result.removed])
        if first:
            if self.stats.stale_since is not None:  # the child runs on a previous run's files
                self.stats.stale_since = None
                self._signal(revision)
        else:
            self._signal(revision)
            if self._reload_failed(revision, result):
                return
        for listener in self.listeners:
            listener(revision, self.keys.tree.files, result.written, result.removed)
        self.writer.settle()

    def _reload_failed(self, revision: int, result: Published) -> bool:
        """--verify-tls said the child does not serve the change: with
        --rollback-on-failure, the previous snapshot is put back and the child
        signalled again, so that the files match what is served."""
        why = self.proof.failed(self.keys.tree.files, revision, result) if self.proof else None
        if why is None or not self.proof or not self.proof.rollback:
            return False
        self._rejected = (revision, why)
        self._reject(revision, why, first=False, again=True)
        self._signal(revision)
        return True

    def _signal(self, revision: int) -> None:
        sent = self.notify()
        if sent is not None:
            self.stats.signals += 1
            log.info(
                "r%d: sent %s to child pid %d",
                revision,
                *sent,
                extra=fields("signalled", revision=revision, signal=sent[0], pid=sent[1]),
            )

    def _reject(self, revision: int, why: str, first: bool, again: bool = False) -> None:
        """--check failed (or, ``again``, --verify-tls): put the previous snapshot back,
        no signal (``again``: the child is signalled again, after); the writer owes the
        rejected paths to the next change. If even that fails (SnapshotError), the next
        try puts it back before anything else: a rejected change never stays live."""
        previous = self.writer.rollback()
        self._rejected = None
        log.error(
            "r%d: %s; %r is live again%s",
            revision,
            why,
            previous,
            "; signalling the child again" if again else ", no signal",
            extra=fields("rolled_back", revision=revision, error=why),
        )
        live = self.writer.ledger.live
        if live is not None and not first:  # what is served is the previous revision again
            self.stats.served(live.revision, previous)
        if first:  # the child starts (or runs on), with the snapshot that was put back
            self.first_rejected = True
            self.stats.stale_since = None  # etcd answered: what is served is a refusal now
            self.stats.first_sync, self.stats.serving = True, previous
            self.first_sync.set()
        self.writer.settle()


def take(inbox: queue.Queue[Event], timeout: float | None) -> list[Event]:
    """The next event (waiting up to ``timeout``), and every one already queued behind it."""
    try:
        events = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    while not isinstance(events[-1], Ended):
        try:
            events.append(inbox.get_nowait())
        except queue.Empty:
            break
    return events


def _merged(into: set[str], more: set[str]) -> set[str]:
    """``into | more``: ``into`` grown in place, or ``more`` itself when ``into`` is empty
    (after a full read that is every path: not copied at the moment memory peaks)."""
    if not into:
        return more
    into |= more
    return into


def _log_skipped(revision: int, failed: Mapping[str, str]) -> None:
    for path, why in sorted(failed.items()):
        log.warning(
            "r%d: skipping key %s: cannot write it: %s",
            revision,
            show(path),
            why,
            extra=fields("key_skipped", revision=revision, error=why),
        )


def _log_published(
    revision: int, result: Published, files: int, first: bool, prefix: bytes
) -> None:
    if first:
        log.info(
            "r%d: first snapshot live, %d files",
            revision,
            files,
            extra=fields("first_sync", revision=revision, files=files),
        )
        if not files:
            log.warning(
                "r%d: no key under the prefix %r (or none that --include/--exclude take): "
                "is the prefix right?",
                revision,
                prefix.decode(errors="replace"),
            )
        return
    log.info(
        "r%d: wrote %s; removed %s",
        revision,
        _names(result.written),
        _names(result.removed),
        extra=fields(
            "published",
            revision=revision,
            files=files,
            written=result.written,
            removed=result.removed,
        ),
    )


def _names(paths: list[str], most: int = 10) -> str:
    if not paths:
        return "nothing"
    shown = ", ".join(show(p) for p in paths[:most])
    return shown if len(paths) <= most else f"{shown} (+{len(paths) - most} more)"


__all__ = ["Published", "Publisher", "retry_delay", "window_closes"]
