"""Invariants a one-line slip would break silently: each test here failed against such a slip.

Durability before the flip, the default grace period, the watch starting
after the read, the repair of top-level links after a failure.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import Clock, EtcdServer, dir_files, read_tree, writer_with

from etcd_config_dispenser import snapshot
from etcd_config_dispenser.events import Batch, FullRead
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.layout import DATA_LINK, TMP_LINK
from etcd_config_dispenser.links import TopLinks
from etcd_config_dispenser.snapshot import SnapshotWriter


@pytest.mark.parametrize("others", [0, 200], ids=["2 files", "a spare made in steps"])
def test_new_files_and_their_directory_are_synced_before_the_flip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, others: int
) -> None:
    """Power loss right after the flip must find the new files on disk, and every
    directory of the snapshot made live: a spare made a few links at a time too."""
    target = tmp_path / "config"
    writer = SnapshotWriter(target)
    writer.recover()
    tree = KeyTree()
    tree.put("cert", b"1")
    tree.put("sub/key", b"1")
    for i in range(others):
        tree.put(f"d{i % 20:02d}/f{i:03d}", b"x")
    writer.publish(tree.files, set(tree.files), 1)
    writer.settle()
    events: list[tuple[str, int]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src: str, dst: str, **kwargs: object) -> None:
        events.append((f"rename {src} {dst}", 0))
        real_rename(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    while writer.maintain(step=0.0) is not None and writer.ledger.growing is not None:
        pass  # the spares, a step at a time, as the publisher makes them
    changed = tree.put("cert", b"2") | tree.put("sub/key", b"2")
    assert writer.publish(tree.files, changed, 2)
    monkeypatch.undo()
    flip = events.index((f"rename {TMP_LINK} {DATA_LINK}", 0))
    synced = {ino for kind, ino in events[:flip] if kind == "fsync"}
    live = target / DATA_LINK
    for path in (live / "cert", live / "sub" / "key", live / "sub", live):
        assert os.stat(path).st_ino in synced, path
    for i in range(min(others, 20)):
        assert os.stat(live / f"d{i:02d}").st_ino in synced, f"d{i:02d}"


def test_a_retired_snapshot_is_left_alone_for_the_default_grace_period(tmp_path: Path) -> None:
    """A reader that resolved ..data just before a flip still reads one whole revision."""
    assert snapshot.GRACE >= 0.1
    clock = Clock()
    writer = SnapshotWriter(tmp_path / "config", clock=clock)  # the default grace
    writer.recover()
    tree = KeyTree()
    writer.publish(tree.files, tree.put("cert", b"1") | tree.put("key", b"1"), 1)
    writer.settle()
    writer.maintain()
    old = tmp_path / "config" / os.readlink(tmp_path / "config" / DATA_LINK)
    writer.publish(tree.files, tree.put("cert", b"2") | tree.put("key", b"2"), 2)
    writer.settle()
    clock.now += snapshot.GRACE * 0.9
    writer.maintain()
    assert dir_files(old) == {"cert": b"1", "key": b"1"}  # untouched within the grace
    clock.now += snapshot.GRACE * 0.2
    writer.maintain()
    assert not old.exists() or dir_files(old) == {"cert": b"2", "key": b"2"}  # then not stale


def test_the_watch_starts_right_after_the_revision_read(etcd_server: EtcdServer) -> None:
    """Watching from the read revision itself would deliver its last change twice."""
    from etcd_config_dispenser.config import load
    from etcd_config_dispenser.health import Stats
    from etcd_config_dispenser.session import EtcdSession
    from etcd_config_dispenser.source import EtcdSource

    prefix = "/invariants/watch/"
    client = etcd_server.client()
    try:
        client.put(prefix + "before", b"1")
        inbox: queue.Queue[object] = queue.Queue()
        source = EtcdSource(load({"ETCD_ENDPOINTS": etcd_server.endpoint}), prefix.encode())
        session = EtcdSession(source, inbox, Stats())  # type: ignore[arg-type]
        thread = threading.Thread(target=session.run, daemon=True)
        thread.start()
        try:
            first = inbox.get(timeout=10)
            assert isinstance(first, FullRead)
            client.put(prefix + "after", b"2")
            batch = inbox.get(timeout=10)
        finally:
            session.stop()
            thread.join(10)
    finally:
        client.close()
    assert isinstance(batch, Batch)
    assert batch.revision == first.revision + 1
    assert [c.key for c in batch.changes] == [(prefix + "after").encode()]


def test_a_failed_link_is_repaired_by_the_next_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is live even when a top-level link could not be made: the next change
    mends every link, not only its own."""
    target = tmp_path / "config"
    writer = SnapshotWriter(target, grace=0.0)
    writer.recover()
    tree = KeyTree()
    writer.publish(tree.files, tree.put("a", b"1"), 1)
    writer.settle()
    real_symlink = os.symlink

    def failing(src: str, dst: str, **kwargs: object) -> None:
        if dst == "b":
            raise OSError(errno.EIO, "I/O error")
        real_symlink(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "symlink", failing)
    writer.publish(tree.files, tree.put("b", b"1"), 2)
    monkeypatch.undo()
    assert read_tree(target) == {"a": b"1"}  # b is live, but not reachable yet
    writer.publish(tree.files, tree.put("c", b"1"), 3)
    assert read_tree(target) == {"a": b"1", "b": b"1", "c": b"1"}


