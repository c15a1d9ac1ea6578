"""Spares made a few links at a time between changes (spares.SpareMaker.grow) and checked
a step at a time (spares.SpareCheck), and the wait of a change for a spare's shorter
grace: what an adversarial pass broke once, and what someone sharing the target may do
to a spare at any step of its check."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from helpers import Clock, dir_files, read_tree, writer_with
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etcd_config_dispenser import spares
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.layout import DATA_LINK
from etcd_config_dispenser.snapshot import SnapshotWriter


def started(tmp_path: Path, files: int, **kwargs: object) -> tuple[Path, SnapshotWriter, KeyTree]:
    """A writer with ``files`` files live and no spare made yet."""
    target = tmp_path / "config"
    return (target, *writer_with(target, files, **kwargs))


class TickingClock(Clock):
    """Time moves a little at each look, as a real one does; sleeping a negative time
    is refused, as time.sleep refuses it."""

    def __call__(self) -> float:
        self.now += 0.0002
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        self.now += seconds


def test_a_wait_never_sleeps_a_negative_time(tmp_path: Path) -> None:
    """The wait for a spare's grace: its end may fall between any two looks at the
    clock (reading it twice, once to test and once to sleep, made time.sleep raise
    and stopped the publisher)."""
    clock = TickingClock()  # no spare made meanwhile: only the wait reads the clock
    args = {"clock": clock, "sleep": clock.sleep, "most_spares": 2}
    _target, writer, tree = started(tmp_path, 2000, **args)
    writer.maintain()
    for revision in (2, 3):  # back to back: both spares retired just now
        writer.publish(tree.files, tree.put("k0007", b"%d" % revision), revision)
        writer.settle()
    ready_at = writer.ledger.spare_ready_at()
    assert ready_at is not None
    for step in range(1, 40):  # the end, at every phase between two looks
        clock.now = ready_at - step * 0.00005
        assert writer._housekeeper.wait_for_spare(clock.now)
        assert clock.now >= ready_at


def test_a_spare_that_cannot_be_made_is_tried_again_after_the_next_change(
    tmp_path: Path,
) -> None:
    """A live file gone (someone removed it) makes every try fail: no loop of tries,
    each making and deleting a directory, until a change comes."""
    clock = Clock()
    target, writer, tree = started(tmp_path, 100, clock=clock)
    live = os.readlink(target / "..data")
    os.unlink(target / live / "k0050")
    runs = [writer.maintain() for _ in range(5)]  # failed, logged; its directory removed
    assert runs[-2:] == [None, None]  # then nothing is due: not tried again
    assert writer.ledger.spares == [] and writer.ledger.growing is None
    made = sorted(os.listdir(target))
    clock.now += 1
    assert writer.maintain() is None and sorted(os.listdir(target)) == made
    writer.publish(tree.files, tree.put("k0050", b"back"), 2)  # the next change
    writer.settle()
    writer.maintain()
    assert len(writer.ledger.spares) == writer.ledger.wanted  # tried again, and made


def test_a_pool_that_cannot_be_filled_does_not_stop_the_spares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _target, writer, _tree = started(tmp_path, 100)

    def full(target_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._maker, "fill_pool", full)
    writer.maintain()
    assert len(writer.ledger.spares) == writer.ledger.wanted


def test_a_key_deleted_while_a_spare_is_made_leaves_it_at_the_next_step(tmp_path: Path) -> None:
    """A spare being made holds what it linked so far: a deleted key's value must go at
    once, not when the spare is complete (a second at 50,000 keys)."""
    clock = Clock()
    target, writer, tree = started(tmp_path, 500, clock=clock)
    writer.maintain(step=0.0)
    growing = writer.ledger.growing
    assert growing is not None
    linked = sorted(dir_files(target / growing.name))
    assert 0 < len(linked) < 500
    secret, changed = linked[0], sorted(linked)[1]
    writer.publish(tree.files, tree.delete(secret) | tree.put(changed, b"new"), 2)
    writer.settle()
    writer.maintain(step=0.0)  # the next step
    assert writer.ledger.growing is growing  # not complete yet
    held = dir_files(target / growing.name)
    assert secret not in held
    assert held.get(changed, b"new") == b"new"  # the old value gone too
    while writer.ledger.growing is not None:
        writer.maintain(step=0.0)
    clock.now += 1
    writer.publish(tree.files, tree.put("k0001", b"x"), 3)
    assert read_tree(target) == tree.files


def checked_spare(target: Path, writer: SnapshotWriter) -> Path:
    """Run housekeeping a step at a time until the spare being made is linked whole and
    its check has begun; the spare."""
    maker = writer._housekeeper.spares
    while maker.checking is None:
        writer.maintain(step=0.0)
    growing = writer.ledger.growing
    assert growing is not None
    return target / growing.name


def test_a_spare_is_checked_a_step_at_a_time_and_then_joins_the_rotation(tmp_path: Path) -> None:
    """The check of a spare of 2,000 files (stamps, a walk, an fsync per directory) is
    spread over steps of CHECK_STEP entries: a change waits for one of them at most."""
    target = tmp_path / "config"
    writer, tree = writer_with(target, 2000, max_spares=1)
    spare = checked_spare(target, writer)
    steps = 0
    while writer.ledger.growing is not None:
        writer.maintain(step=0.0)
        steps += 1
    assert steps > 2000 // spares.CHECK_STEP
    assert [s.name for s in writer.ledger.spares] == [spare.name]  # checked: in the rotation
    writer.publish(tree.files, tree.put("k0001", b"new"), 2)
    assert not spare.exists()  # used by the next change: renamed into place
    assert read_tree(target) == tree.files


ACTIONS = ["none", "plant file", "plant dir", "plant empty dir", "plant link"]
ACTIONS += ["replace file", "remove file"]


@settings(max_examples=60, deadline=None)
@given(
    dirs=st.integers(1, 5),
    per_dir=st.integers(1, 60),
    steps=st.integers(0, 24),  # steps (links, stamps, walk) before someone acts
    action=st.sampled_from(ACTIONS),
    where=st.integers(0, 10**6),  # which directory or file it acts on
    changes=st.dictionaries(st.integers(0, 24), st.tuples(st.integers(0, 10**6), st.booleans())),
)
@example(dirs=1, per_dir=40, steps=1, action="replace file", where=0, changes={0: (0, False)})
def test_a_spare_changed_at_any_step_of_its_check_is_never_used(
    dirs: int,
    per_dir: int,
    steps: int,
    action: str,
    where: int,
    changes: dict[int, tuple[int, bool]],
) -> None:
    """Whatever someone adds, replaces or removes in a spare, while it is linked, stamped,
    or walked before or after the walk reaches that place, while changes (puts, deletes)
    go live between the steps: the spare is never used, nothing planted is served, and a
    spare nobody touched is used (no false alarm)."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        target = Path(tmp) / "config"
        writer = SnapshotWriter(target, clock=clock, max_spares=1)
        writer.recover()
        tree = KeyTree()
        for d in range(dirs):
            for i in range(per_dir):
                tree.put(f"d{d}/k{i:02d}", b"v")
        writer.publish(tree.files, set(tree.files), 1)
        writer.settle()
        writer.maintain(step=0.0)  # the spare's first links
        assert writer.ledger.growing is not None
        spare = target / writer.ledger.growing.name
        revision, touched = 1, set()
        for step in range(steps):
            writer.maintain(step=0.0)
            if writer.ledger.growing is None:
                break  # checked (not used: it is acted on next, in the rotation)
            if step in changes:  # a change goes live between two steps
                pick, delete = changes[step]
                keys = sorted(tree.files)
                if len(keys) > 1:
                    key = keys[pick % len(keys)]
                    revision += 1
                    paths = tree.delete(key) if delete else tree.put(key, b"r%d" % revision)
                    touched |= paths
                    writer.publish(tree.files, paths, revision)
                    writer.settle()
        subdirs = sorted(p for p in spare.rglob("*") if p.is_dir() and not p.is_symlink())
        files = sorted(  # a changed path is rewritten when the spare is used: no tampering
            p
            for p in spare.rglob("*")
            if p.is_file() and not p.is_symlink() and str(p.relative_to(spare)) not in touched
        )
        place = subdirs[where % len(subdirs)] if subdirs else spare
        if action == "plant file":
            (place / "evil").write_bytes(b"EVIL")
        elif action == "plant dir":
            (place / "evil").mkdir()
            (place / "evil" / "x").write_bytes(b"EVIL")
        elif action == "plant empty dir":  # served as an empty directory, if used
            (place / "evil").mkdir()
        elif action == "plant link":
            os.symlink("/etc/passwd", place / "evil")
        elif action == "replace file" and files:
            victim = files[where % len(files)]
            victim.unlink()
            victim.write_bytes(b"EVIL")
        elif action == "remove file" and files:
            files[where % len(files)].unlink()
        while writer.ledger.growing is not None:
            writer.maintain(step=0.0)
        clock.now += 1
        writer.maintain()  # catch-ups, the extra spares of the changes deleted
        there = spare.is_dir()  # else found out and removed already
        revision += 1
        writer.publish(tree.files, tree.put("d0/new", b"n"), revision)
        used = there and not spare.exists()  # renamed into place (else doomed, still there)
        assert used == (
            action == "none" or (action in ("replace file", "remove file") and not files)
        )
        assert read_tree(target) == tree.files
        assert "evil" not in {p.name for p in (target / DATA_LINK).rglob("*")}


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own
            continue
    return found


