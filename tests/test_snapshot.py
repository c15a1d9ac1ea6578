"""Snapshot writer on a real filesystem: layout, modes, sequences, recovery, the fast path."""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest
from helpers import Clock, dir_files, read_tree, snapshot_dirs

from etcd_config_dispenser.filemaker import dir_mode
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.layout import DATA_LINK, TMP_LINK
from etcd_config_dispenser.recovery import TargetRefused
from etcd_config_dispenser.snapshot import SnapshotError, SnapshotWriter


def assert_only_kept(target: Path, writer: SnapshotWriter) -> None:
    """No debris: every snapshot dir on disk is the live one or a spare the writer keeps."""
    assert os.readlink(target / DATA_LINK) in writer.kept_dirs
    assert sorted(snapshot_dirs(target)) == sorted(writer.kept_dirs)


def finish(writer: SnapshotWriter) -> None:
    """What the publisher does after a publish: settle it, then the housekeeping due."""
    writer.settle()
    writer.maintain()


def make_writer(target: Path, **kwargs: object) -> SnapshotWriter:
    writer = SnapshotWriter(target, **kwargs)  # type: ignore[arg-type]
    writer.recover()
    return writer


def publish(writer: SnapshotWriter, tree: KeyTree, revision: int, **edits: bytes | None) -> bool:
    """Apply edits (path -> value, None deletes; '__' stands for '/') and publish."""
    changed: set[str] = set()
    for name, value in edits.items():
        path = name.replace("__", "/")
        changed |= tree.delete(path) if value is None else tree.put(path, value)
    result = writer.publish(tree.files, changed, revision)
    writer.settle()
    writer.maintain()
    return result is not None


