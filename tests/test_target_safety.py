"""The target is the dispenser's own: it follows, adopts and removes only what it can prove it made.

Black-box: the real CLI (``--once``, or as a sidecar) against the real etcd, over a target
seeded with entries under every name the snapshot machinery uses (``..data``,
``..data_tmp``, ``..link_tmp``, ``..pool``, snapshot names, other ``..`` names, top-level
names) and of every kind (links out of the target, relative ``..`` links, chains of links,
files, directories, a ``..pool`` holding what it never holds). Next to the target is a
sentinel directory holding files, some named like the keys: every run must leave it (and
everything else outside the target) exactly as it was.

The rule checked: an entry is the dispenser's own only if its name is one it makes, it sits
directly in the target and its type (by lstat) is right: a snapshot is a real directory;
``..data`` is a symlink whose text is one snapshot name, naming a real directory;
``..data_tmp`` and ``..link_tmp`` are symlinks; ``..pool`` is a real directory of empty
regular files with decimal names; a top-level name is a symlink ``NAME -> ..data/NAME``.
A target holding only such entries is recovered (the leftovers of a crash removed) and the
run succeeds; any other entry makes the start fail with exit code 1 and an error naming it,
before anything in the target is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from helpers import DispenserProcess, read_tree, txn_put, wait_tree
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]
Fingerprint = dict[str, tuple[object, ...]]

SNAPSHOT = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}\.r\d+")
SNAP_LIVE = "..2020_01_02_03_04_05.000000001.r7"  # what a planted ``..data`` names
SNAP_OTHER = "..2021_02_03_04_05_06.000000002.r9"  # a snapshot name ``..data`` does not name
CHAIN_SNAP = "..2022_03_04_05_06_07.000000003.r11"  # a snapshot-named link out, for chains

KEYS = {"cert.pem": b"etcd cert", "sub/c.txt": b"etcd deep"}
# Named like the keys and like pool files: a write, unlink or rename through a link that
# leads here shows up as a changed sentinel.
SENTINEL_FILES = {
    "cert.pem": b"sentinel cert",
    "sub/c.txt": b"sentinel deep",
    "keep": b"keep me",
    "900001": b"",
}

LINK_KINDS = ("abs_link", "rel_link", "dotdot_link", "chain", "data_ref", "snap_ref")
DIR_KINDS = (
    "empty_dir",
    "dir_with_file",
    "dir_with_links",
    "pool_ok",
    "pool_nonempty",
    "pool_hardlink",
    "pool_subdir",
    "pool_badname",
)
KINDS = (*LINK_KINDS, "file", *DIR_KINDS)  # "root_link" only in the table, see there
NAMES = (
    "..data",
    "..data_tmp",
    "..link_tmp",
    "..pool",
    SNAP_LIVE,
    SNAP_OTHER,
    "..x",
    "..2020_01_01",  # snapshot-like, but not a snapshot name
    "...",
    "cert.pem",  # a top-level name the keys also have
    "top",  # one they do not
)
POOL_PLANTED = ("900001", "900002")  # the empty files of a planted legitimate ``..pool``


def make_entry(target: Path, sentinel: Path, name: str, kind: str) -> None:
    """Plant one entry ``name`` of ``kind`` directly in ``target``."""
    path = target / name
    links = {
        "abs_link": str(sentinel),
        "rel_link": f"../{sentinel.name}",  # target and sentinel are siblings
        "dotdot_link": "..",
        "root_link": "/",
        "chain": CHAIN_SNAP,
        "data_ref": f"..data/{name}",
        "snap_ref": SNAP_LIVE,
    }
    if kind in links:
        os.symlink(links[kind], path)
        return
    if kind == "file":
        path.write_bytes(b"planted " + name.encode())
        return
    path.mkdir()
    if kind == "dir_with_file":
        (path / "cert.pem").write_bytes(b"planted inside " + name.encode())
    elif kind == "dir_with_links":  # key-named and pool-named links into the sentinel
        os.symlink(sentinel / "cert.pem", path / "cert.pem")
        os.symlink(sentinel / "sub", path / "sub")
        os.symlink(sentinel / "900001", path / "900005")
    elif kind == "pool_ok":
        for pooled in POOL_PLANTED:
            (path / pooled).touch()
    elif kind == "pool_nonempty":  # what a crash between write and rename leaves
        (path / "900003").write_bytes(b"not empty")
    elif kind == "pool_hardlink":  # a second name of a file outside: not one we made
        os.link(sentinel / "900001", path / "900006")
    elif kind == "pool_subdir":
        (path / "900004").mkdir()
    elif kind == "pool_badname":
        (path / "x").touch()
    else:
        assert kind == "empty_dir", kind


def completed(entries: Mapping[str, str]) -> dict[str, str]:
    """``entries`` and what their links name: every entry that will be planted."""
    planted = dict(entries)
    if "snap_ref" in planted.values() and SNAP_LIVE not in planted:
        planted[SNAP_LIVE] = "dir_with_file"  # the snapshot a previous run served
    if "chain" in planted.values():
        planted[CHAIN_SNAP] = "abs_link"  # ..data -> CHAIN_SNAP -> sentinel
    return planted


def plant(target: Path, sentinel: Path, entries: Mapping[str, str]) -> dict[str, str]:
    """Plant ``entries`` (name -> kind) and what their links name; return all that was planted."""
    planted = completed(entries)
    target.mkdir(parents=True)
    for name, kind in planted.items():
        make_entry(target, sentinel, name, kind)
    return planted


def is_legit(name: str, kind: str, planted: Mapping[str, str]) -> bool:
    """The oracle: could the dispenser have left this entry (a crash's leftovers included)?"""
    if name == "..data":
        return kind == "snap_ref" and planted.get(SNAP_LIVE) in DIR_KINDS
    if name in ("..data_tmp", "..link_tmp"):
        return kind in LINK_KINDS or kind == "root_link"  # a symlink: unlinked, never followed
    if name == "..pool":  # pool files of ours: regular, one link, any content (a crash)
        return kind in ("empty_dir", "pool_ok", "pool_nonempty")
    if SNAPSHOT.fullmatch(name):
        return kind in DIR_KINDS  # a real directory; what it holds is removed, not followed
    if name.startswith(".."):
        return False
    return kind == "data_ref"


def expectation(planted: Mapping[str, str]) -> bool | None:
    """True: the run must succeed; False: it must refuse; None: either is right.

    The one open case: ``..data`` names a real snapshot directory that holds links out of
    the target. Removing it later is safe (links are unlinked, not followed), but it is
    served until the first sync, so refusing it is as right as adopting it.
    """
    if not all(is_legit(name, kind, planted) for name, kind in planted.items()):
        return False
    if planted.get("..data") == "snap_ref" and planted.get(SNAP_LIVE) == "dir_with_links":
        return None
    return True


def describe(expected: bool | None) -> str:
    return {True: "success", False: "refusal", None: "success or refusal"}[expected]


def fingerprint(root: Path, skip: str | None = None) -> Fingerprint:
    """Everything under ``root`` by lstat, never following a link: kind, inode, mode,
    link text or file bytes. An empty dict: ``root`` is gone."""
    out: Fingerprint = {}

    def visit(path: Path, rel: str) -> None:
        st_ = os.lstat(path)
        if stat.S_ISLNK(st_.st_mode):
            out[rel] = ("link", st_.st_ino, os.readlink(path))
        elif stat.S_ISREG(st_.st_mode):
            out[rel] = ("file", st_.st_ino, st_.st_mode, path.read_bytes())
        elif stat.S_ISDIR(st_.st_mode):
            out[rel] = ("dir", st_.st_ino, st_.st_mode)
            for child in sorted(os.listdir(path)):
                if rel == "." and child == skip:
                    continue
                visit(path / child, child if rel == "." else f"{rel}/{child}")
        else:
            out[rel] = ("other", st_.st_ino, stat.S_IFMT(st_.st_mode))

    if os.path.lexists(root):
        visit(root, ".")
    return out


def diff(before: Fingerprint, after: Fingerprint) -> str:
    gone = sorted(before.keys() - after.keys())
    new = sorted(after.keys() - before.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return f"removed {gone}, added {new}, changed {changed}"


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]


def names_entry(line: str, name: str) -> bool:
    """``name`` as a whole entry name in ``line`` (``..data`` is not ``..data_tmp``)."""
    return bool(re.search(r"(?:^|[\s/'\"(,:=\[])" + re.escape(name) + r"(?![\w.-])", line))


class Scene:
    """A directory of its own holding the target and, next to it, the sentinel."""

    def __init__(self, base: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="scene-", dir=base))
        self.target = self.root / "config"
        self.sentinel = self.root / "sentinel"
        for rel, value in SENTINEL_FILES.items():
            (self.sentinel / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.sentinel / rel).write_bytes(value)

    def outside(self) -> Fingerprint:
        """Everything in the scene but the target: the sentinel, and anything written beside it."""
        return fingerprint(self.root, skip=self.target.name)