def test_a_check_holds_a_few_descriptors_between_steps_whatever_the_directories(
    tmp_path: Path,
) -> None:
    """The walk of a check is kept between steps: it once held a descriptor for every
    directory it had seen (950 of them ran a publish out of descriptors under the usual
    limit of 1024)."""
    target = tmp_path / "config"
    writer = SnapshotWriter(target, max_spares=1)
    writer.recover()
    tree = KeyTree()
    changed: set[str] = set()
    for i in range(600):
        changed |= tree.put(f"d{i:04d}/k", b"v")
    writer.publish(tree.files, changed, 1)
    writer.settle()
    before, most = fds(), 0
    for _ in range(10_000):  # until the spare is made and checked
        writer.maintain(step=0.0)
        most = max(most, fds() - before)
        if writer.ledger.growing is None:
            break
    assert writer.ledger.spares  # made
    assert fds() == before
    assert most <= 70  # fsops.OPEN_DIRS_MAX and a few


def test_a_rollback_to_a_previous_process_snapshot_after_housekeeping(tmp_path: Path) -> None:
    """The journal is trimmed by then (nothing of ours is older than the live one): the
    rollback once read its last entry anyway, and stopped the publisher (IndexError)."""
    target = tmp_path / "config"
    tree = KeyTree()
    changed: set[str] = set()
    for i in range(300):
        changed |= tree.put(f"d{i:03d}/k", b"v")
    old = SnapshotWriter(target)  # a previous process
    old.recover()
    old.publish(tree.files, changed, 1)
    old.settle()
    before, held = read_tree(target), fds()
    writer = SnapshotWriter(target, max_spares=1)
    writer.recover()
    writer.publish(tree.files, tree.put("d000/k", b"2"), 2)  # over the adopted one
    maker = writer._housekeeper.spares
    while maker.checking is None or maker.checking._walker is None:
        writer.maintain(step=0.0)  # a spare begun, linked, stamped, its walk begun
    writer.rollback()
    assert read_tree(target) == before
    writer.maintain()
    assert fds() <= held + 1, "\n".join(open_files())  # the target; no walk left open