def test_layout_after_first_publish(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    assert publish(writer, tree, 42, cert=b"C", key=b"K", sub__c=b"nested")
    live = os.readlink(target / DATA_LINK)
    assert live.startswith("..") and live.endswith(".r42")
    assert_only_kept(target, writer)
    for name in snapshot_dirs(target):  # the live one, and a spare ready for the next change
        assert dir_files(target / name) == {"cert": b"C", "key": b"K", "sub/c": b"nested"}
    for name in ("cert", "key", "sub"):
        assert os.readlink(target / name) == f"{DATA_LINK}/{name}"
    assert read_tree(target) == {"cert": b"C", "key": b"K", "sub/c": b"nested"}


def test_create_update_delete_nested_delete(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target, grace=0.0)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1", d__e__f=b"deep")
    assert publish(writer, tree, 2, a=b"2", b=b"new")
    assert read_tree(target) == {"a": b"2", "b": b"new", "d/e/f": b"deep"}
    assert publish(writer, tree, 3, b=None)
    assert read_tree(target) == {"a": b"2", "d/e/f": b"deep"}
    assert not (target / "b").is_symlink()
    assert publish(writer, tree, 4, d__e__f=None)
    assert read_tree(target) == {"a": b"2"}
    assert not (target / "d").exists() and not (target / DATA_LINK / "d").exists()


def test_nothing_changed_touches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1")
    live = os.readlink(target / DATA_LINK)
    assert not publish(writer, tree, 2, a=b"1")
    assert os.readlink(target / DATA_LINK) == live


def test_values_are_byte_exact(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    der = bytes(range(256)) * 40
    publish(writer, KeyTree(), 1, der=der, empty=b"", crlf=b"a\r\nb\r\n")
    assert read_tree(target) == {"der": der, "empty": b"", "crlf": b"a\r\nb\r\n"}


@pytest.mark.parametrize(
    "mode, expected_dir",
    [(0o600, 0o700), (0o644, 0o755), (0o640, 0o750), (0o400, 0o700), (0o444, 0o755)],
)
def test_modes_ignore_the_umask(tmp_path: Path, mode: int, expected_dir: int) -> None:
    assert dir_mode(mode) == expected_dir
    old = os.umask(0o077)
    try:
        target = tmp_path / "config"
        writer = make_writer(target, mode=mode)
        publish(writer, KeyTree(), 1, f=b"x", sub__g=b"y")
    finally:
        os.umask(old)
    data = target / DATA_LINK
    assert stat.S_IMODE(os.stat(data / "f").st_mode) == mode
    assert stat.S_IMODE(os.stat(data / "sub" / "g").st_mode) == mode
    assert stat.S_IMODE(os.stat(data / "sub").st_mode) == expected_dir
    assert stat.S_IMODE(os.stat(data).st_mode) == expected_dir


def test_old_snapshot_is_untouched_within_the_grace_period(tmp_path: Path) -> None:
    """A reader that resolved ..data before a flip keeps reading one whole revision."""
    target = tmp_path / "config"
    clock = Clock()
    writer = make_writer(target, grace=1.0, clock=clock)
    tree = KeyTree()
    publish(writer, tree, 1, cert=b"c1", key=b"k1")
    old = target / os.readlink(target / DATA_LINK)
    publish(writer, tree, 2, cert=b"c2", key=b"k2")
    publish(writer, tree, 3, cert=b"c3", key=b"k3")  # still within the grace period
    assert (old / "cert").read_bytes() == b"c1" and (old / "key").read_bytes() == b"k1"
    assert read_tree(target) == {"cert": b"c3", "key": b"k3"}


def test_spare_directory_is_reused_after_the_grace_period(tmp_path: Path) -> None:
    target = tmp_path / "config"
    clock = Clock()
    writer = make_writer(target, grace=1.0, clock=clock, max_spares=1)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1", b=b"1")
    first_inode = os.stat(target / os.readlink(target / DATA_LINK)).st_ino
    publish(writer, tree, 2, a=b"2")
    clock.now += 5
    publish(writer, tree, 3, b=b"3")
    # Revision 3 lives in revision 1's directory, renamed and brought up to date.
    assert os.stat(target / os.readlink(target / DATA_LINK)).st_ino == first_inode
    assert os.readlink(target / DATA_LINK).endswith(".r3")
    assert read_tree(target) == {"a": b"2", "b": b"3"}


def test_failed_flip_keeps_the_live_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1")
    live = os.readlink(target / DATA_LINK)
    tree.put("b", b"2")

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_flip", no_space)  # the rename onto ..data fails
    with pytest.raises(SnapshotError, match="r2 not published"):
        writer.publish(tree.files, {"b"}, 2)
    monkeypatch.undo()
    assert os.readlink(target / DATA_LINK) == live
    assert_only_kept(target, writer)
    assert read_tree(target) == {"a": b"1"}
    # The next publish, given the paths again, succeeds.
    assert writer.publish(tree.files, {"b"}, 3)
    assert read_tree(target) == {"a": b"1", "b": b"2"}


def test_failed_write_removes_the_half_built_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1")
    live = os.readlink(target / DATA_LINK)
    for name in "bcd":
        tree.put(name, b"2")
    real_write = writer._maker.write
    calls: list[str] = []

    def write_then_fail(
        tree: object, rel: str, value: bytes, pool: int | None, fresh: bool = False
    ) -> int:
        calls.append(rel)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tree, rel, value, pool, fresh)  # type: ignore[arg-type]

    monkeypatch.setattr(writer._maker, "write", write_then_fail)
    with pytest.raises(SnapshotError, match="No space left"):
        writer.publish(tree.files, {"b", "c", "d"}, 2)
    assert os.readlink(target / DATA_LINK) == live
    assert_only_kept(target, writer)
    assert read_tree(target) == {"a": b"1"}


def test_recover_removes_debris_and_keeps_the_live_snapshot(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1", sub__b=b"2")
    live = os.readlink(target / DATA_LINK)
    # What a kill -9 between write and flip leaves behind:
    half = target / "..2026_01_01_00_00_00.000000001.r2"
    half.mkdir()
    (half / "a").write_bytes(b"half")
    os.symlink(half.name, target / TMP_LINK)
    restarted = SnapshotWriter(target)
    assert restarted.recover() == live
    assert snapshot_dirs(target) == [live]
    assert not (target / TMP_LINK).is_symlink()
    assert read_tree(target) == {"a": b"1", "sub/b": b"2"}  # still served
    # The first publish of the new process replaces it, links included.
    assert restarted.publish({"c": b"3"}, {"c"}, 3)
    finish(restarted)
    assert read_tree(target) == {"c": b"3"}
    assert_only_kept(target, restarted)


def test_recover_refuses_a_target_with_foreign_files(tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.mkdir()
    (target / "nginx.conf").write_text("mine")
    with pytest.raises(TargetRefused, match=r"nginx\.conf"):
        SnapshotWriter(target).recover()
    assert (target / "nginx.conf").read_text() == "mine"


def test_recover_creates_a_missing_target(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "config"
    assert SnapshotWriter(target).recover() is None
    assert target.is_dir()


def test_file_dir_clash_transitions_on_disk(tmp_path: Path) -> None:
    target = tmp_path / "config"
    clock = Clock()
    writer = make_writer(target, grace=1.0, clock=clock)
    tree = KeyTree()
    publish(writer, tree, 1, a__b=b"deep")
    clock.now += 2
    publish(writer, tree, 2, a=b"file")
    assert read_tree(target) == {"a": b"file"}
    clock.now += 2
    publish(writer, tree, 3, a=None)
    assert read_tree(target) == {"a/b": b"deep"}
    clock.now += 2
    publish(writer, tree, 4, a=b"again")
    assert read_tree(target) == {"a": b"again"}


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_equals_a_full_rebuild(tmp_path: Path, seed: int) -> None:
    """Random edits through spares, hard links and rollbacks give what a fresh write gives.

    Also: a kept snapshot directory never changes while it is not reused.
    """
    rng = random.Random(seed)
    target = tmp_path / "config"
    clock = Clock()
    writer = make_writer(target, grace=1.0, clock=clock)
    tree = KeyTree()
    names = ["a", "b", "c/d", "c/e", "c", "f/g/h", "f", "x/y"]
    publish(writer, tree, 1, **{n.replace("/", "__"): b"0" for n in names[:4]})
    served = dict(tree.files)
    pending: set[str] = set()  # paths where the tree is ahead of what is served
    history: dict[str, dict[str, bytes]] = {os.readlink(target / DATA_LINK): served}
    retired: dict[str, float] = {}  # snapshot name -> when it stopped being live
    for revision in range(2, 100):
        changed: set[str] = set(pending)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(names)
            value = None if rng.random() < 0.3 else str(revision).encode()
            changed |= tree.delete(path) if value is None else tree.put(path, value)
        if writer.publish(tree.files, changed, revision):
            history[os.readlink(target / DATA_LINK)] = dict(tree.files)
            if rng.random() < 0.25:  # a failed --check
                writer.rollback()
                pending = changed
            else:
                served, pending = dict(tree.files), set()
            finish(writer)
        assert read_tree(target) == served
        assert dir_files(target / os.readlink(target / DATA_LINK)) == served
        assert sorted(snapshot_dirs(target)) == sorted(writer.kept_dirs)
        live_now = os.readlink(target / DATA_LINK)
        retired.pop(live_now, None)  # live again after a rollback
        for name in history:  # live until now (a rejected one: only for the check)
            if name != live_now and name not in retired:
                retired[name] = clock.now
        # Within the grace period a retired snapshot still holds its revision; past
        # it, housekeeping brings it up to what is served: no value stays that is
        # no longer live.
        for name in snapshot_dirs(target):
            if name in history and clock.now - retired.get(name, -1e9) < 1.0:
                assert dir_files(target / name) == history[name]
        clock.now += rng.choice([0.1, 0.5, 2.0])
        writer.maintain()
        for name in snapshot_dirs(target):
            if name != live_now and clock.now - retired.get(name, -1e9) >= 1.0:
                assert dir_files(target / name) == served


def test_rollback_puts_the_previous_snapshot_back(tmp_path: Path) -> None:
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1", b=b"1", sub__c=b"1")
    before = os.readlink(target / DATA_LINK)
    changed = tree.put("a", b"2") | tree.delete("b") | tree.put("new", b"x")
    changed |= tree.delete("sub/c")
    assert writer.publish(tree.files, changed, 2)
    assert read_tree(target) == {"a": b"2", "new": b"x"}
    assert writer.rollback() == before
    assert os.readlink(target / DATA_LINK) == before
    assert read_tree(target) == {"a": b"1", "b": b"1", "sub/c": b"1"}  # links too
    finish(writer)
    assert_only_kept(target, writer)
    # The rejected paths go with the next change, and are published then.
    changed |= tree.put("d", b"4")
    assert writer.publish(tree.files, changed, 3)
    assert read_tree(target) == {"a": b"2", "new": b"x", "d": b"4"}


def test_rollback_without_a_previous_snapshot_is_refused(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "config")
    tree = KeyTree()
    tree.put("a", b"1")
    writer.publish(tree.files, {"a"}, 1)
    with pytest.raises(SnapshotError, match="no previous snapshot"):
        writer.rollback()


def test_rollback_to_the_snapshot_a_previous_process_left(tmp_path: Path) -> None:
    """--check at start-up: a rejected first snapshot gives way to the adopted one."""
    target = tmp_path / "config"
    before = make_writer(target)
    publish(before, KeyTree(), 1, a=b"good", sub__b=b"good")
    adopted = os.readlink(target / DATA_LINK)
    clock = Clock()
    writer = SnapshotWriter(target, clock=clock)
    assert writer.recover() == adopted
    tree = KeyTree()
    tree.put("a", b"bad")
    tree.put("c", b"bad")
    assert writer.publish(tree.files, {"a", "c"}, 2)
    assert writer.can_roll_back
    assert writer.rollback() == adopted
    assert read_tree(target) == {"a": b"good", "sub/b": b"good"}  # links put back too
    finish(writer)
    assert_only_kept(target, writer)  # the rejected one is gone, the adopted one kept
    # The next publish writes everything again, whatever it is handed.
    tree.put("a", b"fixed")
    assert writer.publish(tree.files, {"a"}, 3)
    assert read_tree(target) == {"a": b"fixed", "c": b"bad"}
    finish(writer)
    assert_only_kept(target, writer)
    clock.now += 1  # past the grace period: what a reader could have been in goes
    finish(writer)
    assert_only_kept(target, writer)
    assert adopted not in snapshot_dirs(target)


def test_recover_refuses_before_removing_anything(tmp_path: Path) -> None:
    """A '..' name that is not one of ours is somebody's: nothing is removed."""
    target = tmp_path / "config"
    make_writer(target)
    leftover = target / "..2026_01_01_00_00_00.000000001.r2"
    leftover.mkdir()
    backup = target / "..user-backup"
    backup.mkdir()
    (backup / "f").write_text("mine")
    with pytest.raises(TargetRefused, match=r"\.\.user-backup"):
        SnapshotWriter(target).recover()
    assert (backup / "f").read_text() == "mine"
    assert leftover.is_dir()  # not even our own debris is touched before refusing


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.EEXIST, errno.EINVAL, errno.EACCES])
def test_a_key_that_cannot_be_written_is_skipped_and_the_rest_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A name this filesystem refuses stops only its own key; it is tried again next time."""
    target = tmp_path / "config"
    writer = make_writer(target, grace=0.0)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1")
    real_write = writer._maker.write

    def refuse_one(
        tree_: object, rel: str, value: bytes, pool: int | None, fresh: bool = False
    ) -> int:
        if rel == "sub/bad":
            raise OSError(code, os.strerror(code))
        return real_write(tree_, rel, value, pool, fresh)  # type: ignore[arg-type]

    monkeypatch.setattr(writer._maker, "write", refuse_one)
    changed = tree.put("sub/bad", b"x") | tree.put("good", b"2") | tree.put("a", b"2")
    result = writer.publish(tree.files, changed, 2)
    assert result is not None and set(result.failed) == {"sub/bad"}
    assert read_tree(target) == {"a": b"2", "good": b"2"}
    monkeypatch.undo()  # the filesystem takes it now: the next change brings it along
    finish(writer)
    assert writer.publish(tree.files, tree.put("other", b"3"), 3)
    assert read_tree(target) == {"a": b"2", "good": b"2", "sub/bad": b"x", "other": b"3"}


def test_a_target_that_takes_nothing_fails_the_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES on every file is the target's problem, not one key's: nothing goes live."""
    target = tmp_path / "config"
    writer = make_writer(target)
    tree = KeyTree()
    publish(writer, tree, 1, a=b"1")
    live = os.readlink(target / DATA_LINK)
    real_open = os.open

    def no_access(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_CREAT or flags & os.O_WRONLY:
            raise OSError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_access)
    with pytest.raises(SnapshotError, match="Permission denied"):
        writer.publish(tree.files, tree.put("b", b"2"), 2)
    monkeypatch.undo()
    assert os.readlink(target / DATA_LINK) == live
    assert read_tree(target) == {"a": b"1"}
    assert writer.publish(tree.files, set(), 3)  # owed by the writer: nothing to resend
    assert read_tree(target) == {"a": b"1", "b": b"2"}


def test_a_deep_key_publishes_and_goes_without_recursion(tmp_path: Path) -> None:
    """The deepest key the rules allow is written, removed, and its snapshot deleted."""
    from etcd_config_dispenser.keys import MAX_DEPTH

    target = tmp_path / "config"
    clock = Clock()
    writer = make_writer(target, clock=clock, grace=1.0)
    tree = KeyTree()
    deep = "/".join(["d"] * (MAX_DEPTH - 1) + ["f"])
    publish(writer, tree, 1, **{deep.replace("/", "__"): b"deep"})
    assert read_tree(target) == {deep: b"deep"}
    publish(writer, tree, 2, **{deep.replace("/", "__"): None, "x": b"1"})
    for _ in range(4):
        clock.now += 2
        publish(writer, tree, 3, x=b"2")
    assert read_tree(target) == {"x": b"2"}
    assert_only_kept(target, writer)