def check_run(
    base: Path,
    prefix: str,
    dispenser: Start,
    entries: Mapping[str, str],
    say: Callable[[str], None] | None = None,
) -> bool:
    """Plant ``entries``, run ``--once`` and check every promise; return whether it succeeded."""
    scene = Scene(base)
    planted = plant(scene.target, scene.sentinel, entries)
    expected = expectation(planted)
    culprits = sorted(n for n, k in planted.items() if not is_legit(n, k, planted))
    if expected is None:
        culprits = ["..data", SNAP_LIVE]
    if say is not None:  # hypothesis' note(), shown with a failing example
        say(f"planted {planted}; expected: {describe(expected)}")
    outside = scene.outside()
    assert outside["sentinel/keep"][0] == "file"
    each = {name: fingerprint(scene.target / name) for name in planted}
    proc = dispenser("--once", f"--prefix={prefix}", f"--target={scene.target}", use_defaults=False)
    code = proc.wait(30)
    log = proc.log()
    context = f"planted {planted}, exit code {code}, log:\n{log}"

    # (1) Outside the target nothing is written, changed or removed: the sentinel above all.
    assert scene.outside() == outside, (
        f"outside the target: {diff(outside, scene.outside())}; {context}"
    )
    assert "Traceback" not in log, context

    if expected is False or (expected is None and code != 0):
        # (3) Refused, with exit code 1 and an error naming an offending entry...
        assert code == 1, f"expected a refusal naming one of {culprits}; {context}"
        errors = error_lines(log)
        assert any(names_entry(line, n) for line in errors for n in culprits), (
            f"no error line names any of {culprits}; {context}"
        )
        # ...at start, not by a publish that failed and was retried...
        assert "etcd sync failed" not in log, f"refused by a failing publish; {context}"
        # ...before anything in the target was removed, changed or added.
        assert sorted(os.listdir(scene.target)) == sorted(planted), context
        for name, was in each.items():
            now = fingerprint(scene.target / name)
            assert now == was, f"{name} changed before the refusal: {diff(was, now)}; {context}"
        return False

    # (2) Recovered and written: everything served lies inside the target, and is the keys.
    assert code == 0, f"expected success (only legitimate leftovers); {context}"
    target = scene.target
    real_target = os.path.realpath(target)
    inside = real_target + os.sep
    data = os.readlink(target / "..data")
    assert SNAPSHOT.fullmatch(data), context
    assert stat.S_ISDIR(os.lstat(target / data).st_mode), context
    assert os.path.realpath(target / "..data") == os.path.join(real_target, data), context
    for name in os.listdir(target):
        path = target / name
        if not name.startswith(".."):
            assert os.readlink(path) == f"..data/{name}", f"{name}: {context}"
            assert os.path.realpath(path).startswith(inside), f"{name}: {context}"
        elif name == "..pool":
            assert stat.S_ISDIR(os.lstat(path).st_mode), context
            for pooled in os.listdir(path):
                st_ = os.lstat(path / pooled)
                assert pooled.isdecimal() and stat.S_ISREG(st_.st_mode), f"{pooled}: {context}"
                assert st_.st_size == 0, f"{pooled}: {context}"
                assert pooled not in POOL_PLANTED, f"planted pool file kept: {context}"
        elif name != "..data":
            assert SNAPSHOT.fullmatch(name), f"{name} left in the target: {context}"
            assert stat.S_ISDIR(os.lstat(path).st_mode), f"{name}: {context}"
    assert read_tree(target) == KEYS, context
    # The leftovers of a crash are gone: all but the snapshot the planted ``..data`` named.
    was_live = SNAP_LIVE if planted.get("..data") == "snap_ref" else None
    left = set(os.listdir(target))
    for name, kind in planted.items():
        if name in ("..data", "..pool", was_live) or name in KEYS:
            continue
        assert name not in left, f"leftover {name} ({kind}) not removed; {context}"
    return True


