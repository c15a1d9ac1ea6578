"""The target is shared territory while the dispenser runs, too: what another process does
in it between two changes never makes the writer write, serve or keep what is not its own.

Writer-level tests on a real filesystem (a temporary directory), no etcd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import Clock, read_tree, writer_with

from etcd_config_dispenser import housekeeping
from etcd_config_dispenser.filemaker import FileMaker
from etcd_config_dispenser.fsops import Tree
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.layout import POOL_DIR, is_snapshot_name
from etcd_config_dispenser.snapshot import SnapshotWriter


def started(tmp_path: Path, **kwargs: object) -> tuple[Path, SnapshotWriter, KeyTree]:
    target = tmp_path / "config"
    writer = SnapshotWriter(target, **kwargs)  # type: ignore[arg-type]
    writer.recover()
    tree = KeyTree()
    writer.publish(tree.files, tree.put("k", b"old") | tree.put("other", b"o"), 1)
    writer.settle()
    writer.maintain()
    return target, writer, tree


def change(writer: SnapshotWriter, tree: KeyTree, revision: int, value: bytes) -> None:
    assert writer.publish(tree.files, tree.put("k", value), revision)
    writer.settle()
    writer.maintain()


@pytest.mark.parametrize("kind", ["hard link out", "fifo", "content", "symlink out"])
def test_a_tampered_pool_file_is_never_written_or_served(tmp_path: Path, kind: str) -> None:
    target, writer, tree = started(tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes(b"SENTINEL")
    pool = target / POOL_DIR
    for name in os.listdir(pool):
        (pool / name).unlink()
        if kind == "hard link out":
            os.link(outside, pool / name)
        elif kind == "fifo":
            os.mkfifo(pool / name)
        elif kind == "content":
            (pool / name).write_bytes(b"include /evil;\n")
        else:
            os.symlink(outside, pool / name)
    change(writer, tree, 2, b"NEW")  # a FIFO must not hang it (pytest's timeout would fire)
    assert outside.read_bytes() == b"SENTINEL"
    assert read_tree(target) == {"k": b"NEW", "other": b"o"}


@pytest.mark.parametrize("kind", ["file", "symlink", "gone"])
def test_a_replaced_pool_directory_costs_nothing_but_the_pool(tmp_path: Path, kind: str) -> None:
    target, writer, tree = started(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    pool = target / POOL_DIR
    for name in os.listdir(pool):
        (pool / name).unlink()
    pool.rmdir()
    if kind == "file":
        pool.write_bytes(b"x")
    elif kind == "symlink":
        pool.symlink_to(outside)
    change(writer, tree, 2, b"NEW")
    assert read_tree(target) == {"k": b"NEW", "other": b"o"}
    assert pool.is_dir() and not pool.is_symlink()  # made again by the housekeeping
    assert list(outside.iterdir()) == []
    change(writer, tree, 3, b"NEWER")
    assert read_tree(target) == {"k": b"NEWER", "other": b"o"}


def test_an_old_snapshot_that_could_not_be_removed_is_removed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgetting it would keep values etcd no longer has on the disk for good."""
    clock = Clock()
    target, writer, tree = started(tmp_path, clock=clock, grace=0.1, max_spares=0)
    real_remove = housekeeping.remove_at
    failures = []

    def failing_remove(fd: int, name: str, most: int | None = None) -> bool:
        if is_snapshot_name(name) and not failures:
            failures.append(name)
            raise OSError(30, "Read-only file system")
        return real_remove(fd, name, most)

    monkeypatch.setattr(housekeeping, "remove_at", failing_remove)
    change(writer, tree, 2, b"SECRET-2")
    change(writer, tree, 3, b"SECRET-3")
    clock.now += 0.2
    due = writer.maintain()
    assert failures and (target / failures[0]).is_dir()  # the first try failed
    assert due is not None and due <= clock.now + housekeeping.REMOVE_RETRY  # and is due again
    clock.now += housekeeping.REMOVE_RETRY
    writer.maintain()
    assert not (target / failures[0]).exists()
    for path in target.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert path.read_bytes() in (b"SECRET-3", b"o", b""), path


