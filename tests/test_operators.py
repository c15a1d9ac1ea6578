"""Operators' features against a real etcd: --include/--exclude, --file-mode, --require,
--on-change, --stale-start, --once --timeout."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    DispenserProcess,
    EtcdServer,
    busy_wait,
    free_port,
    http_get,
    metric,
    metrics,
    read_tree,
    txn_put,
    wait_tree,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from etcd_config_dispenser.events import Batch, Change, FullRead
from etcd_config_dispenser.intake import KeyIntake
from etcd_config_dispenser.rules import KeySelection

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]

# A child that records what it reads from TARGET/a at its start and at every SIGHUP.
READER = """
import os, signal, sys, time
out, target = sys.argv[1], sys.argv[2]
def note(what):
    try:
        value = open(os.path.join(target, "a")).read()
    except OSError as err:
        value = f"<{err.strerror}>"
    open(out, "a").write(f"{what} {value}\\n")
signal.signal(signal.SIGHUP, lambda s, f: note("HUP"))
note("start")
while True:
    time.sleep(1)
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- --include / --exclude ---------------------------------------------------------


def test_excluded_keys_are_neither_written_nor_warned_about(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    """letsencrypt-with-etcd keeps its ACME account key beside the certificates."""
    txn_put(etcd, prefix, {"example.com-key.pem": b"k", "example.com-fullchain.pem": b"c",
                           "production-account": b"ACCOUNT", "..odd": b"x",
                           "old/x.bak": b"b"})  # type: ignore[arg-type]  # fmt: skip
    port = free_port()
    proc = dispenser("--exclude=production-account", "--exclude=..*", "--exclude=*.bak",
                     f"--health-addr=127.0.0.1:{port}")  # fmt: skip
    wait_tree(target, {"example.com-key.pem": b"k", "example.com-fullchain.pem": b"c"}, proc)
    assert metric(metrics(port), "skipped_keys") == 0
    etcd.put(prefix + "production-account", b"NEW")  # type: ignore[attr-defined]
    etcd.put(prefix + "example.com-key.pem", b"k2")  # type: ignore[attr-defined]
    wait_tree(target, {"example.com-key.pem": b"k2", "example.com-fullchain.pem": b"c"}, proc)
    assert metric(metrics(port), "snapshots_total") == 2  # the account key made no snapshot
    assert "production-account" not in proc.log() and "..odd" not in proc.log()
    assert "ACCOUNT" not in str(read_tree(target))


def test_include_takes_only_matching_keys_and_exclude_wins(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    txn_put(etcd, prefix, {"www/a.pem": b"1", "www/private/b": b"2", "db/c": b"3",
                           "top": b"4"})  # type: ignore[arg-type]  # fmt: skip
    proc = dispenser("--include=www/*", "--include=top", "--exclude=*/private/*", "--once")
    assert proc.wait() == 0, proc.log()
    assert read_tree(target) == {"www/a.pem": b"1", "top": b"4"}


GLOBS = st.sampled_from(["*", "a*", "*.pem", "a/*", "*/b", "?", "b", "*-key.pem", "[ab]*"])
NAMES = st.sampled_from(["a", "b", "a/b", "b/a", "c.pem", "a-key.pem", "ab", "x/y/b"])


@settings(max_examples=200, deadline=None)
@given(
    include=st.lists(GLOBS, max_size=3),
    exclude=st.lists(GLOBS, max_size=3),
    keys=st.dictionaries(NAMES, st.binary(max_size=4), max_size=6),
    changes=st.lists(st.tuples(NAMES, st.one_of(st.none(), st.binary(max_size=4))), max_size=6),
)
def test_selection_on_plain_data(
    include: list[str],
    exclude: list[str],
    keys: dict[str, bytes],
    changes: list[tuple[str, bytes | None]],
) -> None:
    """Whatever the globs and the changes: the tree holds exactly the selected keys
    (those not shadowed by a file), and a change to an unselected key changes nothing."""
    from fnmatch import fnmatchcase

    def taken(name: str) -> bool:
        if any(fnmatchcase(name, g) for g in exclude):
            return False
        return not include or any(fnmatchcase(name, g) for g in include)

    intake = KeyIntake(b"/p/", 4096, KeySelection(tuple(include), tuple(exclude)))
    intake.absorb(FullRead(1, [(b"/p/" + k.encode(), v) for k, v in keys.items()]))
    state = dict(keys)
    for i, (name, value) in enumerate(changes):
        changed = intake.absorb(Batch(2 + i, [Change(b"/p/" + name.encode(), value)]))
        if not taken(name):
            assert changed == set()
        if value is None:
            state.pop(name, None)
        else:
            state[name] = value
    selected = {k: v for k, v in state.items() if taken(k)}
    assert intake.tree.values == selected
    assert set(intake.tree.files) <= set(selected)


# -- --file-mode -------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_mode_rules_give_each_file_its_mode_and_group(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    """PostgreSQL refuses a key the group or others may read; the certificate may be 0644."""
    txn_put(etcd, prefix, {"server.crt": b"c", "server.key": b"k", "sub/other.key": b"o",
                           "sub/plain": b"p"})  # type: ignore[arg-type]  # fmt: skip
    rules = ["--mode=0644", "--file-mode=*.key=0600", "--file-mode=sub/*=0640::65534"]
    proc = dispenser(*rules)
    wait_tree(target, {"server.crt": b"c", "server.key": b"k", "sub/other.key": b"o",
                       "sub/plain": b"p"}, proc)  # fmt: skip
    expected = {"server.crt": 0o644, "server.key": 0o600, "sub/other.key": 0o600,
                "sub/plain": 0o640}  # fmt: skip
    assert {name: mode_of(target / name) for name in expected} == expected
    assert os.stat(target / "sub/plain").st_gid == 65534
    assert os.stat(target / "sub/other.key").st_gid == os.getegid()  # the first rule won
    assert mode_of(target / "sub") == 0o755  # directories follow --mode
    # A change takes another path (a file from the pool, a reused spare): same modes.
    for round_ in range(3):
        value = f"v{round_}".encode()
        txn_put(etcd, prefix, {"server.key": value, "sub/plain": value})  # type: ignore[arg-type]
        wait_tree(target, {"server.crt": b"c", "server.key": value, "sub/other.key": b"o",
                           "sub/plain": value}, proc)  # fmt: skip
        assert {name: mode_of(target / name) for name in expected} == expected
        assert os.stat(target / "sub/plain").st_gid == 65534


# -- --require ---------------------------------------------------------------------


def test_require_holds_back_the_child_and_any_snapshot_without_the_keys(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    out = tmp_path / "child.out"
    etcd.put(prefix + "a", b"cert")  # type: ignore[attr-defined]
    port = free_port()
    proc = dispenser("--require=a", "--require=key.pem", f"--health-addr=127.0.0.1:{port}",
                     command=[sys.executable, "-c", READER, str(out), str(target)])  # fmt: skip
    busy_wait(lambda: "waiting for required keys: 'key.pem'" in proc.log(), timeout=20)
    status, reason = http_get(port, "/healthz")
    assert status == 503 and "waiting for required keys: 'key.pem'" in reason
    time.sleep(0.5)
    assert not out.exists() and not (target / "..data").exists()  # no child, no files
    etcd.put(prefix + "key.pem", b"key")  # type: ignore[attr-defined]
    busy_wait(lambda: lines(out) == ["start cert"], timeout=20)
    assert http_get(port, "/healthz")[0] == 200
    # Deleting a required key publishes nothing: the files nginx needs stay.
    etcd.delete(prefix + "key.pem")  # type: ignore[attr-defined]
    etcd.put(prefix + "a", b"cert2")  # type: ignore[attr-defined]
    busy_wait(lambda: proc.log().count("waiting for required keys") == 2, timeout=20)
    assert read_tree(target) == {"a": b"cert", "key.pem": b"key"}
    etcd.put(prefix + "key.pem", b"key2")  # type: ignore[attr-defined]
    wait_tree(target, {"a": b"cert2", "key.pem": b"key2"}, proc)
    busy_wait(lambda: lines(out) == ["start cert", "HUP cert2"], timeout=20)


def test_once_with_a_missing_required_key_fails_naming_it_and_leaves_no_target(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    proc = dispenser("--once", "--timeout=2", "--require=a", "--require=missing.pem")
    assert proc.wait(20) == 1
    assert "giving up: no snapshot within 2s: waiting for required keys: 'missing.pem'" in (
        proc.log()
    )
    assert not target.exists()


def test_an_empty_prefix_is_warned_about(prefix: str, target: Path, dispenser: Start) -> None:
    proc = dispenser("--once")
    assert proc.wait() == 0
    assert "no key under the prefix" in proc.log() and "is the prefix right?" in proc.log()


# -- --once --timeout ---------------------------------------------------------------


def test_once_waits_for_etcd_to_come_up(tmp_path: Path, target: Path) -> None:
    """An init container started together with etcd: etcd answers a few seconds later."""
    server = EtcdServer()
    proc = DispenserProcess(
        ["--once", "--timeout=30", "--require=a", "--prefix=/p", f"--target={target}"],
        {"ETCD_ENDPOINTS": server.endpoint}, tmp_path / "dispenser.log",
    )  # fmt: skip
    try:
        time.sleep(2)
        assert proc.proc.poll() is None, proc.log()  # still waiting
        server.start()
        server.client().put("/p/a", "late")
        assert proc.wait(30) == 0, proc.log()
        assert read_tree(target) == {"a": b"late"}
    finally:
        proc.cleanup()
        server.cleanup()


# -- --stale-start -----------------------------------------------------------------


def test_stale_start_serves_the_previous_snapshot_until_etcd_answers(
    tmp_path: Path, target: Path
) -> None:
    server = EtcdServer().start()
    out = tmp_path / "child.out"
    port = free_port()
    env = {"ETCD_ENDPOINTS": server.endpoint}
    procs: list[DispenserProcess] = []
    try:
        server.client().put("/p/a", "previous")
        first = DispenserProcess(["--once", "--prefix=/p", f"--target={target}"], env,
                                 tmp_path / "once.log")  # fmt: skip
        procs.append(first)
        assert first.wait(20) == 0
        server.client().put("/p/a", "current")
        server.stop()  # an etcd outage, and the container restarts
        args = ["--prefix=/p", f"--target={target}", f"--health-addr=127.0.0.1:{port}"]
        child = [sys.executable, "-c", READER, str(out), str(target)]
        plain = DispenserProcess(args, env, tmp_path / "plain.log", child)
        procs.append(plain)
        time.sleep(2.5)
        assert not out.exists()  # without --stale-start the child waits for etcd
        plain.stop()
        stale = DispenserProcess(["--stale-start=1", *args], env, tmp_path / "stale.log", child)
        procs.append(stale)
        busy_wait(lambda: lines(out) == ["start previous"], timeout=20)
        status, reason = http_get(port, "/healthz")
        assert status == 503 and reason.startswith("serving stale data: r2 of "), reason
        assert "starting the child on the previous run's snapshot (r2 of" in stale.log()
        server.start()
        busy_wait(lambda: lines(out) == ["start previous", "HUP current"], timeout=30)
        busy_wait(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
    finally:
        for proc in procs:
            proc.cleanup()
        server.cleanup()


# -- --on-change -------------------------------------------------------------------

HOOK = (
    'printf "%s|%s|%s\\n" "$DISPENSER_REVISION" "$(echo $DISPENSER_WRITTEN)" '
    '"$(echo $DISPENSER_REMOVED)" >> "$OUT"'
)


def test_on_change_runs_after_each_change_with_what_changed(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    out = tmp_path / "hook.out"
    etcd.put(prefix + "gone", b"1")  # type: ignore[attr-defined]
    proc = dispenser(f"--on-change={HOOK}", env={"OUT": str(out)})  # a sidecar: no child
    busy_wait(lambda: len(lines(out)) == 1, timeout=20)
    first = etcd.get_response(prefix + "gone").header.revision  # type: ignore[attr-defined]
    assert lines(out) == [f"{first}|gone|"]
    tx = etcd.transactions  # type: ignore[attr-defined]
    etcd.transaction(compare=[], success=[tx.put(prefix + "d/new", b"2"),  # type: ignore[attr-defined]
                                          tx.delete(prefix + "gone")], failure=[])  # fmt: skip
    busy_wait(lambda: len(lines(out)) == 2, timeout=20)
    assert lines(out)[1] == f"{first + 1}|d/new|gone"
    assert "--on-change exited with 0" in proc.log()


def test_on_change_runs_one_at_a_time_and_merges_what_came_meanwhile(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    out = tmp_path / "hook.out"
    hook = f'echo start >> "$OUT"; sleep 1; {HOOK}'
    etcd.put(prefix + "k0", b"0")  # type: ignore[attr-defined]
    proc = dispenser(f"--on-change={hook}", env={"OUT": str(out)})
    busy_wait(lambda: len(lines(out)) == 1, timeout=20)  # the first run has started
    for i in range(1, 6):  # while it sleeps
        etcd.put(prefix + f"k{i}", str(i).encode())  # type: ignore[attr-defined]
    last = etcd.get_response(prefix + "k5").header.revision  # type: ignore[attr-defined]
    busy_wait(lambda: lines(out)[-1:] == [f"{last}|k1 k2 k3 k4 k5|"], timeout=20)
    runs = lines(out)
    assert runs.count("start") == 2, runs  # never two at once: start, end, start, end
    assert [line == "start" for line in runs] == [True, False, True, False], runs
    assert "Traceback" not in proc.log()


def test_a_failing_or_hanging_hook_is_logged_counted_and_shown(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    port = free_port()
    flag = tmp_path / "hang"
    hook = f'if [ -e {flag} ]; then sleep 31.7; fi; echo "reload failed: no such unit"; exit 3'
    proc = dispenser(f"--on-change={hook}", "--on-change-timeout=1",
                     f"--health-addr=127.0.0.1:{port}")  # fmt: skip
    busy_wait(lambda: "--on-change failed with exit code 3" in proc.log(), timeout=20)
    assert "reload failed: no such unit" in proc.log()
    status, reason = http_get(port, "/healthz")
    assert status == 503 and reason.startswith("--on-change failed: r"), reason
    assert metric(metrics(port), 'sync_failures_total{reason="on_change"}') == 1
    flag.touch()
    etcd.put(prefix + "a", b"2")  # type: ignore[attr-defined]
    busy_wait(lambda: "--on-change failed with exit code 137" in proc.log(), timeout=20)
    assert "--on-change: still running after 1s: SIGKILL to its process group" in proc.log()
    assert not running("sleep 31.7")  # what the hook started went with it
    wait_tree(target, {"a": b"2"}, proc)  # delivery went on


def running(command: str) -> list[int]:
    """Processes whose command line is ``command`` (ours: a number nobody else uses)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if cmdline.decode(errors="replace") == command:
            found.append(int(pid))
    return found


def test_a_hook_running_when_the_dispenser_stops_is_killed_not_orphaned(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    out = tmp_path / "hook.out"
    proc = dispenser(f"--on-change=echo started > {out}; sleep 32.3")
    busy_wait(out.exists, timeout=20)
    busy_wait(lambda: bool(running("sleep 32.3")), timeout=5)
    assert proc.stop() == 0
    assert "--on-change: the dispenser stops: SIGKILL to its process group" in proc.log()
    busy_wait(lambda: not running("sleep 32.3"), timeout=5)


def test_stale_start_is_only_for_an_etcd_that_says_nothing(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    """etcd answers but a required key is missing: the previous snapshot is not served
    as if etcd were down; the child waits for the key."""
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    assert dispenser("--once").wait() == 0  # a snapshot from a previous run
    out = tmp_path / "child.out"
    proc = dispenser("--stale-start=0.5", "--require=b",
                     command=[sys.executable, "-c", READER, str(out), str(target)])  # fmt: skip
    busy_wait(lambda: "waiting for required keys: 'b'" in proc.log(), timeout=20)
    time.sleep(1.5)
    assert not out.exists() and "starting the child on the previous" not in proc.log()
    etcd.put(prefix + "b", b"2")  # type: ignore[attr-defined]
    busy_wait(lambda: lines(out) == ["start 1"], timeout=20)


def test_once_stopped_before_it_could_write_fails_and_leaves_no_target(
    tmp_path: Path, target: Path
) -> None:
    proc = DispenserProcess(
        ["--once", "--prefix=/p", f"--target={target}"],
        {"ETCD_ENDPOINTS": EtcdServer().endpoint},  # nobody answers there
        tmp_path / "dispenser.log",
    )
    busy_wait(lambda: "etcd sync failed" in proc.log(), timeout=20)
    assert proc.stop() == 128 + 15
    assert not target.exists()
