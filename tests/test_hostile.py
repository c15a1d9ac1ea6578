"""A hostile world around a running dispenser: a full disk, bursts of secrets, key names
that try to forge log lines, a password in the environment, a --check that floods its
output. Real etcd and the real CLI, except the last one, which needs no etcd.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    CERT_NAME,
    KEY_NAME,
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

from etcd_config_dispenser import checkcmd, snapshot
from etcd_config_dispenser.layout import is_snapshot_name

Start = Callable[..., DispenserProcess]


# -- 1. disk full -------------------------------------------------------------


@pytest.mark.integration
def test_full_disk_is_a_target_error_and_heals_when_space_returns(
    etcd: object, prefix: str, tmp_path: Path, dispenser: Start
) -> None:
    """ENOSPC on a real 1 MiB tmpfs: 503 and write_failures, never an etcd reconnect;
    the last snapshot stays served; once the big keys are gone, delivery resumes alone."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        target = mnt / "config"
        port = free_port()
        proc = dispenser(
            f"--prefix={prefix}",
            f"--target={target}",
            f"--health-addr=127.0.0.1:{port}",
            use_defaults=False,
        )
        try:
            etcd.put(prefix + "small", b"small-1")  # type: ignore[attr-defined]
            wait_tree(target, {"small": b"small-1"}, proc, timeout=20)
            busy_wait(lambda: http_get(port, "/healthz")[0] == 200)

            # 3 x 400 KB in one transaction (under etcd's 1.5 MiB request limit): > 1 MiB.
            big = {f"big{i}": bytes([0x41 + i]) * 400_000 for i in range(3)}
            txn_put(etcd, prefix, big)  # type: ignore[arg-type]
            busy_wait(lambda: http_get(port, "/healthz")[0] == 503, timeout=10)
            # A few retries later it is still the target's problem, not etcd's.
            busy_wait(
                lambda: metric(metrics(port), 'sync_failures_total{reason="write"}') >= 3,
                timeout=10,
            )
            status, body = http_get(port, "/healthz")
            assert status == 503 and "cannot write the target" in body, body
            text = metrics(port)
            assert metric(text, "reconnects_total") == 0, text
            assert metric(text, "healthy") == 0
            assert read_tree(target) == {"small": b"small-1"}  # intact, still served

            ops = [etcd.transactions.delete(prefix + name) for name in big]  # type: ignore[attr-defined]
            etcd.transaction(compare=[], success=ops, failure=[])  # type: ignore[attr-defined]
            etcd.put(prefix + "small", b"small-2")  # type: ignore[attr-defined]
            wait_tree(target, {"small": b"small-2"}, proc, timeout=25)
            busy_wait(lambda: http_get(port, "/healthz")[0] == 200, timeout=10)
            assert http_get(port, "/healthz")[1].startswith("ok: r")
            etcd.put(prefix + "later", b"later")  # type: ignore[attr-defined]
            wait_tree(target, {"small": b"small-2", "later": b"later"}, proc)
            text = metrics(port)
            assert metric(text, 'sync_failures_total{reason="write"}') >= 3
            assert metric(text, "reconnects_total") == 0, text
            assert metric(text, "healthy") == 1

            # Nothing outside the target: the tmpfs holds only it, tmp_path only the mount
            # and the log, and the target only the dispenser's own names.
            assert os.listdir(mnt) == ["config"]
            assert sorted(os.listdir(tmp_path)) == ["dispenser-0.log", "small-fs"]
            for name in os.listdir(target):
                assert name in ("..data", "..pool", "small", "later") or is_snapshot_name(name)
            assert proc.stop() == 0
        finally:
            proc.cleanup()  # it holds the target open: the umount needs it gone
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- 2. bursts leave no old secrets ---------------------------------------------


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root``, snapshot dirs and ..pool included, links not followed."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.mark.integration
def test_a_burst_of_secret_rotations_leaves_no_old_secret_on_disk(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    proc = dispenser()
    keys = {f"k{i:03d}": b"plain-%03d" % i for i in range(97)}
    keys.update(
        {KEY_NAME: b"KEY-SECRET-start", CERT_NAME: b"CERT-SECRET-start",
         "deleted-secret": b"DELETED-SECRET-only-before-the-burst"}
    )  # fmt: skip
    assert len(keys) == 100
    txn_put(etcd, prefix, keys)  # type: ignore[arg-type]
    wait_tree(target, keys, proc, timeout=20)

    stale = {keys[KEY_NAME], keys[CERT_NAME], keys["deleted-secret"]}
    for i in range(200):
        pair = {KEY_NAME: b"KEY-SECRET-%06d" % i, CERT_NAME: b"CERT-SECRET-%06d" % i}
        stale |= set(pair.values())
        txn_put(etcd, prefix, pair)  # type: ignore[arg-type]
    etcd.delete(prefix + "deleted-secret")  # type: ignore[attr-defined]
    final = {**keys, KEY_NAME: b"KEY-SECRET-000199", CERT_NAME: b"CERT-SECRET-000199"}
    del final["deleted-secret"]
    stale -= set(final.values())
    wait_tree(target, final, proc, timeout=20)

    time.sleep(snapshot.GRACE + 1.5)
    on_disk = files_under(target)
    leaked = {path: value for path, value in on_disk.items() if value in stale}
    assert not leaked, f"{len(leaked)} files hold values etcd no longer has: {leaked}"
    assert any(is_snapshot_name(path.split("/")[0]) for path in on_disk)  # the walk saw them
    snapshots = [name for name in os.listdir(target) if is_snapshot_name(name)]
    assert len(snapshots) <= 1 + snapshot.MOST_SPARES, snapshots  # the burst grew it
    assert read_tree(target) == final
    assert proc.stop() == 0


# -- 3. key names cannot forge log lines ------------------------------------------

# A date no real log line of this run can carry.
FORGED = "2001-01-01 00:00:00,000 ERROR"


@pytest.mark.integration
def test_key_names_cannot_forge_log_lines(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    refused = f"..x\n{FORGED} forged"  # the rules refuse it: logged as skipped
    also = f"ok\n{FORGED} forged2"  # refused too (a control character), logged as skipped
    etcd.put(prefix + refused, b"r")  # type: ignore[attr-defined]
    etcd.put(prefix + also, b"v1")  # type: ignore[attr-defined]
    etcd.put(prefix + "plain", b"1")  # type: ignore[attr-defined]
    proc = dispenser("--log-format=text")
    wait_tree(target, {"plain": b"1"}, proc)
    etcd.put(prefix + refused, b"r2")  # type: ignore[attr-defined]  # refused while watching
    etcd.put(prefix + also, b"v2")  # type: ignore[attr-defined]
    etcd.put(prefix + "plain", b"2")  # type: ignore[attr-defined]
    wait_tree(target, {"plain": b"2"}, proc)
    busy_wait(lambda: ": wrote " in proc.log())  # the later change is logged
    assert proc.stop() == 0
    log = proc.log()
    forged = [line for line in log.splitlines() if line.startswith(FORGED)]
    assert not forged, log
    # Both keys are named, escaped: a literal backslash-n, on one line.
    assert log.count(f"..x\\n{FORGED} forged'") >= 2, log  # at the first read and in the watch
    assert log.count(f"ok\\n{FORGED} forged2': it contains a control character") >= 2, log


# -- 4. the etcd password stays out of reach ----------------------------------------


def etcdctl(server: EtcdServer, *args: str, user: str | None = None) -> None:
    result = subprocess.run(
        ["etcdctl", f"--endpoints={server.endpoint}", *([f"--user={user}"] if user else []),
         *args],
        env={"ETCDCTL_API": "3", "PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_a_password_in_the_environment_is_warned_about_and_a_file_is_not(
    tmp_path: Path,
) -> None:
    """Against an etcd with auth on (without auth etcd refuses any password), so each
    run really authenticates with the password it was given."""
    password = "pw-Zq81-not-in-any-log"
    server = EtcdServer().start()
    try:
        server.client().put("/p/a", "1")
        etcdctl(server, "user", "add", f"root:{password}")
        etcdctl(server, "auth", "enable", user=f"root:{password}")
        password_file = tmp_path / "password"
        password_file.write_text(password + "\n")
        runs = {
            "env": {"ETCD_USERNAME": "root", "ETCD_PASSWORD": password},
            "combined": {"ETCD_USERNAME_AND_PASSWORD": f"root:{password}"},
            "file": {"ETCD_USERNAME": "root", "ETCD_PASSWORD_FILE": str(password_file)},
        }
        logs = {}
        for name, env in runs.items():
            target = tmp_path / f"config-{name}"
            proc = DispenserProcess(
                ["--once", "--prefix=/p", f"--target={target}"],
                {"ETCD_ENDPOINTS": server.endpoint, **env},
                tmp_path / f"{name}.log",
            )
            try:
                assert proc.wait(30) == 0, proc.log()
            finally:
                proc.cleanup()
            assert read_tree(target) == {"a": b"1"}  # authenticated and read
            logs[name] = proc.log()
            assert password not in logs[name]
        for name in ("env", "combined"):
            warnings = [ln for ln in logs[name].splitlines() if "WARNING" in ln]
            assert any("ETCD_PASSWORD_FILE" in ln for ln in warnings), logs[name]
        assert "ETCD_PASSWORD_FILE" not in logs["file"], logs["file"]
    finally:
        server.cleanup()


# -- 5. --check output is kept as a bounded tail --------------------------------------

RUN_CHECK = """
import json, os, resource, sys
from etcd_config_dispenser import checkcmd, child
env = {"PATH": os.environ["PATH"]}
code, out = checkcmd.run_check(sys.argv[1], env, child.Supervisor([], {}))
rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "out": out, "rss_kib": rss_kib}))
"""


def test_check_output_is_kept_as_a_bounded_tail() -> None:
    flood = "head -c 300000000 /dev/zero | tr '\\0' x; echo END; exit 3"
    result = subprocess.run(
        [sys.executable, "-c", RUN_CHECK, flood], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["code"] == 3
    out = answer["out"]
    assert 0 < len(out.encode()) <= checkcmd.CHECK_OUTPUT_MAX
    assert out.rstrip("\n").endswith("END")
    assert set(out.rstrip("\n")[:-3]) == {"x"}  # the tail of the flood, nothing else
    assert answer["rss_kib"] < 100 * 1024, answer["rss_kib"]  # whole output: 300+ MB
