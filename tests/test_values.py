"""A full read's values spooled to an unnamed file (values.py): read back whole or not at
all, compared by digest, freed with the last value, and never a failure (in memory when
there can be no spool). Unit tests on a temporary directory; then a real etcd, and the
real dispenser."""

from __future__ import annotations

import errno
import gc
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DispenserProcess, busy_wait, read_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from etcd_config_dispenser.config import load
from etcd_config_dispenser.events import Batch, Change, Ended, Event, FullRead, KeyValues
from etcd_config_dispenser.health import Stats
from etcd_config_dispenser.intake import MAX_SPOOLS, MOVE_PAGE, SPILL_BYTES, KeyIntake
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.publisher import Publisher, Rules
from etcd_config_dispenser.rules import KeySelection
from etcd_config_dispenser.session import EtcdSession
from etcd_config_dispenser.snapshot import SnapshotWriter
from etcd_config_dispenser.source import READ_PAGE, READ_PAGE_MOST, EtcdSource, next_page
from etcd_config_dispenser.values import (
    Spool,
    Spooled,
    SpoolError,
    Value,
    ValueView,
    as_bytes,
    kept,
    open_spool,
    same,
)

CATCHES_HUP = ("sh", "-c", "trap 'echo hup' HUP; while :; do sleep 0.05; done")
_OPENED: dict[Path, int] = {}


def opened(directory: Path) -> int:
    """``directory``, open (once per test run: the spools of a test go in it)."""
    if directory not in _OPENED:
        _OPENED[directory] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    return _OPENED[directory]


def spool_fds(pid: int | str, directory: Path) -> list[str]:
    """The unnamed files in ``directory`` a process holds open (O_TMPFILE shows as
    ``DIR/#INODE (deleted)``)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith(f"{directory}/#") and link.endswith("(deleted)"):
            found.append(link)
    return found


def spill_all(intake: KeyIntake) -> int:
    """A spill run to its end, as the publisher's housekeeping steps run it; the steps."""
    steps = 1
    while intake.spill():
        steps += 1
    return steps


def test_values_read_back_as_written_and_nobody_sees_the_spool(tmp_path: Path) -> None:
    spool = Spool(opened(tmp_path))
    values = [b"", b"a" * 5000, bytes(range(256)), b"x"]
    refs = [*spool.add(values), *spool.add([b"second page"])]
    assert [r.read() for r in refs] == [*values, b"second page"]
    assert os.listdir(tmp_path) == []  # no name in the directory: nothing to open or replace
    assert len(spool_fds("self", tmp_path)) == 1


def test_a_spool_is_closed_with_its_last_value(tmp_path: Path) -> None:
    refs = Spool(opened(tmp_path)).add([b"a", b"b"])
    assert len(spool_fds("self", tmp_path)) == 1
    first = refs[0]
    del refs
    gc.collect()
    assert len(spool_fds("self", tmp_path)) == 1  # one value still refers to it
    assert first.read() == b"a"
    del first
    gc.collect()
    assert spool_fds("self", tmp_path) == []


def test_a_spooled_value_changed_under_us_is_never_read_as_another(tmp_path: Path) -> None:
    spool = Spool(opened(tmp_path))
    ref = spool.add([b"secret-1"])[0]
    os.pwrite(spool._fd, b"SECRET-2", spool.span(ref.index)[0])  # a failing disk, or our fd
    with pytest.raises(OSError) as caught:
        ref.read()
    assert caught.value.errno == errno.EIO