def test_links_track_presence_not_arrival_order() -> None:
    """A top-level name has files while any file under it does, whatever came first."""
    links = TopLinks()
    links._reset({"d/x", "d/y", "f"})
    assert links._track({"d/x": False}) == {"d"}
    assert links._has_files("d") and links._has_files("f")
    assert links._track({"d/y": False, "f": False}) == {"d", "f"}
    assert not links._has_files("d") and not links._has_files("f")
    links._track({"d/z/w": True})
    assert links._has_files("d")


@pytest.mark.parametrize(
    "interval, copy_cost, housekeeping",
    [(0.003, 0.0, True), (0.001, 0.0, True), (0.001, 0.3, True), (0.001, 0.0, False)],
    ids=["3 ms apart", "1 ms apart", "copies slower than grace", "no housekeeping between"],
)
def test_changes_back_to_back_reuse_spares_instead_of_copying_every_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interval: float,
    copy_cost: float,
    housekeeping: bool,
) -> None:
    """A burst at 2,000 files: a change that finds every spare in its grace waits for the
    oldest (never past MIN_GRACE) rather than copy every file, the rotation grows to cover
    the rate, and no directory retired less than MIN_GRACE before is ever touched."""
    clock = Clock()
    target = tmp_path / "config"
    writer, tree = writer_with(target, 2000, clock=clock, sleep=clock.sleep)  # default graces
    writer.maintain()
    copies: list[str] = []
    real_copy = writer._maker.copy

    def counting_copy(*args: object, **kwargs: object) -> list[str]:
        copies.append(str(args[2]))
        clock.now += copy_cost
        return real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer._maker, "copy", counting_copy)
    retired: dict[str, tuple[float, dict[str, bytes]]] = {}
    live = os.readlink(target / DATA_LINK)
    waits: list[float] = []
    for revision in range(2, 152):
        clock.now += interval
        before = clock.now
        writer.publish(tree.files, tree.put("k0007", str(revision).encode()), revision)
        waits.append(clock.now - before)
        # Retired less than MIN_GRACE before the publish ended (it may have waited for
        # the oldest one's grace to end, and taken it): still there, still as it was.
        young = {  # (less a nanosecond: the writer adds, ``t + MIN_GRACE``, where this subtracts)
            n: f for n, (t, f) in retired.items() if clock.now - t < snapshot.MIN_GRACE - 1e-9
        }
        for name, files in young.items():
            assert {p: (target / name / p).read_bytes() for p in files} == files
        retired[live] = (clock.now, {"k0007": (target / live / "k0007").read_bytes()})
        live = os.readlink(target / DATA_LINK)
        writer.settle()
        if housekeeping:  # the publisher skips it when the next change is already waiting
            writer.maintain(step=0.0)  # one step of a spare being made, as between changes
    assert read_tree(target)["k0007"] == b"151"
    assert copies == []  # a copy of 2,000 files costs more than waiting 5 ms
    assert max(waits) <= snapshot.MIN_GRACE + 1e-9
    if not housekeeping:  # spares are made between changes: none made, waits go on
        return
    if interval * writer.ledger.most_spares >= snapshot.MIN_GRACE:
        assert waits[-50:] == [0.0] * 50  # grown to cover the rate: no change waits now
    else:
        assert writer.ledger.wanted == writer.ledger.most_spares