def test_thousands_of_directories_under_a_low_open_files_limit(tmp_path: Path) -> None:
    """One open descriptor per directory would fail the change with EMFILE for ever."""
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from etcd_config_dispenser.keys import KeyTree
        from etcd_config_dispenser.snapshot import SnapshotWriter
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        writer = SnapshotWriter(Path({str(tmp_path / "config")!r}))
        writer.recover()
        tree = KeyTree()
        changed = set()
        for i in range(1500):
            changed |= tree.put(f"d{{i}}/k", b"1")
        writer.publish(tree.files, changed, 1)
        writer.settle()
        writer.maintain()
        changed = set()
        for i in range(1500, 2600):
            changed |= tree.put(f"d{{i}}/k", b"2")
        assert writer.publish(tree.files, changed, 2)
        writer.settle()
        writer.maintain()
        print(len(list(Path({str(tmp_path / "config")!r}).glob("d*/k"))))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "2600"


def test_a_big_old_snapshot_is_removed_a_step_at_a_time(tmp_path: Path) -> None:
    """Removing 10,000 files can take a second: a change must not wait behind it."""
    clock = Clock()
    target = tmp_path / "config"
    writer = SnapshotWriter(target, clock=clock, grace=0.1, max_spares=0)
    writer.recover()
    tree = KeyTree()
    for i in range(3 * housekeeping.REMOVE_STEP):
        tree.put(f"k{i}", b"1")
    writer.publish(tree.files, set(tree.files), 1)
    writer.settle()
    writer.maintain()
    change(writer, tree, 2, b"2")
    clock.now += 0.2  # past the grace: the retired one (and the spare) may go
    snapshots = lambda: sorted(n for n in os.listdir(target) if is_snapshot_name(n))  # noqa: E731
    before = snapshots()
    steps = 0
    while (due := writer.maintain()) is not None and due <= clock.now and steps < 100:
        steps += 1  # "more now": the publisher looks at its inbox between steps
    assert steps >= 2, "all removed in one go"
    assert len(snapshots()) == 1 and len(before) > 1


@pytest.mark.parametrize("what", ["subdirectory made a link out", "file added", "file replaced"])
def test_a_spare_changed_by_someone_else_is_never_made_live(tmp_path: Path, what: str) -> None:
    """Only the paths of a change are rewritten in a reused spare: the rest must be as
    the writer left it, or a link planted there would be served."""
    clock = Clock()
    target = tmp_path / "config"
    writer = SnapshotWriter(target, clock=clock, grace=0.1)
    writer.recover()
    tree = KeyTree()
    writer.publish(tree.files, tree.put("sub/a", b"A") | tree.put("k", b"1"), 1)
    writer.settle()
    writer.maintain()  # spares are made: each one is tampered with
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a").write_bytes(b"SENTINEL")
    live = os.readlink(target / "..data")
    for spare in (n for n in os.listdir(target) if is_snapshot_name(n) and n != live):
        if what == "subdirectory made a link out":
            os.rename(target / spare / "sub", tmp_path / f"moved-away-{spare}")
            os.symlink(outside, target / spare / "sub")
        elif what == "file added":
            (target / spare / "evil").write_bytes(b"include /evil;")
        else:
            (target / spare / "sub" / "a").unlink()
            os.symlink(outside / "a", target / spare / "sub" / "a")
    change(writer, tree, 2, b"2")
    assert read_tree(target) == {"sub/a": b"A", "k": b"2"}
    assert sorted(os.listdir(target / "..data")) == ["k", "sub"]
    assert os.path.realpath(target / "sub" / "a").startswith(str(target))
    assert (outside / "a").read_bytes() == b"SENTINEL"


