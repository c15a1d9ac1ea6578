"""End to end with a real nginx: the dispenser is its entrypoint, etcd rotates its certificate."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    CERT_NAME,
    KEY_NAME,
    NGINX,
    DispenserProcess,
    busy_wait,
    free_port,
    make_cert,
    nginx_command,
    same_cert,
    served_cert,
    stop_process,
    txn_put,
    write_nginx_conf,
)

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]
CERT, KEY = CERT_NAME, KEY_NAME


def put_pair(etcd: object, prefix: str, cert: bytes, key: bytes) -> None:
    txn_put(etcd, prefix, {CERT: cert, KEY: key})  # type: ignore[arg-type]


def master_pid(workdir: Path) -> int:
    return int((workdir / "nginx.pid").read_text())


def test_certificate_rotation_reaches_nginx_without_restart(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    certs = [make_cert(f"rotation-{i}", tmp_path) for i in range(6)]
    put_pair(etcd, prefix, *certs[0])
    port = free_port()
    workdir = tmp_path / "nginx"
    conf = write_nginx_conf(workdir, port, target)
    proc = dispenser(command=nginx_command(workdir, conf))
    busy_wait(lambda: same_cert(served_cert(port), certs[0][0]), timeout=20)
    pid = master_pid(workdir)
    assert pid == int(proc.log().split("started child pid ")[1].split(":")[0])

    # While certificates rotate, every handshake must succeed with one of them:
    # nginx refuses a certificate with the wrong key, so a torn pair would show
    # as a failed reload (logged) and the old certificate kept.
    failures: list[str] = []
    stop = threading.Event()

    def handshake_all_along() -> None:
        while not stop.is_set():
            pem = served_cert(port)
            if not any(same_cert(pem, cert) for cert, _ in certs):
                failures.append(str(pem))
            time.sleep(0.01)

    sampler = threading.Thread(target=handshake_all_along, daemon=True)
    sampler.start()
    for cert, key in certs[1:]:
        put_pair(etcd, prefix, cert, key)
        busy_wait(lambda: same_cert(served_cert(port), cert), timeout=20)  # noqa: B023
    stop.set()
    sampler.join()

    assert not failures, failures[:3]
    assert master_pid(workdir) == pid  # reloaded, never restarted
    error_log = (workdir / "error.log").read_text()
    assert "key values mismatch" not in error_log and "[emerg]" not in error_log
    # One SIGHUP per rotation, each from the dispenser.
    assert error_log.count("signal 1 (SIGHUP) received") == len(certs) - 1
    assert error_log.count(f"signal 1 (SIGHUP) received from {proc.pid},") == len(certs) - 1
    assert proc.stop() == 0  # nginx exits 0 on the forwarded SIGTERM


def test_nginx_stops_with_the_dispenser_and_its_code(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    put_pair(etcd, prefix, *make_cert("stop", tmp_path))
    port = free_port()
    workdir = tmp_path / "nginx"
    proc = dispenser(command=nginx_command(workdir, write_nginx_conf(workdir, port, target)))
    busy_wait(lambda: served_cert(port) is not None, timeout=20)
    assert proc.stop(signal.SIGQUIT) == 0  # graceful shutdown, forwarded
    assert served_cert(port) is None


def test_check_rejects_a_mismatched_pair_and_keeps_serving(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    """--check="nginx -t": a certificate with the wrong key is never made nginx's."""
    good, other, fixed = (make_cert(n, tmp_path) for n in ("good", "other", "fixed"))
    put_pair(etcd, prefix, *good)
    port = free_port()
    workdir = tmp_path / "nginx"
    conf = write_nginx_conf(workdir, port, target)
    check = f"{NGINX} -t -p {workdir} -c {conf}"
    proc = dispenser(f"--check={check}", command=nginx_command(workdir, conf))
    busy_wait(lambda: same_cert(served_cert(port), good[0]), timeout=20)
    time.sleep(1.2)  # past the start-up settle, so a signal would go out at once
    before = os.readlink(target / "..data")
    put_pair(etcd, prefix, other[0], good[1])  # new certificate, old key: a torn pair
    busy_wait(lambda: "check failed" in proc.log(), timeout=20)
    log = proc.log()
    assert "key values mismatch" in log  # nginx -t's own words
    assert os.readlink(target / "..data") == before  # the previous snapshot is back
    assert (target / CERT).read_bytes() == good[0]
    assert same_cert(served_cert(port), good[0])
    assert "SIGHUP" not in (workdir / "error.log").read_text()  # nginx was not signalled
    put_pair(etcd, prefix, *fixed)
    busy_wait(lambda: same_cert(served_cert(port), fixed[0]), timeout=20)
    assert (workdir / "error.log").read_text().count("signal 1 (SIGHUP) received") == 1
    assert proc.stop() == 0


def test_on_change_reloads_an_nginx_that_is_not_the_child(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    """The systemd way: nginx is its own service, the dispenser a sidecar that runs
    `nginx -s reload` after each change (nginx's master then reloads, same PID)."""
    certs = [make_cert(f"hook-{i}", tmp_path) for i in range(3)]
    put_pair(etcd, prefix, *certs[0])
    port = free_port()
    workdir = tmp_path / "nginx"
    conf = write_nginx_conf(workdir, port, target)
    proc = dispenser(f"--on-change={NGINX} -p {workdir} -c {conf} -s reload")
    # The run after the first snapshot finds no nginx yet (a failure, logged); then start it.
    busy_wait(lambda: "--on-change failed" in proc.log(), timeout=20)
    nginx = subprocess.Popen(nginx_command(workdir, conf), stderr=subprocess.DEVNULL)
    try:
        busy_wait(lambda: same_cert(served_cert(port), certs[0][0]), timeout=20)
        pid = master_pid(workdir)
        for cert, key in certs[1:]:
            put_pair(etcd, prefix, cert, key)
            busy_wait(lambda: same_cert(served_cert(port), cert), timeout=20)  # noqa: B023
        busy_wait(lambda: proc.log().count("--on-change exited with 0") == len(certs) - 1)
        assert master_pid(workdir) == pid == nginx.pid  # reloaded, never restarted
        error_log = (workdir / "error.log").read_text()
        assert error_log.count("signal 1 (SIGHUP) received") == len(certs) - 1  # one a rotation
    finally:
        stop_process(nginx)
    assert proc.stop() == 0