def test_values_stay_in_memory_when_there_can_be_no_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No O_TMPFILE there (here: not a directory), or a full disk: never a failure."""
    not_a_dir = os.open(tmp_path / "file", os.O_RDONLY | os.O_CREAT, 0o600)
    assert open_spool(not_a_dir) is None
    os.close(not_a_dir)
    assert open_spool(None) is None
    assert kept(None, [b"a"]) == [b"a"]
    spool = open_spool(opened(tmp_path))
    assert spool is not None

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    assert kept(spool, [b"a", b"b"]) == [b"a", b"b"]


def as_value(spool: Spool, data: bytes, spooled: bool) -> Value:
    return spool.add([data])[0] if spooled else data


@settings(max_examples=200, deadline=None)
@given(
    a=st.binary(max_size=40),
    b=st.binary(max_size=40),
    a_spooled=st.booleans(),
    b_spooled=st.booleans(),
)
def test_values_are_the_same_exactly_when_their_bytes_are(
    tmp_path_factory: pytest.TempPathFactory, a: bytes, b: bytes, a_spooled: bool, b_spooled: bool
) -> None:
    spool = Spool(opened(tmp_path_factory.getbasetemp()))
    x, y = as_value(spool, a, a_spooled), as_value(spool, b, b_spooled)
    assert same(x, y) == (a == b)
    assert same(x, None) is False and same(None, None) is True


@settings(max_examples=100, deadline=None)
@given(
    old=st.dictionaries(st.sampled_from(["a", "b", "c/d", "c/e", "f"]), st.binary(max_size=3)),
    new=st.dictionaries(st.sampled_from(["a", "b", "c/d", "c/e", "f"]), st.binary(max_size=3)),
    spooled=st.lists(st.booleans(), min_size=10, max_size=10),
)
def test_a_tree_of_spooled_values_changes_exactly_where_bytes_differ(
    tmp_path_factory: pytest.TempPathFactory,
    old: dict[str, bytes],
    new: dict[str, bytes],
    spooled: list[bool],
) -> None:
    """A resync compares the old tree with the new one, and a put the old value with the
    new one, whether either is spooled or in memory: the same files change as with bytes."""
    spool = Spool(opened(tmp_path_factory.getbasetemp()))
    trees = []
    for offset, values in ((0, old), (5, new)):
        tree = KeyTree()
        for i, (path, value) in enumerate(sorted(values.items())):
            tree.put(path, as_value(spool, value, spooled[offset + i]))
        trees.append(tree)
    plain_old, plain_new = KeyTree(), KeyTree()
    for path, value in old.items():
        plain_old.put(path, value)
    for path, value in new.items():
        plain_new.put(path, value)
    assert trees[0].differs(trees[1]) == plain_old.differs(plain_new)
    assert dict(trees[1].files) == dict(plain_new.files)  # read back as bytes
    for path, value in new.items():  # a put of what is there already changes nothing
        if path in trees[1].files:
            assert trees[1].put(path, value) == set()


def test_a_view_reads_spooled_values_only_when_asked(tmp_path: Path) -> None:
    spool = Spool(opened(tmp_path))
    ref = spool.add([b"2"])[0]
    view = ValueView({"a": b"1", "b": ref})
    os.pwrite(spool._fd, b"X", 0)  # unreadable from now on: only asking for it fails
    assert len(view) == 2 and "b" in view and "c" not in view and sorted(view) == ["a", "b"]
    assert view["a"] == b"1"
    with pytest.raises(SpoolError):
        view["b"]
    os.pwrite(spool._fd, b"2", 0)
    assert view == {"a": b"1", "b": b"2"}
    assert view.get("c") is None


def test_a_full_read_from_etcd_is_spooled(
    etcd_server: object, etcd: object, prefix: str, tmp_path: Path
) -> None:
    """Pages of a real full read go to one spool, whole: 2,500 keys of 2 KiB, read in
    pages of 100, then of as many as make READ_PAGE_BYTES."""
    items = {f"{prefix}k{i:04d}": os.urandom(2048) + b"%d" % i for i in range(2500)}
    for key, value in items.items():
        etcd.put(key, value)  # type: ignore[attr-defined]
    endpoint = etcd_server.endpoint  # type: ignore[attr-defined]
    source = EtcdSource(load({"ETCD_ENDPOINTS": endpoint}), prefix.encode())
    inbox: queue.Queue[Event] = queue.Queue()
    session = EtcdSession(source, inbox, Stats(), spool_at=opened(tmp_path))
    threading.Thread(target=session.run, daemon=True).start()
    try:
        event = inbox.get(timeout=10)
    finally:
        session.stop()
    assert isinstance(event, FullRead)
    pages = [len(page) for page in event.kvs._pages]
    size = sum(len(v) for v in list(items.values())[:READ_PAGE])
    assert pages[0] == READ_PAGE and set(pages[1:-1]) == {next_page(READ_PAGE, size)}
    assert 1 < len(pages) < 2500 / READ_PAGE and sum(pages) == 2500
    assert all(isinstance(value, Spooled) for _key, value in event.kvs)
    assert len({id(value.spool) for _key, value in event.kvs}) == 1  # type: ignore[union-attr]
    assert {k.decode(): v.read() for k, v in event.kvs} == items  # type: ignore[union-attr]


def test_the_dispenser_spools_its_full_read_and_frees_it_with_the_last_value(
    etcd: object, prefix: str, target: Path, dispenser: Callable[..., DispenserProcess]
) -> None:
    """The real process: the values of its first read are in an unnamed file on the target's
    filesystem, not in its memory, and that file goes once etcd replaced them all."""
    for name in ("a", "b", "c"):
        etcd.put(prefix + name, b"first " + name.encode())  # type: ignore[attr-defined]
    proc = dispenser(*CATCHES_HUP)
    busy_wait(lambda: (target / "c").exists())
    pid = proc.proc.pid
    assert len(spool_fds(pid, target)) == 1
    # One transaction: one watch response, so no spill runs between the puts (which
    # would drain the last first value, with the new ones, into a spool that stays).
    puts = [etcd.transactions.put(prefix + n, b"second " + n.encode()) for n in "abc"]  # type: ignore[attr-defined]
    etcd.transaction(compare=[], success=puts, failure=[])  # type: ignore[attr-defined]
    busy_wait(lambda: (target / "c").read_bytes() == b"second c")
    busy_wait(lambda: spool_fds(pid, target) == [])
    assert (target / "a").read_bytes() == b"second a"


def spill_whole(tree: KeyTree, spool: Spool, drain: set[Spool]) -> None:
    """Every value held in memory or in ``drain`` moved to ``spool`` in one go, with the
    pieces ``KeyIntake.spill`` takes a step at a time."""
    paths = tree.held_paths()
    after: str | None = ""
    while after is not None:
        more, after = tree.in_spools(drain, after, len(tree.values) + 1)
        paths += more
    tree.move(spool, paths, drain)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["put", "delete", "spill", "drain"]),
            st.sampled_from(["a", "b", "a/c", "d/e", "d"]),
            st.binary(max_size=5),
        ),
        max_size=30,
    )
)
def test_spilling_values_held_in_memory_changes_no_file(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str, bytes]]
) -> None:
    """Puts, deletes and spills in any order: the files are those of a tree that never
    spilled, and ``held`` counts exactly the bytes still in memory."""
    tree, plain = KeyTree(), KeyTree()
    for action, path, value in steps:
        if action in ("spill", "drain"):
            drain = set(tree.spool_use()) if action == "drain" else set()
            spill_whole(tree, Spool(opened(tmp_path_factory.getbasetemp())), drain)
            assert not any(isinstance(v, bytes) for v in tree.values.values())
            assert tree.held == 0  # none kept in memory
            assert len(tree.spool_use()) <= 1 or not drain
        elif action == "put":
            assert tree.put(path, value) == plain.put(path, value)
        else:
            assert tree.delete(path) == plain.delete(path)
        assert tree.held == sum(len(v) for v in tree.values.values() if isinstance(v, bytes))
        use: dict[Spool, int] = {}  # what each spool holds that is current, counted anew
        for v in tree.values.values():
            if isinstance(v, Spooled):
                use[v.spool] = use.get(v.spool, 0) + v.size
        assert tree.spool_use() == use
    assert dict(tree.files) == dict(plain.files)


def test_values_from_watch_responses_spill_once_they_add_up(tmp_path: Path) -> None:
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    big = SPILL_BYTES // 4
    intake.absorb(Batch(2, [Change(b"/p/a", b"a" * big), Change(b"/p/b", b"b" * big)]))
    spill_all(intake)
    assert all(isinstance(v, bytes) for v in intake.tree.values.values())  # not yet
    intake.absorb(Batch(3, [Change(b"/p/c", b"c" * big), Change(b"/p/d", b"d" * big)]))
    spill_all(intake)
    assert intake.tree.held == 0
    assert all(isinstance(v, Spooled) for v in intake.tree.values.values())
    assert intake.tree.files["c"] == b"c" * big


def test_the_dispenser_spools_values_from_the_watch_once_they_add_up(
    etcd: object, prefix: str, target: Path, dispenser: Callable[..., DispenserProcess]
) -> None:
    """Renewals arrive one by one through the watch; held in memory, they would add up to
    every value again (the long run of a certificate store): they are spooled too."""
    etcd.put(prefix + "first", b"x")  # type: ignore[attr-defined]
    proc = dispenser(*CATCHES_HUP)
    busy_wait(lambda: (target / "first").exists())
    pid = proc.proc.pid
    assert len(spool_fds(pid, target)) == 1  # the full read's, while "first" is current
    value = b"v" * (SPILL_BYTES // 3 + 1)
    for i in range(3):
        etcd.put(f"{prefix}big{i}", value)  # type: ignore[attr-defined]
    busy_wait(lambda: (target / "big2").exists())
    busy_wait(lambda: len(spool_fds(pid, target)) == 2)  # and a spill's
    for i in range(3):
        etcd.delete(f"{prefix}big{i}")  # type: ignore[attr-defined]
    busy_wait(lambda: not (target / "big2").exists())
    busy_wait(lambda: len(spool_fds(pid, target)) == 1)  # gone with its last value


def test_spools_pinned_by_keys_that_never_change_are_made_one(tmp_path: Path) -> None:
    """Ten keys change every round, and with them one key that will never change again:
    each spill's spool is then pinned by that one value, and the rest of it is old
    values. The spools must not keep growing (disk, and a descriptor each): at most
    twice the current values plus a spill, in at most MAX_SPOOLS files."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    intake.spill_bytes = 1000
    for round_ in range(200):
        changes = [Change(b"/p/warm%d" % i, os.urandom(100)) for i in range(10)]
        changes.append(Change(b"/p/cold%d" % round_, b"c%d" % round_))
        intake.absorb(Batch(round_ + 2, changes))
        spill_all(intake)
        use = intake.tree.spool_use()
        assert len(use) <= MAX_SPOOLS
        assert sum(s.size for s in use) <= 2 * sum(use.values()) + 2 * intake.spill_bytes
    assert intake.tree.held == 0  # every round spilled
    assert all(intake.tree.files[f"warm{i}"] == changes[i].value for i in range(10))
    assert all(intake.tree.files[f"cold{i}"] == b"c%d" % i for i in range(200))
    assert len(spool_fds("self", tmp_path)) <= MAX_SPOOLS