@pytest.mark.parametrize("what", ["file planted", "file replaced", "link planted", "none"])
def test_a_spare_changed_while_it_is_made_is_never_used(tmp_path: Path, what: str) -> None:
    """A spare is made a few links at a time, between changes: whatever someone adds to
    it or replaces in it meanwhile makes it unusable, never served."""
    clock = Clock()
    target = tmp_path / "config"
    writer, tree = writer_with(target, 200, clock=clock, grace=0.1, max_spares=1)
    writer.maintain(step=0.0)  # one step: some of the 200 files are linked
    growing = writer.ledger.growing
    assert growing is not None
    spare = target / growing.name
    if what == "file planted":
        (spare / "evil").write_bytes(b"include /evil;")
    elif what == "file replaced":
        linked = sorted(os.listdir(spare))[0]
        (spare / linked).unlink()
        (spare / linked).write_bytes(b"EVIL")
    elif what == "link planted":
        os.symlink("/etc/passwd", spare / "evil")
    while writer.ledger.growing is not None:
        writer.maintain(step=0.0)
    used = [s.name for s in writer.ledger.spares] == [growing.name]
    assert used == (what == "none")
    clock.now += 1
    change(writer, tree, 2, b"2")
    assert read_tree(target) == tree.files
    assert "evil" not in os.listdir(target / "..data")


def test_a_file_planted_where_a_deleted_key_was_is_never_served(tmp_path: Path) -> None:
    """A retired snapshot still holds the directory of a key deleted since; the live one
    does not. A file planted there must make the spare unusable: its stamps cover the
    directories it holds, not only the live one's (else it was served via ``b``)."""
    clock = Clock()
    target = tmp_path / "config"
    writer = SnapshotWriter(target, clock=clock, max_spares=1)
    writer.recover()
    tree = KeyTree()
    for i in range(50):
        tree.put(f"b/k{i:03d}", b"v")
    tree.put("b/c/x", b"secret")
    writer.publish(tree.files, set(tree.files), 1)
    writer.settle()
    writer.maintain()
    clock.now += 1
    writer.maintain()
    writer.publish(tree.files, tree.delete("b/c/x"), 2)
    writer.settle()
    retired = [s.name for s in writer.ledger.spares if s.retired_at is not None]
    assert retired and (target / retired[0] / "b" / "c").is_dir()
    (target / retired[0] / "b" / "c" / "evil").write_bytes(b"PLANTED")
    for revision in range(3, 6):  # the rotation goes round: the spare comes up for use
        clock.now += 1
        writer.maintain()
        writer.publish(tree.files, tree.put("b/k000", b"%d" % revision), revision)
        writer.settle()
        assert read_tree(target) == tree.files


