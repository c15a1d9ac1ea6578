"""Spares made a few links at a time between changes (housekeeping.Housekeeper.grow), and
the wait of a change for a spare's shorter grace: what an adversarial pass broke once."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import Clock, dir_files, read_tree, writer_with

from etcd_config_dispenser.keys import KeyTree
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