def test_spools_of_values_still_current_are_made_one_past_max_spools(tmp_path: Path) -> None:
    """New keys only (nothing replaced, so nothing wasted): the spills still end in at
    most MAX_SPOOLS files, not one more file (and descriptor) per spill."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    intake.spill_bytes = 1000
    for round_ in range(3 * MAX_SPOOLS):
        changes = [Change(b"/p/k%d-%d" % (round_, i), b"v" * 100) for i in range(10)]
        intake.absorb(Batch(round_ + 2, changes))
        spill_all(intake)
        assert len(intake.tree.spool_use()) <= MAX_SPOOLS
    assert len(intake.tree.files) == 30 * MAX_SPOOLS


def corrupted(spool: Spool, ref: Spooled) -> Spooled:
    """``ref``'s value overwritten in its spool (a failing disk, or someone with our fd)."""
    os.pwrite(spool._fd, b"X" * ref.size, spool.span(ref.index)[0])
    return ref


def test_a_value_that_cannot_be_read_back_skips_its_key_and_etcd_is_asked_again(
    tmp_path: Path,
) -> None:
    """One lost value must not stop the others (it once failed the whole snapshot, for
    ever): its key is skipped, and the publisher asks for everything again."""
    writer = SnapshotWriter(tmp_path / "config")
    writer.recover()
    rereads: list[int] = []
    publisher = Publisher(
        writer,
        queue.Queue(),
        b"/p/",
        lambda: None,
        Stats(),
        rules=Rules(reread=lambda: rereads.append(1)),
    )
    spool = Spool(opened(tmp_path))
    good, lost = spool.add([b"good", b"lost"])
    publisher.inbox.put(FullRead(2, [(b"/p/a", good), (b"/p/b", corrupted(spool, lost))]))
    publisher.inbox.put(Ended())
    publisher.run()
    assert read_tree(tmp_path / "config") == {"a": b"good"}
    assert rereads == [1]
    publisher.inbox.put(FullRead(3, [(b"/p/a", b"good"), (b"/p/b", b"lost")]))  # read again
    publisher.inbox.put(Ended())
    publisher.run()
    assert read_tree(tmp_path / "config") == {"a": b"good", "b": b"lost"}
    assert rereads == [1]