def test_a_live_snapshot_replaced_by_someone_else_is_written_anew(tmp_path: Path) -> None:
    target, writer, tree = started(tmp_path, grace=0.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    live = os.readlink(target / "..data")
    for name in os.listdir(target):  # no spare either: the change must copy the live one
        if is_snapshot_name(name) and name != live:
            shutil.rmtree(target / name)
    os.rename(target / live, tmp_path / "moved-away")
    os.symlink(outside, target / live)
    writer.ledger.spares.clear()
    change(writer, tree, 2, b"NEW")
    assert read_tree(target) == {"k": b"NEW", "other": b"o"}
    assert list(outside.iterdir()) == []


def test_a_foreign_entry_at_a_top_level_name_is_never_replaced(tmp_path: Path) -> None:
    """Another container's file where a new key's link would go stays as it is."""
    target, writer, tree = started(tmp_path)
    (target / "theirs").write_bytes(b"THEIRS")
    assert writer.publish(tree.files, tree.put("theirs", b"ours"), 2)
    assert (target / "theirs").read_bytes() == b"THEIRS" and not (target / "theirs").is_symlink()


def test_a_symlink_loop_planted_in_a_spare_does_not_stop_publishing(tmp_path: Path) -> None:
    clock = Clock()
    target, writer, tree = started(tmp_path, clock=clock, grace=0.1)
    tree.put("sub/deeper/x", b"1")
    writer.publish(tree.files, {"sub/deeper/x"}, 2)
    writer.settle()
    clock.now += 1
    writer.maintain()
    live = os.readlink(target / "..data")
    for spare in (n for n in os.listdir(target) if is_snapshot_name(n) and n != live):
        shutil.rmtree(target / spare / "sub")
        os.symlink("sub", target / spare / "sub")  # a link to itself: ELOOP on the way
    change(writer, tree, 3, b"NEW")
    assert read_tree(target) == {"k": b"NEW", "other": b"o", "sub/deeper/x": b"1"}


def test_a_planted_file_with_its_directory_time_set_back_is_never_served(tmp_path: Path) -> None:
    """Someone owning the target's directories plants a file in a spare and sets the
    directory's mtime back (utime): the stamps use the ctime, which cannot be set back."""
    clock = Clock()
    target = tmp_path / "config"
    writer, tree = writer_with(target, 50, clock=clock, max_spares=1)
    writer.maintain()  # a spare made and checked
    (spare,) = writer.ledger.spares
    path = target / spare.name
    st = os.stat(path)
    (path / "evil").write_bytes(b"EVIL")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.now += 1
    writer.publish(tree.files, tree.put("k0001", b"x"), 2)
    assert "evil" not in os.listdir(target / "..data")
    assert read_tree(target) == tree.files


@pytest.mark.parametrize("when", ["used", "caught up, then a file planted"])
def test_an_empty_directory_planted_where_a_deleted_key_was_is_never_served(
    tmp_path: Path, when: str
) -> None:
    """A key comes and goes while a spare is linked: its directory is one a spare may
    hold. An empty one planted there passed the check and was served as ``..data/n``;
    once the spare was caught up, it was not stamped, and a file planted in it was
    served. (Removing a path now prunes its directories even when no file was there.)"""
    clock = Clock()
    target = tmp_path / "config"
    writer, tree = writer_with(target, 200, clock=clock, max_spares=1)
    writer.maintain(step=0.0)  # the spare's first links
    growing = writer.ledger.growing
    assert growing is not None
    spare = target / growing.name
    writer.publish(tree.files, tree.put("n/k", b"v"), 2)
    writer.settle()
    writer.publish(tree.files, tree.delete("n/k"), 3)
    writer.settle()
    os.mkdir(spare / "n")  # planted, empty, before the check stamps the spare
    while writer.ledger.growing is not None:
        writer.maintain(step=0.0)
    clock.now += 1
    if when != "used":
        writer.maintain()  # caught up
        if (spare / "n").is_dir():
            (spare / "n" / "evil").write_bytes(b"EVIL")
    revision = 4
    while spare.exists() and revision < 9:  # the rotation goes round to it
        writer.publish(tree.files, tree.put("k0001", b"%d" % revision), revision)
        writer.settle()
        revision += 1
    assert read_tree(target) == tree.files
    assert not (target / "..data" / "n").exists()


@pytest.mark.parametrize("fresh", [True, False], ids=["new directory", "spare"])
@pytest.mark.parametrize("planted", ["file", "hard link", "symlink"])
def test_a_file_is_written_as_new_over_whatever_is_at_its_place(
    tmp_path: Path, fresh: bool, planted: str
) -> None:
    """A new snapshot directory is written to by creating first (nothing is expected
    there), a spare by removing first; either way, whatever someone put at the path is
    replaced by a new file of ours, never written through."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    directory = tmp_path / "snap"
    (directory / "sub").mkdir(parents=True)
    place = directory / "sub" / "key"
    if planted == "file":
        place.write_bytes(b"planted")
    elif planted == "hard link":
        os.link(outside, place)
    else:
        place.symlink_to(outside)
    with Tree(os.open(directory, os.O_RDONLY | os.O_DIRECTORY)) as tree:
        fd = FileMaker().write(tree, "sub/key", b"value", None, fresh=fresh)
        os.close(fd)
    assert place.read_bytes() == b"value" and not place.is_symlink()
    assert outside.read_bytes() == b"not ours"
    assert place.stat().st_nlink == 1