# (entries planted: name -> kind, expected: True success, False refusal, None either)
TABLE = [
    # ``..data`` that is not a link to a real snapshot directory of the target.
    pytest.param({"..data": "abs_link"}, False, id="data-absolute-link-out"),
    pytest.param({"..data": "rel_link"}, False, id="data-relative-dotdot-link-out"),
    pytest.param({"..data": "dotdot_link"}, False, id="data-link-to-parent"),
    pytest.param({"..data": "chain"}, False, id="data-to-snapshot-named-link-out"),
    pytest.param({"..data": "snap_ref", SNAP_LIVE: "rel_link"}, False, id="data-chain-relative"),
    pytest.param({"..data": "snap_ref", SNAP_LIVE: "file"}, False, id="data-to-snapshot-file"),
    pytest.param({"..data": "data_ref"}, False, id="data-to-itself"),
    pytest.param({"..data": "file"}, False, id="data-regular-file"),
    pytest.param({"..data": "empty_dir"}, False, id="data-empty-dir"),
    pytest.param({"..data": "dir_with_file"}, False, id="data-dir-with-file"),
    # The temporaries are symlinks, nothing else.
    pytest.param({"..data_tmp": "dir_with_file"}, False, id="data-tmp-dir"),
    pytest.param({"..data_tmp": "file"}, False, id="data-tmp-file"),
    pytest.param({"..link_tmp": "file"}, False, id="link-tmp-file"),
    pytest.param({"..link_tmp": "dir_with_links"}, False, id="link-tmp-dir"),
    # ``..pool`` holds empty regular files with decimal names, nothing else.
    pytest.param({"..pool": "abs_link"}, False, id="pool-link-out"),
    pytest.param({"..pool": "file"}, False, id="pool-file"),
    pytest.param({"..pool": "pool_nonempty"}, True, id="pool-file-written-before-a-crash"),
    pytest.param({"..pool": "pool_hardlink"}, False, id="pool-hard-link-out"),
    pytest.param({"..pool": "pool_subdir"}, False, id="pool-subdir"),
    pytest.param({"..pool": "dir_with_links"}, False, id="pool-links-inside"),
    pytest.param({"..pool": "pool_badname"}, False, id="pool-non-decimal-name"),
    # A snapshot is a real directory.
    pytest.param({SNAP_OTHER: "abs_link"}, False, id="snapshot-absolute-link-out"),
    pytest.param({SNAP_OTHER: "dotdot_link"}, False, id="snapshot-link-to-parent"),
    pytest.param({SNAP_OTHER: "file"}, False, id="snapshot-file"),
    # Other ``..`` names, and top-level entries that are not ``NAME -> ..data/NAME``.
    pytest.param({"..x": "dir_with_file"}, False, id="other-dotdot-dir"),
    pytest.param({"..2020_01_01": "empty_dir"}, False, id="snapshot-like-dir"),
    pytest.param({"top": "file"}, False, id="top-file"),
    pytest.param({"cert.pem": "abs_link"}, False, id="top-link-out"),
    pytest.param({"top": "empty_dir"}, False, id="top-dir"),
    # A link to "/" only where every version refuses it before removing anything: a
    # top-level name (never under a name the dispenser removes: that would be the real /).
    pytest.param({"top": "root_link"}, False, id="top-link-to-root"),
    # Legitimate leftovers beside a foreign entry: refused, and none of them removed first.
    pytest.param(
        {
            "..data_tmp": "abs_link",
            SNAP_OTHER: "dir_with_file",
            "..pool": "pool_ok",
            "cert.pem": "data_ref",
            "..data": "abs_link",
        },
        False,
        id="leftovers-and-data-out",
    ),
    # Legitimate: the target of a run that crashed. Recovered, cleaned, written.
    pytest.param({}, True, id="empty"),
    pytest.param({"..data_tmp": "abs_link"}, True, id="ok-data-tmp-link-out"),
    pytest.param({"..data_tmp": "dotdot_link"}, True, id="ok-data-tmp-link-to-parent"),
    pytest.param({"..link_tmp": "rel_link"}, True, id="ok-link-tmp-link"),
    pytest.param({SNAP_OTHER: "dir_with_links"}, True, id="ok-half-built-snapshot-links-out"),
    pytest.param({"..pool": "pool_ok"}, True, id="ok-pool"),
    pytest.param(
        {"..data": "snap_ref", SNAP_LIVE: "dir_with_file", "cert.pem": "data_ref"},
        True,
        id="ok-previous-live-snapshot",
    ),
    pytest.param(
        {"..data": "snap_ref", SNAP_LIVE: "dir_with_links", "cert.pem": "data_ref"},
        None,
        id="either-live-snapshot-holding-links-out",
    ),
    pytest.param(
        {
            "..data": "snap_ref",
            "..data_tmp": "abs_link",
            "..link_tmp": "rel_link",
            SNAP_OTHER: "dir_with_file",
            "..pool": "pool_ok",
            "cert.pem": "data_ref",
            "top": "data_ref",
        },
        True,
        id="ok-all-crash-leftovers",
    ),
]