def test_a_value_lost_after_the_flip_does_not_publish_the_change_again(tmp_path: Path) -> None:
    """What reads values once a change is live (the expiry of certificates, status,
    --verify-tls) must not turn a lost value into a failed write (the change was
    published and signalled twice)."""
    writer = SnapshotWriter(tmp_path / "config")
    writer.recover()
    signals: list[int] = []
    publisher = Publisher(writer, queue.Queue(), b"/p/", lambda: signals.append(1) or None, Stats())
    publisher.inbox.put(FullRead(2, [(b"/p/a", b"1")]))
    publisher.inbox.put(Ended())
    publisher.run()
    spool = Spool(opened(tmp_path))
    ref = spool.add([b"2"])[0]

    def lost_on_second_read(files: object, changed: object) -> None:
        corrupted(spool, ref)  # written already; lost before the expiry is read
        real_update(files, changed)  # type: ignore[arg-type]

    real_update = publisher.expiry.update
    publisher.expiry.update = lost_on_second_read  # type: ignore[method-assign]
    publisher.inbox.put(Batch(3, [Change(b"/p/a", ref)]))
    publisher.inbox.put(Ended())
    publisher.run()
    assert signals == [1]  # once
    assert publisher.stats.write_failures == 0


def test_values_of_keys_the_rules_leave_out_are_not_kept(tmp_path: Path) -> None:
    """A full read spools every value under the prefix; --include may take a few: the
    rest must not stay on disk for as long as those few are current."""
    intake = KeyIntake(b"/p/", 4096, KeySelection(include=("keep*",)), spool_at=opened(tmp_path))
    spool = Spool(opened(tmp_path))
    kvs = [(b"/p/skip%d" % i, b"s" * 10_000) for i in range(200)] + [(b"/p/keep", b"k")]
    values = spool.add([v for _, v in kvs])
    intake.absorb(FullRead(2, list(zip([k for k, _ in kvs], values, strict=True))))
    del spool, kvs, values
    spill_all(intake)  # between changes, after the first snapshot
    gc.collect()
    use = intake.tree.spool_use()
    assert sum(use.values()) == 1 and sum(s.size for s in use) <= 2
    assert len(spool_fds("self", tmp_path)) == 1
    assert intake.tree.files == {"keep": b"k"}


