"""The publisher's invariants, from plain-data events: no etcd, no subprocess.

Events (FullRead, Batch, Ended) are put into a queue as the etcd session
would; the target is a real directory with a real SnapshotWriter. The
publisher runs on its own thread (``Rig.start``; ``Rig.send`` returns once it
has taken and handled everything sent) or, where events must all be queued
before it looks, in the test thread (``Rig.run``). Assertions are on files,
notify calls, Stats and the writer, never on log lines.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Clock, busy_wait, read_tree, snapshot_dirs

from etcd_config_dispenser import publisher as publisher_module
from etcd_config_dispenser.events import Batch, Change, Ended, Event, FullRead
from etcd_config_dispenser.health import Stats
from etcd_config_dispenser.layout import DATA_LINK, POOL_DIR
from etcd_config_dispenser.ledger import BURST_MEMORY
from etcd_config_dispenser.publisher import Publisher, window_closes
from etcd_config_dispenser.snapshot import MAX_SPARES, MOST_SPARES, SnapshotWriter

PREFIX = b"/p/"
WAIT = 2.0  # seconds any one condition may take before the test fails


def put(path: str, value: bytes) -> Change:
    return Change(PREFIX + path.encode(), value)


def delete(path: str) -> Change:
    return Change(PREFIX + path.encode(), None)


def full(revision: int, **files: bytes) -> FullRead:
    """A full read; '__' in a name stands for '/'."""
    return FullRead(
        revision, [(PREFIX + k.replace("__", "/").encode(), v) for k, v in files.items()]
    )


class Inbox(queue.Queue[Event]):
    """The publisher's queue, which also tells when the publisher is back waiting.

    The publisher calls a blocking ``get`` only when it has handled everything
    it took (published it, or decided to wait: --wait, a retry). ``polls``
    counts those calls; ``idle`` holds how many events were taken by then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.taken = 0
        self.idle = -1
        self.polls = 0
        self.changed = threading.Condition()

    def put(self, item: Event, block: bool = True, timeout: float | None = None) -> None:
        self.sent += 1
        super().put(item, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Event:
        if block:
            with self.changed:
                self.idle = self.taken
                self.polls += 1
                self.changed.notify_all()
        item = super().get(block, timeout)
        self.taken += 1
        return item


class Rig:
    """A publisher over a fresh target, with a fake notify that records its calls."""

    def __init__(
        self,
        target: Path,
        clock: Callable[[], float] = time.monotonic,
        grace: float = 0.25,
        wait: tuple[float, float] | None = None,
        check: Callable[[], tuple[int, str]] | None = None,
    ) -> None:
        self.target = target
        self.writer = SnapshotWriter(target, grace=grace, clock=clock)
        assert self.writer.recover() is None
        self.inbox = Inbox()
        self.stats = Stats()
        self.stats.etcd_answered()  # as the session does: etcd is there
        self.notified: list[int] = []  # one entry per call: the inbox's polls by then
        self.publisher = Publisher(
            self.writer,
            self.inbox,
            PREFIX,
            self.notify,
            self.stats,
            wait=wait,
            check=check,
            clock=clock,
        )
        self.thread: threading.Thread | None = None

    def notify(self) -> tuple[str, int] | None:
        self.notified.append(self.inbox.polls)  # called on the publisher's thread
        return ("SIGHUP", 1)

    # -- in the test thread -----------------------------------------------

    def run(self, *events: Event) -> None:
        """Queue ``events`` and Ended, then run the publisher here until it ends."""
        for event in (*events, Ended()):
            self.inbox.put(event)
        self.publisher.run()

    # -- on its own thread ------------------------------------------------

    def start(self) -> Rig:
        self.thread = self.publisher.start()
        return self

    def send(self, *events: Event) -> None:
        """Put ``events`` into the inbox; return once the publisher has handled them."""
        for event in events:
            self.inbox.put(event)
        self.settled()

    def settled(self) -> None:
        """Until the publisher has taken everything sent and is waiting for more."""

        def caught_up() -> bool:
            assert not self.publisher.done.is_set(), "the publisher ended on its own"
            return self.inbox.idle == self.inbox.sent

        with self.inbox.changed:
            assert self.inbox.changed.wait_for(caught_up, WAIT), "the publisher did not catch up"

    def signalled(self, count: int) -> None:
        """Until notify has been called ``count`` times and the publisher is waiting again."""

        def done() -> bool:
            assert not self.publisher.done.is_set(), "the publisher ended on its own"
            return len(self.notified) >= count and self.inbox.polls > self.notified[count - 1]

        with self.inbox.changed:
            assert self.inbox.changed.wait_for(done, WAIT), f"no signal {count} (or no return)"

    def polled(self) -> None:
        """Until the publisher has looked at the clock again (it polls while it waits):
        the second poll from now, since the loop before the first may have read it earlier."""
        with self.inbox.changed:
            seen = self.inbox.polls
            assert self.inbox.changed.wait_for(lambda: self.inbox.polls >= seen + 2, WAIT)

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.inbox.put(Ended())
            self.thread.join(WAIT)
            assert not self.thread.is_alive()

    # -- what there is to see ---------------------------------------------

    @property
    def live(self) -> str:
        return os.readlink(self.target / DATA_LINK)

    def files(self) -> dict[str, bytes]:
        return read_tree(self.target)


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Make a Rig over tmp_path/config; every publisher thread started is stopped."""
    made: list[Rig] = []

    def make(**kwargs: object) -> Rig:
        rig = Rig(tmp_path / "config", **kwargs)  # type: ignore[arg-type]
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.stop()


# 1 -------------------------------------------------------------------------


def test_first_snapshot_is_written_and_not_signalled(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.run(full(7, a=b"A", sub__c=b"C", empty=b""))
    assert rig.publisher.first_sync.is_set()
    assert rig.notified == []
    assert rig.files() == {"a": b"A", "sub/c": b"C", "empty": b""}
    assert rig.live.endswith(".r7")
    assert rig.stats.first_sync and rig.stats.revision == 7 and rig.stats.serving == rig.live
    assert (rig.stats.snapshots, rig.stats.files, rig.stats.signals) == (1, 3, 0)
    assert rig.stats.health()[0] is True


def test_the_child_may_start_before_the_first_snapshot_is_looked_through_again(
    rigs: Callable[..., Rig],
) -> None:
    """The expiries read every value back once more (50 ms at 10,000 keys): bookkeeping,
    done after first_sync lets the child start, not before; and done all the same."""
    rig = rigs()
    seen: list[bool] = []
    update = rig.publisher.expiry.update

    def noting(files: object, changed: object) -> None:
        seen.append(rig.publisher.first_sync.is_set())
        update(files, changed)  # type: ignore[arg-type]

    rig.publisher.expiry.update = noting  # type: ignore[method-assign]
    rig.run(full(7, a=b"A", b=b"B"))
    assert seen == [True]


# 2 -------------------------------------------------------------------------


def test_one_signal_per_published_batch_and_none_without_a_change(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs().start()
    rig.send(full(1, a=b"1"))
    assert rig.notified == []

    rig.send(Batch(2, [put("a", b"2")]))
    assert len(rig.notified) == 1
    assert rig.files() == {"a": b"2"}

    rig.send(Batch(3, [put("b", b"B"), put("sub/c", b"C")]))  # one transaction, two keys
    assert len(rig.notified) == 2
    assert rig.files() == {"a": b"2", "b": b"B", "sub/c": b"C"}

    rig.send(Batch(4, [delete("b")]))
    assert len(rig.notified) == 3
    assert rig.files() == {"a": b"2", "sub/c": b"C"}
    live = rig.live

    rig.send(Batch(5, [put("a", b"2")]))  # the same value again
    rig.send(Batch(6, [delete("nothing-there")]))
    assert len(rig.notified) == 3
    assert rig.live == live
    assert rig.files() == {"a": b"2", "sub/c": b"C"}
    assert (rig.stats.snapshots, rig.stats.signals, rig.stats.revision) == (4, 3, 6)


# 3 -------------------------------------------------------------------------


def test_events_already_queued_become_one_snapshot_and_one_signal(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs()
    rig.run(full(1, a=b"1", b=b"1"))
    rig.run(
        Batch(2, [put("a", b"2")]),
        Batch(3, [put("b", b"3"), put("c", b"3"), delete("a")]),  # one revision: never split
        Batch(4, [put("d/e", b"4")]),
    )
    assert len(rig.notified) == 1
    assert rig.stats.snapshots == 2
    assert rig.live.endswith(".r4")
    assert rig.files() == {"b": b"3", "c": b"3", "d/e": b"4"}


# 4 -------------------------------------------------------------------------


def test_invalid_keys_are_skipped_and_counted_as_a_gauge(rigs: Callable[..., Rig]) -> None:
    rig = rigs().start()
    bad = [(b"/p/..data", b"x"), (b"/p/a//b", b"x")]
    rig.send(FullRead(1, [(b"/p/ok", b"1"), bad[0]]))
    assert rig.files() == {"ok": b"1"}
    assert rig.stats.skipped_keys == 1

    rig.send(FullRead(2, [(b"/p/ok", b"1"), bad[0]]))  # read again: still the one key
    assert rig.stats.skipped_keys == 1

    rig.send(FullRead(3, [(b"/p/ok", b"1"), *bad]))
    assert rig.stats.skipped_keys == 2
    rig.send(FullRead(4, [(b"/p/ok", b"1")]))
    assert rig.stats.skipped_keys == 0
    assert rig.files() == {"ok": b"1"}
    assert sorted(os.listdir(rig.target / DATA_LINK)) == ["ok"]


def test_shadowed_keys_are_skipped_and_counted(rigs: Callable[..., Rig]) -> None:
    rig = rigs().start()
    rig.send(full(1, d=b"file", d__e=b"hidden", x=b"x"))
    assert rig.files() == {"d": b"file", "x": b"x"}
    assert rig.stats.skipped_keys == 1

    rig.send(full(2, d=b"file", d__e=b"hidden", x=b"x"))  # the same again: still one
    assert rig.stats.skipped_keys == 1

    rig.send(Batch(3, [put("x/y", b"hidden too")]))  # from the watch as well
    assert rig.stats.skipped_keys == 2
    assert rig.files() == {"d": b"file", "x": b"x"}

    rig.send(Batch(4, [delete("d")]))  # the shallower key goes: the deeper one appears
    assert rig.stats.skipped_keys == 1
    assert rig.files() == {"d/e": b"hidden", "x": b"x"}


def test_skipped_keys_follows_invalid_keys_from_the_watch(rigs: Callable[..., Rig]) -> None:
    rig = rigs().start()
    rig.send(FullRead(1, [(b"/p/ok", b"1"), (b"/p/..bad", b"x")]))
    assert rig.stats.skipped_keys == 1
    rig.send(Batch(2, [Change(b"/p/..bad", None)]))  # the invalid key is gone
    rig.send(Batch(3, [Change(b"/p/also//bad", b"x")]))  # another one arrives
    # What a full read of the same keys says: exactly one key is skipped now.
    assert rig.stats.skipped_keys == 1
    rig.send(Batch(4, [Change(b"/p/also//bad", None)]))
    assert rig.stats.skipped_keys == 0


# 5 -------------------------------------------------------------------------


def test_failed_publish_keeps_the_old_snapshot_and_is_retried_without_a_resend(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "RETRY_FIRST", 1 / 64)  # polls fast while it waits
    clock = Clock()  # frozen: the retry comes only once the test moves the clock
    rig = rigs(clock=clock).start()
    rig.send(full(1, a=b"1", b=b"1"))
    live = rig.live
    flip = rig.writer._flip
    failures: list[str] = []

    def no_space_once(name: str) -> None:
        if not failures:
            failures.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        flip(name)

    monkeypatch.setattr(rig.writer, "_flip", no_space_once)
    sent = rig.inbox.sent
    rig.send(Batch(2, [put("a", b"2"), delete("b"), put("c", b"2")]))
    assert failures
    assert rig.live == live
    assert rig.files() == {"a": b"1", "b": b"1"}
    assert rig.notified == []
    assert rig.stats.write_failures == 1
    assert rig.stats.write_error
    assert rig.stats.health()[0] is False
    assert rig.writer.ledger.dirty == {"a", "b", "c"}  # owed by the writer

    clock.now += publisher_module.RETRY_FIRST  # the backoff is over
    rig.signalled(1)
    assert rig.inbox.sent == sent + 1  # nothing was sent again
    assert rig.live != live and rig.live.endswith(".r2")
    assert rig.files() == {"a": b"2", "c": b"2"}
    assert len(rig.notified) == 1
    assert rig.stats.write_failures == 1
    assert rig.stats.write_error == ""
    assert rig.stats.health()[0] is True
    assert rig.writer.ledger.dirty == set()


# 6 -------------------------------------------------------------------------


def test_check_failure_puts_the_old_snapshot_back_and_the_next_change_owes_it(
    rigs: Callable[..., Rig],
) -> None:
    answers = [(1, "bad configuration\n"), (0, "")]
    seen: list[tuple[dict[str, bytes], int]] = []
    rig: Rig

    def check() -> tuple[int, str]:
        seen.append((rig.files(), len(rig.notified)))  # what is live while it runs
        return answers.pop(0)

    rig = rigs(check=check).start()
    rig.send(full(1, a=b"1", b=b"1"))
    assert seen == []  # the first snapshot, over an empty target: nothing to go back to
    live = rig.live

    rig.send(Batch(2, [put("a", b"2"), put("n/new", b"2")]))
    assert seen == [({"a": b"2", "b": b"1", "n/new": b"2"}, 0)]  # live, not yet signalled
    assert rig.live == live
    assert rig.files() == {"a": b"1", "b": b"1"}
    assert rig.notified == []
    assert rig.stats.check_failures == 1
    assert rig.stats.revision == 1 and rig.stats.serving == live

    rig.send(Batch(3, [put("b", b"3")]))
    assert len(seen) == 2
    assert rig.files() == {"a": b"2", "b": b"3", "n/new": b"2"}
    assert rig.live.endswith(".r3")
    assert len(rig.notified) == 1
    assert rig.stats.check_failures == 1
    assert rig.stats.revision == 3 and rig.stats.serving == rig.live


def fail_going_back_once(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first flip back to the snapshot live now fails (ENOSPC); the names it failed for."""
    old, flip = rig.live, rig.writer._flip
    failures: list[str] = []

    def cannot_go_back_once(name: str) -> None:
        if name == old and not failures:
            failures.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        flip(name)

    monkeypatch.setattr(rig.writer, "_flip", cannot_go_back_once)
    return failures


def test_check_failure_whose_rollback_fails_still_ends_with_the_old_snapshot(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "RETRY_FIRST", 1 / 64)
    clock = Clock()
    rig = rigs(clock=clock, check=lambda: (1, "rejected")).start()
    rig.send(full(1, a=b"1"))
    old = rig.live
    failures = fail_going_back_once(rig, monkeypatch)
    rig.send(Batch(2, [put("a", b"2")]))
    assert failures  # the check failed, and so did putting r1 back
    assert rig.stats.write_failures == 1

    clock.now += publisher_module.RETRY_FIRST  # the publisher tries again
    busy_wait(lambda: not rig.stats.write_error, timeout=WAIT, step=0.001)
    assert rig.notified == []
    assert rig.files() == {"a": b"1"}
    assert rig.live == old


def test_a_change_that_comes_while_a_put_back_is_owed_is_not_lost(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The put-back is retried first; a change that came meanwhile is published after it."""
    monkeypatch.setattr(publisher_module, "RETRY_FIRST", 1 / 64)
    clock = Clock()
    verdicts = iter([(1, "rejected"), (0, ""), (0, ""), (0, "")])
    rig = rigs(clock=clock, check=lambda: next(verdicts)).start()
    rig.send(full(1, a=b"1", b=b"1"))
    failures = fail_going_back_once(rig, monkeypatch)
    rig.send(Batch(2, [put("a", b"bad")]))  # rejected; putting r1 back fails
    assert failures
    rig.send(Batch(3, [put("b", b"3")]))  # comes before the retry is due
    clock.now += publisher_module.RETRY_FIRST
    busy_wait(lambda: rig.files().get("b") == b"3", timeout=WAIT, step=0.001)
    assert rig.files() == {"a": b"bad", "b": b"3"}  # a passed its check this time


# 7 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "quiet", "most", "closes"),
    [
        (10.0, 10.0, 1.0, 4.0, 11.0),  # one change: quiet after it
        (10.0, 12.0, 1.0, 4.0, 13.0),  # quiet after the last one
        (10.0, 13.0, 1.0, 4.0, 14.0),  # both limits at once
        (10.0, 13.5, 1.0, 4.0, 14.0),  # at the latest most after the first one
        (10.0, 30.0, 1.0, 4.0, 14.0),
        (10.0, 10.0, 5.0, 2.0, 12.0),  # most shorter than quiet: most wins
    ],
)
def test_window_closes(first: float, last: float, quiet: float, most: float, closes: float) -> None:
    assert window_closes(first, last, quiet, most) == closes


def test_wait_coalesces_changes_within_the_window(rigs: Callable[..., Rig]) -> None:
    unit = 1 / 256  # exact in binary: no rounding at the window's edges
    clock = Clock()
    rig = rigs(clock=clock, wait=(4 * unit, 16 * unit)).start()
    rig.send(full(1, a=b"0"))  # a full read is published at once
    assert rig.stats.snapshots == 1

    # Quiet: changes 3 units apart, then one snapshot 4 units after the last.
    for step, change in enumerate([put("a", b"1"), put("b", b"1"), put("a", b"2")]):
        if step:
            clock.now += 3 * unit
        rig.send(Batch(2 + step, [change]))
        assert rig.stats.snapshots == 1
    clock.now += 3 * unit
    rig.polled()
    assert rig.stats.snapshots == 1 and rig.notified == []
    clock.now += unit
    rig.signalled(1)
    assert len(rig.notified) == 1
    assert rig.stats.snapshots == 2
    assert rig.live.endswith(".r4")
    assert rig.files() == {"a": b"2", "b": b"1"}

    # Most: a change every 3 units never leaves 4 quiet; 16 after the first it is published.
    start = clock.now
    for step in range(6):  # at 0, 3, ..., 15 units
        clock.now = start + 3 * step * unit
        rig.send(Batch(10 + step, [put("c", b"%d" % step)]))
    clock.now = start + 15 * unit + 0.5 * unit
    rig.polled()
    assert len(rig.notified) == 1
    clock.now = start + 16 * unit
    rig.signalled(2)
    assert rig.stats.snapshots == 3
    assert rig.files() == {"a": b"2", "b": b"1", "c": b"5"}


# 8 -------------------------------------------------------------------------


def test_full_read_equal_to_the_current_state_publishes_nothing(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs().start()
    rig.send(full(1, a=b"1", sub__b=b"1"))
    rig.send(Batch(2, [put("a", b"2"), put("c", b"2")]))
    assert len(rig.notified) == 1
    live = rig.live

    rig.send(full(5, a=b"2", sub__b=b"1", c=b"2"))  # a reconnect: everything read again
    assert len(rig.notified) == 1
    assert rig.live == live
    assert rig.stats.snapshots == 2
    assert rig.stats.revision == 5 and rig.stats.serving == live
    assert rig.files() == {"a": b"2", "sub/b": b"1", "c": b"2"}

    rig.send(full(6, a=b"2", c=b"2"))  # a key deleted while away: that is a change
    assert len(rig.notified) == 2
    assert rig.files() == {"a": b"2", "c": b"2"}


# 9 -------------------------------------------------------------------------


def stale_files(target: Path, current: dict[str, bytes]) -> list[str]:
    """Every file under the target, in every directory (snapshots, the pool), whose
    content is not the current value of its key: empty pool files are fine."""
    stale = []
    for root, _dirs, names in os.walk(target):
        rel_root = Path(root).relative_to(target)
        if rel_root == Path("."):
            continue  # only the top-level links, which lead into ..data
        top, *rest = rel_root.parts
        for name in names:
            content = (Path(root) / name).read_bytes()
            if top == POOL_DIR:
                ok = content == b""
            else:
                ok = current.get("/".join([*rest, name])) == content
            if not ok:
                stale.append(str(rel_root / name))
    return stale


def test_housekeeping_leaves_no_old_value_and_few_snapshots(rigs: Callable[..., Rig]) -> None:
    clock = Clock()  # the grace period is over when the test says so
    grace = 1 / 16  # exact in binary: no rounding at its end
    rig = rigs(clock=clock, grace=grace).start()
    current = {"a": b"a-0", "d/e": b"e-0", "gone": b"g-0"}
    rig.send(full(1, a=b"a-0", d__e=b"e-0", gone=b"g-0"))
    changes = [
        [put("a", b"a-1")],
        [put("d/e", b"e-2"), put("new", b"n-2")],
        [delete("gone")],
        [put("a", b"a-4"), delete("d/e")],
        [put("d", b"d-5")],
        [put("a", b"a-6"), put("new", b"n-6")],
        [delete("d"), put("x/y/z", b"z-7")],
    ]
    for revision, batch in enumerate(changes, start=2):
        rig.send(Batch(revision, batch))
        for change in batch:
            path = change.key[len(PREFIX) :].decode()
            if change.value is None:
                current.pop(path)
            else:
                current[path] = change.value
        assert rig.files() == current
    assert len(rig.notified) == len(changes)
    # Within the grace period the old snapshots stay as readers last saw them.
    assert stale_files(rig.target, current)
    assert len(snapshot_dirs(rig.target)) > 1 + MAX_SPARES

    clock.now += grace

    def clean(spares: int) -> Callable[[], bool]:
        def done() -> bool:
            try:
                stale = stale_files(rig.target, current)
                return not stale and len(snapshot_dirs(rig.target)) <= 1 + spares
            except FileNotFoundError:  # removed while looked at: not done yet
                return False

        return done

    # The changes came at one instant: the burst grew the rotation, which is kept (up
    # to date: no old value in it) until no burst has come for BURST_MEMORY.
    assert rig.writer.ledger.wanted > MAX_SPARES
    busy_wait(clean(MOST_SPARES), timeout=WAIT, step=0.002)
    clock.now += BURST_MEMORY
    rig.send(Batch(len(changes) + 2, []))  # wakes it (it waits in real seconds)
    busy_wait(clean(MAX_SPARES), timeout=WAIT, step=0.002)
    rig.stop()  # nothing moves any more: look once again
    assert stale_files(rig.target, current) == []
    assert len(snapshot_dirs(rig.target)) <= 1 + MAX_SPARES
    assert sorted(rig.writer.kept_dirs) == snapshot_dirs(rig.target)
    assert rig.files() == current