@pytest.mark.parametrize(("entries", "expected"), TABLE)
def test_planted_entries(
    entries: dict[str, str],
    expected: bool | None,
    etcd: object,
    prefix: str,
    tmp_path: Path,
    dispenser: Start,
) -> None:
    txn_put(etcd, prefix, KEYS)
    planted = completed(entries)
    assert expectation(planted) is expected  # the oracle agrees with the table
    succeeded = check_run(tmp_path, prefix, dispenser, entries)
    assert expected is None or succeeded == expected


@st.composite
def plantings(draw: st.DrawFn) -> dict[str, str]:
    """Up to 4 reserved names with a kind each; half the time only legitimate kinds,
    so that a dispenser refusing every target cannot pass."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    clean = draw(st.booleans())
    entries: dict[str, str] = {}
    for name in names:
        kinds: tuple[str, ...] = KINDS
        if clean:
            kinds = tuple(k for k in KINDS if k != "chain" and is_legit(name, k, {}))
            if name == "..data":
                kinds = ("snap_ref",)  # SNAP_LIVE is a real directory unless drawn otherwise
            if not kinds:
                continue
        entries[name] = draw(st.sampled_from(kinds))
    return entries


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=plantings())
def test_any_planted_entries(
    entries: dict[str, str], etcd: object, prefix: str, tmp_path: Path, dispenser: Start
) -> None:
    event(f"expected: {describe(expectation(completed(entries)))}")
    txn_put(etcd, prefix, KEYS)
    check_run(tmp_path, prefix, dispenser, entries, say=note)


def test_sidecar_does_not_write_through_a_spare_replaced_by_a_link(
    etcd: object, prefix: str, tmp_path: Path, dispenser: Start
) -> None:
    """Between two changes, every snapshot directory but the live one becomes a link to
    the sentinel: the next change is served, and nothing outside the target is touched."""
    scene = Scene(tmp_path)
    target = scene.target
    txn_put(etcd, prefix, KEYS)
    proc = dispenser(f"--prefix={prefix}", f"--target={target}", use_defaults=False)
    wait_tree(target, KEYS, proc)
    etcd.put(prefix + "cert.pem", b"v2")  # type: ignore[attr-defined]
    wait_tree(target, {**KEYS, "cert.pem": b"v2"}, proc)
    time.sleep(0.6)  # past the grace period, and past the work done after the signal
    outside = scene.outside()
    live = os.readlink(target / "..data")
    spares = [
        name
        for name in os.listdir(target)
        if SNAPSHOT.fullmatch(name)
        and name != live
        and stat.S_ISDIR(os.lstat(target / name).st_mode)
    ]
    assert spares, f"no snapshot directory besides the live one: {os.listdir(target)}"
    for name in spares:
        shutil.rmtree(target / name)
        os.symlink(scene.sentinel, target / name)
    etcd.transaction(  # type: ignore[attr-defined]
        compare=[],
        success=[
            etcd.transactions.put(prefix + "cert.pem", b"v3"),  # type: ignore[attr-defined]
            etcd.transactions.put(prefix + "new.txt", b"new"),  # type: ignore[attr-defined]
            etcd.transactions.delete(prefix + "sub/c.txt"),  # type: ignore[attr-defined]
        ],
        failure=[],
    )
    expected = {"cert.pem": b"v3", "new.txt": b"new"}
    wait_tree(target, expected, proc)
    time.sleep(0.6)  # the old snapshots' removal runs after the signal
    code = proc.stop()
    log = proc.log()
    assert scene.outside() == outside, (
        f"outside the target: {diff(outside, scene.outside())}; replaced {spares}; log:\n{log}"
    )
    data = os.path.realpath(target / "..data")
    assert data.startswith(os.path.realpath(target) + os.sep), f"..data -> {data}; log:\n{log}"
    for name in os.listdir(target):
        if not name.startswith(".."):
            resolved = os.path.realpath(target / name)
            assert resolved.startswith(os.path.realpath(target) + os.sep), f"{name} -> {resolved}"
    assert read_tree(target) == expected
    assert code == 0, log