def test_a_spill_that_failed_is_not_tried_again_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the spill is not retried (a scan and a write each time) at every
    housekeeping step, only once as much again is held."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    intake.spill_bytes = 1000
    tries: list[int] = []

    def full(self: Spool, values: object) -> None:
        tries.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "add", full)
    intake.absorb(Batch(2, [Change(b"/p/a", b"a" * 1000)]))
    for _ in range(50):
        intake.spill()
    assert tries == [1]
    intake.absorb(Batch(3, [Change(b"/p/b", b"b" * 1000)]))
    for _ in range(50):
        intake.spill()
    assert tries == [1, 1]
    assert intake.tree.files == {"a": b"a" * 1000, "b": b"b" * 1000}


def test_a_spool_goes_where_the_writer_writes_not_where_the_path_points(tmp_path: Path) -> None:
    """The target's path replaced by a link elsewhere: values (private keys) never follow."""
    target, elsewhere = tmp_path / "config", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    held = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    target.rename(tmp_path / "moved")
    target.symlink_to(elsewhere)
    spool = open_spool(held)
    assert spool is not None
    assert spool_fds("self", tmp_path / "moved") != []
    assert spool_fds("self", elsewhere) == []
    del spool
    os.close(held)


def test_a_spool_pinned_by_the_last_of_many_deleted_keys_is_drained(tmp_path: Path) -> None:
    """Deletes hold nothing new in memory, so they never made a spill: a full read's
    spool stayed whole, pinned by the one key left."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    spool = Spool(opened(tmp_path))
    values = spool.add([b"v" * 10_000 for _ in range(100)])
    intake.absorb(FullRead(2, [(b"/p/k%d" % i, v) for i, v in enumerate(values)]))
    del spool, values
    intake.absorb(Batch(3, [Change(b"/p/k%d" % i, None) for i in range(1, 100)]))
    spill_all(intake)
    use = intake.tree.spool_use()
    assert sum(s.size for s in use) <= 2 * sum(use.values())
    gc.collect()
    assert len(spool_fds("self", tmp_path)) == 1
    assert intake.tree.files == {"k0": b"v" * 10_000}


def test_the_publisher_does_not_keep_a_full_read_once_absorbed(tmp_path: Path) -> None:
    """It waited for the next event still holding the last one: a full read's whole
    list, and its spool with the values of keys the rules leave out, for hours."""
    writer = SnapshotWriter(tmp_path / "config")
    writer.recover()
    inbox: queue.Queue[Event] = queue.Queue()
    rules = Rules(selection=KeySelection(include=("keep",)))
    publisher = Publisher(writer, inbox, b"/p/", lambda: None, Stats(), rules=rules)
    thread = publisher.start()
    try:
        spool = Spool(opened(tmp_path))
        kvs = [(b"/p/skip%d" % i, b"s" * 1000) for i in range(300)] + [(b"/p/keep", b"k")]
        values = spool.add([v for _k, v in kvs])
        inbox.put(FullRead(2, [(k, v) for (k, _v), v in zip(kvs, values, strict=True)]))
        del spool, values
        busy_wait(lambda: (tmp_path / "config" / "keep").exists())
        busy_wait(lambda: len(spool_fds("self", tmp_path / "config")) == 1)  # drained into
        busy_wait(lambda: spool_fds("self", tmp_path) == [])  # and the event not held
    finally:
        inbox.put(Ended())
        thread.join(10)


def test_a_lost_value_is_made_again_at_the_next_full_read(tmp_path: Path) -> None:
    """The next full read brings the same value: by digest nothing changed, but what was
    made of it (its file, its expiry, its status digest) was not: it counts as changed."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    spool = Spool(opened(tmp_path))
    a, b = spool.add([b"A", b"B"])
    intake.absorb(FullRead(2, [(b"/p/a", a), (b"/p/b", b)]))
    corrupted(spool, a)
    with pytest.raises(SpoolError):
        intake.tree.files["a"]
    assert intake.lost() and not intake.lost()  # said once
    again = Spool(opened(tmp_path)).add([b"A", b"B"])
    changed = intake.absorb(FullRead(3, [(b"/p/a", again[0]), (b"/p/b", again[1])]))
    assert changed == {"a"}
    assert intake.tree.files["a"] == b"A"


