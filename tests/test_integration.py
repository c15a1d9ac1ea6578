"""The dispenser as users run it: a real etcd, a real process, real files and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    RECORDER,
    DispenserProcess,
    busy_wait,
    dir_files,
    free_port,
    metric,
    metrics,
    read_tree,
    snapshot_dirs,
    tree_is,
    txn_put,
    wait_tree,
)

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]

# A child that, at every SIGHUP, resolves ..data once and records the pair (a, b)
# it reads there: the way to read several files of one revision.
PAIR_READER = """
import os, signal, sys, time
target, out = sys.argv[1], sys.argv[2]
def read_pair(signum, frame):
    data = os.path.join(target, os.readlink(os.path.join(target, "..data")))
    with open(os.path.join(data, "a"), "rb") as fa, open(os.path.join(data, "b"), "rb") as fb:
        pair = fa.read().decode() + " " + fb.read().decode()
    with open(out, "a") as f:
        f.write(pair + "\\n")
signal.signal(signal.SIGHUP, read_pair)
read_pair(None, None)
while True:
    time.sleep(1)
"""


def put_all(etcd: object, prefix: str, items: dict[str, bytes]) -> None:
    for name, value in items.items():
        etcd.put(prefix + name, value)  # type: ignore[attr-defined]


def test_files_follow_etcd_create_update_delete(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    put_all(etcd, prefix, {"cert.pem": b"C1", "key.pem": b"K1", "sub/deep/c.txt": b"deep"})
    proc = dispenser()
    wait_tree(target, {"cert.pem": b"C1", "key.pem": b"K1", "sub/deep/c.txt": b"deep"}, proc)
    txn_put(etcd, prefix, {"cert.pem": b"C2", "key.pem": b"K2"})
    wait_tree(target, {"cert.pem": b"C2", "key.pem": b"K2", "sub/deep/c.txt": b"deep"}, proc)
    etcd.delete(prefix + "key.pem")  # type: ignore[attr-defined]
    wait_tree(target, {"cert.pem": b"C2", "sub/deep/c.txt": b"deep"}, proc)
    etcd.delete(prefix + "sub/deep/c.txt")  # type: ignore[attr-defined]
    wait_tree(target, {"cert.pem": b"C2"}, proc)
    assert not (target / "sub").exists() and not (target / "key.pem").is_symlink()
    etcd.put(prefix + "binary.der", bytes(range(256)))  # type: ignore[attr-defined]
    etcd.put(prefix + "empty", b"")  # type: ignore[attr-defined]
    wait_tree(target, {"cert.pem": b"C2", "binary.der": bytes(range(256)), "empty": b""}, proc)
    assert proc.stop() == 0  # no child: SIGTERM is a clean exit
    assert "wrote 'cert.pem', 'key.pem'" in proc.log()  # one line per revision, names only
    assert "C2" not in proc.log() and "K2" not in proc.log()  # never the values


def test_hostile_keys_are_skipped_and_good_keys_written(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    hostile = ["../escape", "a/../../escape", "..data", "..sneaky", "//abs", "x/", "n\0ul"]
    for key in hostile:
        etcd.put(prefix + key, b"evil")  # type: ignore[attr-defined]
    etcd.put(prefix + "a" * 256, b"too long")  # type: ignore[attr-defined]
    etcd.put(prefix + "good", b"ok")  # type: ignore[attr-defined]
    etcd.put(prefix + "dir", b"file wins")  # type: ignore[attr-defined]
    etcd.put(prefix + "dir/under", b"hidden")  # type: ignore[attr-defined]
    proc = dispenser()
    wait_tree(target, {"good": b"ok", "dir": b"file wins"}, proc)
    etcd.put(prefix + "later/../../escape", b"evil")  # type: ignore[attr-defined]
    etcd.put(prefix + "later-good", b"ok")  # type: ignore[attr-defined]
    wait_tree(target, {"good": b"ok", "dir": b"file wins", "later-good": b"ok"}, proc)
    log = proc.log()
    for key in [*hostile, "later/../../escape"]:
        assert f"skipping key {(prefix + key)!r}" in log  # quoted one way, NUL escaped
    assert "skipping key 'dir/under': 'dir' is a file" in log
    assert sorted(os.listdir(tmp_path)) == sorted(["config", "dispenser-0.log"])
    assert not list(tmp_path.rglob("escape"))
    etcd.delete(prefix + "dir")  # type: ignore[attr-defined]
    wait_tree(target, {"good": b"ok", "dir/under": b"hidden", "later-good": b"ok"}, proc)
    assert proc.stop() == 0


def test_one_transaction_is_one_signal_and_the_env_is_scrubbed(
    etcd: object, etcd_server: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    put_all(etcd, prefix, {"a": b"1"})
    (tmp_path / "endpoints").write_text(etcd_server.endpoint)  # type: ignore[attr-defined]
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "signals"
    secrets = {name: "" for name in ("ETCD_USERNAME", "ETCD_PASSWORD", "ETCD_CLIENT_CERT")}
    proc = dispenser(
        command=[sys.executable, str(script), str(out)],
        env={
            "ETCD_ENDPOINTS_FILE": str(tmp_path / "endpoints"),
            "ETCD_INSECURE_SKIP_VERIFY": "false",
            **secrets,
            "KEEP_ME": "yes",
        },
    )
    busy_wait(out.exists)
    env = __import__("json").loads(Path(str(out) + ".env").read_text())
    assert env["KEEP_ME"] == "yes"
    assert not [name for name in env if name.startswith("ETCD_")], env
    txn_put(etcd, prefix, {"a": b"2", "b": b"2"})
    busy_wait(lambda: out.read_text().count("HUP") == 1)
    etcd.put(prefix + "a", b"2")  # type: ignore[attr-defined]  # same value: no change
    etcd.put(prefix + "c", b"3")  # type: ignore[attr-defined]
    busy_wait(lambda: out.read_text().count("HUP") == 2)
    time.sleep(0.3)
    assert out.read_text().count("HUP") == 2
    assert proc.stop() == 128 + signal.SIGTERM  # the recorder dies of the forwarded SIGTERM


def test_no_torn_pair_over_1000_transactions(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    txn_put(etcd, prefix, {"a": b"0", "b": b"0"})
    script = tmp_path / "pair_reader.py"
    script.write_text(PAIR_READER)
    out = tmp_path / "pairs"
    proc = dispenser(command=[sys.executable, str(script), str(target), str(out)])
    busy_wait(out.exists)
    for i in range(1, 1001):
        txn_put(etcd, prefix, {"a": str(i).encode(), "b": str(i).encode()})
    busy_wait(lambda: out.read_text().splitlines()[-1:] == ["1000 1000"], timeout=30)
    pairs = [line.split() for line in out.read_text().splitlines()]
    torn = [p for p in pairs if p[0] != p[1]]
    assert not torn, torn[:5]
    assert len(pairs) > 2
    assert proc.stop() == 128 + signal.SIGTERM


def test_child_exit_code_is_the_dispensers(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "f", b"content")  # type: ignore[attr-defined]
    # The child runs only once the files exist: it fails unless it can read them.
    check = f'test "$(cat {target}/f)" = content && exit 42'
    proc = dispenser(command=["sh", "-c", check])
    assert proc.wait() == 42, proc.log()


def test_once_writes_and_exits(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "f", b"once")  # type: ignore[attr-defined]
    proc = dispenser("--once")
    assert proc.wait() == 0, proc.log()
    assert read_tree(target) == {"f": b"once"}


def test_once_with_etcd_down_fails_with_a_message(
    prefix: str, target: Path, dispenser: Start
) -> None:
    from helpers import free_port

    proc = dispenser("--once", "--timeout=3", env={"ETCD_ENDPOINTS": f"127.0.0.1:{free_port()}"})
    assert proc.wait(30) == 1
    assert "giving up: no snapshot within 3s" in proc.log() and "UNAVAILABLE" in proc.log()
    assert "Traceback" not in proc.log()
    assert not target.exists()  # no empty directory that looks delivered


def test_installed_console_script_talks_to_etcd(
    etcd: object, etcd_server: object, prefix: str, target: Path
) -> None:
    """The package as pip installed it: the entry point imports etcd3 and reads etcd."""
    etcd.put(prefix + "f", b"installed")  # type: ignore[attr-defined]
    script = Path(sys.executable).with_name("etcd-config-dispenser")
    assert script.exists(), "the package is not installed in this environment"
    result = subprocess.run(
        [str(script), "--once", f"--prefix={prefix}", f"--target={target}"],
        env={**os.environ, "ETCD_ENDPOINTS": etcd_server.endpoint},  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert read_tree(target) == {"f": b"installed"}


def test_kill_9_while_writing_then_restart(
    etcd: object, prefix: str, tmp_path: Path, dispenser: Start
) -> None:
    """kill -9 between write and flip: the old snapshot is served whole, no debris stays.

    The kill comes as soon as the new snapshot directory appears, then a bit
    later each round; at least one round must catch a half-built directory.
    """
    caught_half_built = 0
    for round_, delay in enumerate([0.0, 0.0, 0.005, 0.02, 0.05]):
        keys = f"{prefix}{round_}/"
        target = tmp_path / f"config-{round_}"
        etcd.put(keys + "gen", b"1")  # type: ignore[attr-defined]
        assert dispenser("--once", f"--prefix={keys}", f"--target={target}",
                         use_defaults=False).wait() == 0  # fmt: skip
        before = read_tree(target)
        many = {f"k{i:04d}": os.urandom(256) for i in range(2000)}
        items = list(many.items())
        for start in range(0, len(items), 100):  # etcd takes 128 ops a txn
            txn_put(etcd, keys, dict(items[start : start + 100]))
        etcd.put(keys + "gen", b"2")  # type: ignore[attr-defined]
        after = {**many, "gen": b"2"}
        victim = dispenser(f"--prefix={keys}", f"--target={target}", use_defaults=False)
        busy_wait(lambda: len(snapshot_dirs(target)) >= 2, step=0.0005)  # noqa: B023
        time.sleep(delay)
        victim.stop(signal.SIGKILL)
        served = read_tree(target)
        assert served in (before, after)  # one whole revision or the other, never a mix
        if served == before and len(snapshot_dirs(target)) >= 2:
            caught_half_built += 1
        left = set(snapshot_dirs(target))
        restarted = dispenser(f"--prefix={keys}", f"--target={target}", use_defaults=False)
        wait_tree(target, after, restarted)
        busy_wait(lambda: not left & set(snapshot_dirs(target)))  # noqa: B023
        assert os.readlink(target / "..data") in snapshot_dirs(target)
        # The live one and the spare prepared after it (in the background): whole copies.
        busy_wait(
            lambda: all(dir_files(target / n) == after for n in snapshot_dirs(target))  # noqa: B023
        )
        assert not (target / "..data_tmp").is_symlink()
        assert restarted.stop() == 0
    assert caught_half_built >= 1


@pytest.mark.skipif(os.geteuid() != 0, reason="changing the owner needs root")
def test_owner_group_and_mode_of_files_and_directories(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "sub/f", b"x")  # type: ignore[attr-defined]
    etcd.put(prefix + "g", b"y")  # type: ignore[attr-defined]
    proc = dispenser("--once", "--owner=65534", "--group=nogroup", "--mode=0640")
    assert proc.wait() == 0, proc.log()
    data = target / "..data"
    for path, mode in [(data / "g", 0o640), (data / "sub" / "f", 0o640), (data / "sub", 0o750)]:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, mode), path
    assert os.stat(data).st_uid == 65534


def test_wait_coalesces_a_burst_into_one_snapshot_and_one_signal(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "n", b"0")  # type: ignore[attr-defined]
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "signals"
    port = free_port()
    proc = dispenser(
        "--wait=400ms:10s",
        f"--health-addr=127.0.0.1:{port}",
        command=[sys.executable, str(script), str(out)],
    )
    busy_wait(out.exists)
    time.sleep(1.2)  # past the child's start-up settle
    for i in range(1, 6):  # a burst: 5 revisions, 50 ms apart, quieter than MIN never
        etcd.put(prefix + "n", str(i).encode())  # type: ignore[attr-defined]
        time.sleep(0.05)
    busy_wait(lambda: out.read_text().count("HUP") == 1)
    assert read_tree(target) == {"n": b"5"}
    time.sleep(0.6)
    assert out.read_text().count("HUP") == 1  # one signal for the whole burst
    assert metric(metrics(port), "snapshots_total") == 2  # the first, and the whole burst
    assert proc.stop() == 128 + signal.SIGTERM


def test_wait_max_bounds_a_never_ending_burst(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "n", b"0")  # type: ignore[attr-defined]
    port = free_port()
    proc = dispenser("--wait=300ms:600ms", f"--health-addr=127.0.0.1:{port}")
    busy_wait(lambda: (target / "..data").exists())
    for i in range(1, 21):  # 2 s of changes, never 300 ms quiet
        etcd.put(prefix + "n", str(i).encode())  # type: ignore[attr-defined]
        time.sleep(0.1)
    busy_wait(lambda: tree_is(target, {"n": b"20"}))
    snapshots = metric(metrics(port), "snapshots_total") - 1  # after the first
    assert 2 <= snapshots < 20  # MAX forced some out during the burst, far fewer than 20
    assert proc.stop() == 0


def test_sigterm_before_the_first_sync_exits_without_starting_the_child(
    prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    from helpers import free_port

    marker = tmp_path / "child-ran"
    proc = dispenser(
        command=["touch", str(marker)], env={"ETCD_ENDPOINTS": f"127.0.0.1:{free_port()}"}
    )
    busy_wait(lambda: "etcd sync failed" in proc.log())
    assert proc.stop() == 0
    assert not marker.exists()
    assert "nothing served yet" in proc.log()


def test_check_at_start_keeps_the_previous_runs_snapshot(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    """A value --check rejected must not go live unchecked when the dispenser restarts."""
    etcd.put(prefix + "conf", b"good")  # type: ignore[attr-defined]
    assert dispenser("--once").wait() == 0
    etcd.put(prefix + "conf", b"bad")  # type: ignore[attr-defined]
    check = f'test "$(cat {target}/conf)" != bad'
    seen = tmp_path / "seen"
    proc = dispenser(f"--check={check}", command=["sh", "-c", f"cat {target}/conf > {seen}"])
    assert proc.wait() == 0, proc.log()
    assert seen.read_text() == "good"  # the child started with the snapshot put back
    assert "check failed" in proc.log()
    assert read_tree(target) == {"conf": b"good"}


def test_once_with_a_rejected_snapshot_fails(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    """An init container must not carry on when --check refused what etcd holds."""
    etcd.put(prefix + "conf", b"good")  # type: ignore[attr-defined]
    assert dispenser("--once").wait() == 0
    etcd.put(prefix + "conf", b"bad")  # type: ignore[attr-defined]
    proc = dispenser("--once", f'--check=test "$(cat {target}/conf)" != bad')
    assert proc.wait() == 1, proc.log()
    assert read_tree(target) == {"conf": b"good"}


def test_backoff_grows_with_jitter_and_never_passes_the_cap(target: Path) -> None:
    """The retry waits against a real unreachable endpoint, recorded instead of slept."""
    import queue

    from helpers import free_port

    from etcd_config_dispenser.config import load
    from etcd_config_dispenser.health import Stats
    from etcd_config_dispenser.session import EtcdSession
    from etcd_config_dispenser.source import EtcdSource

    source = EtcdSource(load({"ETCD_ENDPOINTS": f"127.0.0.1:{free_port()}"}), b"/p/", timeout=1)
    sleeps: list[float] = []

    def record(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 12:
            session.stopping.set()

    session = EtcdSession(source, queue.Queue(), Stats(), backoff_max=0.8, sleep=record)
    session.run()
    assert len(sleeps) == 12
    assert all(0 < s <= 0.8 for s in sleeps)  # the cap holds, jitter included
    assert sleeps[0] < 0.25  # it starts small...
    assert all(s >= 0.4 for s in sleeps[4:])  # ...and its steady half reaches cap/2
    assert len({round(s, 6) for s in sleeps[4:]}) > 1  # and the other half is random


def test_the_child_needs_no_double_dash(etcd: object, prefix: str, dispenser: Start) -> None:
    """`... sh -c 'exit 4'` once took -c as --check, ran sh with no script and exited 0."""
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    proc = dispenser("sh", "-c", "exit 4")  # the child's words after the options, no --
    assert proc.wait() == 4, proc.log()