READER = """
import json, os, sys, time
target, stop, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
reads = slow = 0
bad = {"enoent": 0, "mixed": 0, "linked_enoent": 0, "empty": 0}
while not os.path.exists(stop):
    started = time.monotonic()
    try:
        name = os.readlink(os.path.join(target, "..data"))  # resolved once
        with open(os.path.join(target, name, "cert.pem"), "rb") as f:
            cert = f.read()
        with open(os.path.join(target, name, "key.pem"), "rb") as f:
            key = f.read()
        problem = None if cert.split(b":")[0] == key.split(b":")[0] else "mixed"
    except FileNotFoundError:
        problem = "enoent"
    if problem and time.monotonic() - started >= grace:
        slow += 1  # descheduled past the grace in the middle: outside the promise
    elif problem:
        bad[problem] += 1
    started = time.monotonic()
    try:  # through the top-level link, as nginx opens it: always whole
        with open(os.path.join(target, "key.pem"), "rb") as f:
            bad["empty"] += not f.read()
    except FileNotFoundError:  # unless one open was descheduled past the grace (as above)
        if time.monotonic() - started >= grace:
            slow += 1
        else:
            bad["linked_enoent"] += 1
    reads += 1
print(json.dumps({"reads": reads, "slow": slow, **bad}))
"""


def test_readers_of_one_resolved_data_see_whole_revisions_during_a_burst(tmp_path: Path) -> None:
    """A reader process in a tight loop reads a certificate and its key through one
    resolved ``..data``, and the key through its top-level link, while one-pair changes
    come back to back at 10,000 keys, with the publisher's housekeeping between them
    (spares made a step at a time, waits for the shorter grace). When a read took less
    than MIN_GRACE (the promise; a reader descheduled longer under load is counted
    apart): through the link, never ENOENT, never empty; through the resolved
    directory, never ENOENT, never a pair from two revisions."""
    target = tmp_path / "config"
    writer = SnapshotWriter(target)
    writer.recover()
    tree = KeyTree()
    for i in range(10_000):
        tree.put(f"other-{i:05d}", b"x")
    tree.put("cert.pem", b"1:cert")
    tree.put("key.pem", b"1:key")
    writer.publish(tree.files, set(tree.files), 1)
    writer.settle()
    writer.maintain()
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(target), str(stop), str(snapshot.MIN_GRACE)],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.2)  # the reader is reading
        for revision in range(2, 302):
            changed = tree.put("cert.pem", b"%d:cert" % revision)
            changed |= tree.put("key.pem", b"%d:key" % revision)
            writer.publish(tree.files, changed, revision)
            writer.settle()
            writer.maintain(step=0.0005)  # as the publisher does between changes
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    counts = json.loads(out)
    assert counts["reads"] > 100
    assert counts["slow"] < counts["reads"] / 10, counts
    bad = {k: v for k, v in counts.items() if k not in ("reads", "slow") and v}
    assert bad == {}, counts
    assert writer.ledger.wanted > snapshot.MAX_SPARES  # the burst found spares in grace