@pytest.mark.parametrize("when", ["watching", "right after the full read"])
def test_a_reread_reads_everything_again_and_is_no_etcd_failure(
    etcd_server: object, etcd: object, prefix: str, tmp_path: Path, when: str
) -> None:
    """What the publisher asks for when a value is lost from its spool: a new full read,
    at once, not counted as an etcd failure nor backed off; also when no watch is open
    yet (the publisher may find the loss in the full read just put in its inbox)."""
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    endpoint = etcd_server.endpoint  # type: ignore[attr-defined]
    source = EtcdSource(load({"ETCD_ENDPOINTS": endpoint}), prefix.encode())
    inbox: queue.Queue[Event] = queue.Queue()
    stats = Stats()
    session = EtcdSession(source, inbox, stats, spool_at=opened(tmp_path))
    threading.Thread(target=session.run, daemon=True).start()
    try:
        assert isinstance(inbox.get(timeout=10), FullRead)
        if when == "watching":
            busy_wait(lambda: source._stream is not None)
        session.reread()
        again = inbox.get(timeout=10)
    finally:
        session.stop()
    assert isinstance(again, FullRead)
    assert {k: as_bytes(v) for k, v in again.kvs} == {(prefix + "a").encode(): b"1"}
    assert stats.etcd_failures == 0


def test_a_run_of_spooled_values_is_a_sequence_of_them(tmp_path: Path) -> None:
    """``Spool.add`` gives one object for a page; indexing it (from either end, or by a
    slice) gives the values of that page, and nothing past its ends."""
    spool = Spool(opened(tmp_path))
    spool.add([b"before"])
    run = spool.add([b"a", b"b", b"c"])
    assert len(run) == 3
    assert [v.read() for v in run] == [b"a", b"b", b"c"]
    assert run[-1].read() == b"c" and run[0].read() == b"a"
    assert [v.read() for v in run[1:]] == [b"b", b"c"]
    for outside in (3, -4):
        with pytest.raises(IndexError):
            run[outside]


def test_a_full_read_keeps_its_pairs_in_order_page_by_page(tmp_path: Path) -> None:
    """KeyValues gives back every (key, value) in the order the pages came, and refuses a
    page whose keys and values do not pair up (a bug, never a half-paired read)."""
    spool = Spool(opened(tmp_path))
    kvs = KeyValues()
    kvs.add([b"/p/a", b"/p/b"], spool.add([b"1", b"2"]))
    kvs.add([b"/p/c"], [b"3"])
    assert len(kvs) == 3
    assert [(k, as_bytes(v)) for k, v in kvs] == [(b"/p/a", b"1"), (b"/p/b", b"2"), (b"/p/c", b"3")]
    assert (b"/p/c", b"3") in kvs
    assert all(pair in kvs for pair in kvs)  # a spooled value too, though made anew
    assert (b"/p/a", b"2") not in kvs
    with pytest.raises(ValueError):
        kvs.add([b"/p/d"], [])
    assert len(kvs) == 3


def test_a_drain_is_made_a_step_at_a_time_while_keys_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full read's spool left mostly stale by deletes is drained a page at a time
    (one write of at most MOVE_PAGE values a step, a change never waits for all of
    it), while keys change and go between the steps: the files are always etcd's,
    and the drained spool goes at the end."""
    intake = KeyIntake(b"/p/", 4096, spool_at=opened(tmp_path))
    spool = Spool(opened(tmp_path))
    model = {f"k{i:04d}": b"%d" % i * 50 for i in range(1000)}
    values = spool.add(list(model.values()))
    intake.absorb(
        FullRead(2, [(b"/p/" + k.encode(), v) for k, v in zip(model, values, strict=True)])
    )
    del spool, values
    deleted = [k for i, k in enumerate(sorted(model)) if i % 5 < 3]  # 600 of them
    intake.absorb(Batch(3, [Change(b"/p/" + k.encode(), None) for k in deleted]))
    for k in deleted:
        del model[k]
    writes: list[int] = []
    real_add = Spool.add

    def add(self: Spool, values: list[bytes]) -> object:
        writes.append(len(values))
        return real_add(self, values)

    monkeypatch.setattr(Spool, "add", add)
    steps, left = 0, sorted(model)
    while intake.spill():
        steps += 1
        if left:  # a change between two steps: one key replaced, one deleted
            changed, gone = left.pop(), left.pop(0)
            model[changed] = b"new " + changed.encode()
            del model[gone]
            batch = [Change(b"/p/" + changed.encode(), model[changed])]
            intake.absorb(Batch(4 + steps, [*batch, Change(b"/p/" + gone.encode(), None)]))
        assert dict(intake.tree.files) == model
    assert max(writes) <= MOVE_PAGE  # a page a step, not one go
    assert sum(writes) >= 300  # the 400 values still current, but those changed meanwhile
    gc.collect()
    assert len(spool_fds("self", tmp_path)) <= 1  # the full read's spool is gone
    assert dict(intake.tree.files) == model


def test_the_publisher_steps_a_drain_through_even_with_nothing_else_to_do(
    tmp_path: Path,
) -> None:
    """Housekeeping stays due while a drain is unfinished: steps of a drain are not left
    to wait for the next change or the next spare."""
    writer = SnapshotWriter(tmp_path / "config")
    writer.recover()
    inbox: queue.Queue[Event] = queue.Queue()
    publisher = Publisher(writer, inbox, b"/p/", lambda: None, Stats())
    thread = publisher.start()
    try:
        spool = Spool(opened(tmp_path))
        big = [b"/p/big%02d" % i for i in range(40)]  # most of the bytes, in few keys
        keys = [b"/p/k%04d" % i for i in range(3000)]
        values = spool.add([b"b" * 10_000] * len(big) + [b"v" * 100] * len(keys))
        inbox.put(FullRead(2, list(zip(big + keys, values, strict=True))))
        del spool, values
        busy_wait(lambda: (tmp_path / "config" / "k2999").exists())
        time.sleep(1.5)  # the spares are made; nothing is due for a while
        (full_read,) = publisher.keys.tree.spool_use()
        # 40 deletes (little for the spares to catch up on) leave the spool more than
        # half stale: 3,000 values to move, about 90 steps.
        inbox.put(Batch(3, [Change(k, None) for k in big]))
        busy_wait(lambda: not (tmp_path / "config" / "big00").exists())
        busy_wait(lambda: full_read not in publisher.keys.tree.spool_use(), timeout=3)
    finally:
        inbox.put(Ended())
        thread.join(10)


def test_a_full_read_asks_for_pages_of_about_a_mebibyte() -> None:
    """etcd 3.4 looks at every key left in the range for each page: few big pages when the
    values are small, pages of READ_PAGE when they are big (a page is in memory twice)."""
    assert next_page(100, 100 * 1024) == 256  # 1 KiB values: 256 KiB pages
    assert next_page(100, 100 * 100) == READ_PAGE_MOST  # 100-byte values
    assert next_page(100, 100 * 100_000) == READ_PAGE  # 100 KB values: never fewer
    assert next_page(100, 0) == READ_PAGE_MOST  # empty values
    assert next_page(0, 0) == READ_PAGE  # nothing seen: as the first page


def test_a_value_lost_in_the_last_step_of_a_drain_is_read_again_at_once(
    tmp_path: Path,
) -> None:
    """The drain's last step finds a value it cannot read back: etcd is asked for
    everything at once, not at the next change (there may be none for hours), nor at
    the writer's next housekeeping (30 s away here: its grace)."""
    writer = SnapshotWriter(tmp_path / "config", grace=30)
    writer.recover()
    inbox: queue.Queue[Event] = queue.Queue()
    rereads = threading.Event()
    rules = Rules(reread=rereads.set)
    publisher = Publisher(writer, inbox, b"/p/", lambda: None, Stats(), rules=rules)
    thread = publisher.start()
    try:
        spool = Spool(opened(tmp_path))
        big = [b"/p/big%02d" % i for i in range(40)]
        keys = [b"/p/k%04d" % i for i in range(300)]
        values = spool.add([b"b" * 10_000] * len(big) + [b"v" * 100] * len(keys))
        inbox.put(FullRead(2, list(zip(big + keys, values, strict=True))))
        busy_wait(lambda: (tmp_path / "config" / "k0299").exists())
        time.sleep(1.0)  # the spares are made; nothing is due for a while
        corrupted(spool, values[len(big)])  # k0000: in the last page a drain moves
        del spool, values
        inbox.put(Batch(3, [Change(k, None) for k in big]))  # the spool: mostly stale
        assert rereads.wait(3)
    finally:
        inbox.put(Ended())
        thread.join(10)


def readlink(pid: int, fd: str) -> str | None:
    """Where the process's descriptor ``fd`` points; None once it is closed (the process
    opens and closes descriptors of its own meanwhile: sockets, directories)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def test_the_dispenser_reads_everything_again_when_a_value_is_lost(
    etcd: object, prefix: str, target: Path, dispenser: Callable[..., DispenserProcess]
) -> None:
    """The real process and its wiring: a value overwritten in its spool (a failing disk,
    or someone with the descriptor) is found when the spool is drained; etcd is asked
    for everything again at once, and the file stays etcd's value."""
    etcd.put(prefix + "a", b"A" * 100)  # type: ignore[attr-defined]
    big = [f"{prefix}big{i:02d}" for i in range(40)]
    for key in big:
        etcd.put(key, b"b" * 10_000)  # type: ignore[attr-defined]
    proc = dispenser(*CATCHES_HUP)
    busy_wait(lambda: (target / "big39").exists())
    pid = proc.proc.pid
    (held,) = spool_fds(pid, target)  # the full read's spool, as /proc shows it
    (fd,) = [n for n in os.listdir(f"/proc/{pid}/fd") if readlink(pid, n) == held]
    spool = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY)
    try:
        os.pwrite(spool, b"X" * 100, 0)  # "a" comes first in etcd's order: its value
    finally:
        os.close(spool)
    deletes = [etcd.transactions.delete(key) for key in big]  # type: ignore[attr-defined]
    etcd.transaction(compare=[], success=deletes, failure=[])  # type: ignore[attr-defined]
    busy_wait(lambda: re.search(r"r\d+: reading everything again", proc.log()))
    assert (target / "a").read_bytes() == b"A" * 100
    etcd.put(prefix + "a", b"after")  # type: ignore[attr-defined]
    busy_wait(lambda: (target / "a").read_bytes() == b"after")
