"""etcd misbehaving under a running dispenser: each fault with its own real etcd processes.

Every test asserts that the served files were never missing or mixed during
the fault, that the child was never restarted, and that it got exactly one
signal per real change after recovery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    RECORDER,
    DispenserProcess,
    EtcdServer,
    busy_wait,
    dir_files,
    free_port,
    http_get,
    metric,
    metrics,
    read_tree,
    start_cluster,
    txn_put,
    wait_tree,
)

pytestmark = pytest.mark.integration


class Watched:
    """A dispenser with a recording child, and a sampler that checks the files all along."""

    def __init__(self, proc: DispenserProcess, target: Path, record: Path, port: int) -> None:
        self.proc, self.target, self.record, self.port = proc, target, record, port
        self.allowed: list[dict[str, bytes]] = []
        self.bad: list[object] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lines(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def signals(self) -> int:
        return self.lines().count("HUP")

    def starts(self) -> int:
        return sum(1 for line in self.lines() if line.startswith("start"))

    def metric(self, name: str) -> float:
        return metric(metrics(self.port), name)

    def wait_resynced(self, timeout: float = 20) -> None:
        """Until it connected again and its full read is applied (a new snapshot or none):
        a reconnect counted, and /healthz ok again (served, etcd answering)."""

        def resynced() -> bool:
            status, _body = http_get(self.port, "/healthz")
            return status == 200 and self.metric("reconnects_total") >= 1

        busy_wait(resynced, timeout=timeout)

    def wait_tree(self, expected: dict[str, bytes], timeout: float = 20) -> None:
        wait_tree(self.target, expected, self.proc, timeout)

    def sample_while(self, *allowed: dict[str, bytes]) -> None:
        """From now on, every read of the files must give one of ``allowed``."""
        self.allowed = list(allowed)
        self._stop.clear()

        def sample() -> None:
            while not self._stop.is_set():
                try:  # one revision: through one resolved ..data, as the README says
                    live = self.target / os.readlink(self.target / "..data")
                    tree: object = dir_files(live)
                except OSError as err:  # a missing file is the worst answer of all
                    tree = err
                if tree not in self.allowed:
                    self.bad.append(tree)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        assert not self.bad, f"served files were wrong during the fault: {self.bad[:3]}"


@pytest.fixture
def own_etcd() -> Iterator[Callable[..., EtcdServer]]:
    servers: list[EtcdServer] = []

    def start(*extra: str) -> EtcdServer:
        server = EtcdServer(extra).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


@pytest.fixture
def watched(tmp_path: Path, target: Path) -> Iterator[Callable[..., Watched]]:
    procs: list[DispenserProcess] = []

    def start(endpoints: str, *args: str, env: dict[str, str] | None = None) -> Watched:
        script = tmp_path / "recorder.py"
        script.write_text(RECORDER)
        record = tmp_path / "record"
        port = free_port()
        proc = DispenserProcess(
            [
                "--prefix=/certs",
                f"--target={target}",
                "--backoff-max=1",
                f"--health-addr=127.0.0.1:{port}",
                *args,
            ],
            {"ETCD_ENDPOINTS": endpoints, **(env or {})},
            tmp_path / f"dispenser-{len(procs)}.log",
            [sys.executable, str(script), str(record)],
        )
        procs.append(proc)
        watched = Watched(proc, target, record, port)
        busy_wait(lambda: watched.starts() == 1, timeout=20)
        return watched

    yield start
    for proc in procs:
        proc.cleanup()


def test_etcd_killed_and_restarted(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    server = own_etcd()
    client = server.client()
    client.put("/certs/cert", "c1")
    client.put("/certs/key", "k1")
    w = watched(server.endpoint)
    w.wait_tree({"cert": b"c1", "key": b"k1"})
    w.sample_while({"cert": b"c1", "key": b"k1"})
    server.stop()
    busy_wait(lambda: "etcd sync failed (attempt 2)" in w.proc.log(), timeout=20)
    time.sleep(1)
    server.start()  # same data, same ports
    w.wait_resynced()
    w.stop_sampling()
    assert w.signals() == 0  # nothing changed while it was down: no signal
    client = server.client()
    txn_put(client, "/certs/", {"cert": b"c2", "key": b"k2"})
    w.wait_tree({"cert": b"c2", "key": b"k2"})
    busy_wait(lambda: w.signals() == 1)
    assert w.starts() == 1  # the child was never restarted
    log = w.proc.log()
    assert "UNAVAILABLE" in log and "serving r" in log
    assert w.proc.stop() == 128 + signal.SIGTERM


def test_change_while_etcd_was_down_is_picked_up_with_one_signal(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched], tmp_path: Path
) -> None:
    """Deleted and changed keys are found by the full read after reconnecting."""
    server = own_etcd()
    client = server.client()
    for name in ("a", "b", "c"):
        client.put(f"/certs/{name}", name)
    w = watched(server.endpoint)
    w.wait_tree({"a": b"a", "b": b"b", "c": b"c"})
    time.sleep(1.2)  # past the child's start-up settle
    w.sample_while({"a": b"a", "b": b"b", "c": b"c"}, {"a": b"a", "c": b"c2"})
    server.stop()  # its watch dies with the server
    busy_wait(lambda: "etcd sync failed" in w.proc.log(), timeout=20)
    os.kill(w.proc.pid, signal.SIGSTOP)  # held while etcd comes back and changes
    try:
        server.start()
        client = server.client()
        client.delete("/certs/b")
        client.put("/certs/c", "c2")
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    w.wait_tree({"a": b"a", "c": b"c2"})
    w.stop_sampling()
    assert w.metric("reconnects_total") == 1  # one reconnect, one full read
    busy_wait(lambda: w.signals() == 1)
    time.sleep(0.5)
    assert w.signals() == 1  # both revisions in one snapshot, one signal
    assert w.starts() == 1


def test_frozen_etcd_is_noticed_and_survived(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    """SIGSTOP: no error, no closed socket, just silence. The liveness check notices."""
    server = own_etcd()
    client = server.client()
    client.put("/certs/a", "1")
    w = watched(server.endpoint)
    w.wait_tree({"a": b"1"})
    w.sample_while({"a": b"1"})
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        busy_wait(lambda: "liveness check failed" in w.proc.log(), timeout=10)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    w.wait_resynced()
    w.stop_sampling()
    client.put("/certs/a", "2")
    w.wait_tree({"a": b"2"})
    busy_wait(lambda: w.signals() == 1)
    assert w.starts() == 1
    assert "DEADLINE_EXCEEDED" in w.proc.log()


def test_compacted_history_leads_to_a_full_read(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    """A watcher that fell behind past a compaction is cancelled by etcd: read everything."""
    server = own_etcd()
    client = server.client()
    client.put("/certs/a", "0")
    w = watched(server.endpoint)
    w.wait_tree({"a": b"0"})
    os.kill(w.proc.pid, signal.SIGSTOP)  # it stops reading: etcd's send buffers fill up
    try:
        big = "x" * 32_768
        for i in range(400):
            client.put("/certs/big", f"{i}{big}")
        client.put("/certs/a", "final")
        client.delete("/certs/big")
        client.compact(client.get_response("/certs/a").header.revision, physical=True)
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    w.wait_tree({"a": b"final"}, timeout=30)
    assert w.starts() == 1
    if "compacted" not in w.proc.log():
        pytest.skip("etcd delivered every event before the compaction; path not exercised")
    assert "reading everything again" in w.proc.log()


AUTH_SETUP = [
    ["user", "add", "root:rootpw"],
    ["role", "add", "reader"],
    ["role", "grant-permission", "reader", "--prefix=true", "read", "/certs/"],
    ["user", "add", "reader:pw"],
    ["user", "grant-role", "reader", "reader"],
    ["auth", "enable"],
]


def etcdctl(server: EtcdServer, *args: str, user: str | None = "root:rootpw",
            stdin: str | None = None) -> str:  # fmt: skip
    result = subprocess.run(
        ["etcdctl", f"--endpoints={server.endpoint}",
         *([f"--user={user}"] if user else []), *args],
        env={"ETCDCTL_API": "3", "PATH": os.environ["PATH"]},
        input=stdin, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def enable_auth(server: EtcdServer) -> None:
    """root, and a user 'reader' (password 'pw') who may only read /certs/; then auth on."""
    for i, args in enumerate(AUTH_SETUP):
        etcdctl(server, *args, user=None if i == 0 or args[0] == "auth" else "root:rootpw")


def test_auth_password_changed_and_restored(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    server = own_etcd()
    server.client().put("/certs/a", "1")
    server.client().put("/secret/x", "not for the reader")
    enable_auth(server)
    w = watched(server.endpoint, env={"ETCD_USERNAME": "reader", "ETCD_PASSWORD": "pw"})
    w.wait_tree({"a": b"1"})
    w.sample_while({"a": b"1"})
    etcdctl(server, "user", "passwd", "reader", "--interactive=false", stdin="changed\n")
    busy_wait(lambda: "authentication failed" in w.proc.log(), timeout=20)
    assert "invalid auth token" in w.proc.log()  # what etcd answered the old token
    etcdctl(server, "user", "passwd", "reader", "--interactive=false", stdin="pw\n")
    w.wait_resynced()
    w.stop_sampling()
    etcdctl(server, "put", "/certs/a", "2")
    w.wait_tree({"a": b"2"})
    busy_wait(lambda: w.signals() == 1)
    assert w.starts() == 1
    assert "pw" not in w.proc.log().replace("passwd", "")  # never the password


def test_auth_permission_revoked(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    server = own_etcd()
    server.client().put("/certs/a", "1")
    enable_auth(server)
    w = watched(server.endpoint, env={"ETCD_USERNAME_AND_PASSWORD": "reader:pw"})
    w.wait_tree({"a": b"1"})
    etcdctl(server, "role", "revoke-permission", "reader", "/certs/", "--prefix=true")
    busy_wait(lambda: "permission denied" in w.proc.log(), timeout=20)
    assert read_tree(w.target) == {"a": b"1"}  # kept
    etcdctl(server, "role", "grant-permission", "reader", "--prefix=true", "read", "/certs/")
    etcdctl(server, "put", "/certs/a", "2")
    w.wait_tree({"a": b"2"})
    assert w.starts() == 1


def test_member_in_use_dies_and_another_takes_over(watched: Callable[..., Watched]) -> None:
    members = start_cluster(3)
    try:
        client = members[1].client()
        client.put("/certs/a", "1")
        w = watched(",".join(m.endpoint for m in members))
        w.wait_tree({"a": b"1"})
        in_use = next(m for m in members if f"connected to http://{m.endpoint}" in w.proc.log())
        w.sample_while({"a": b"1"}, {"a": b"2"})
        in_use.stop()
        survivor = next(m for m in members if m is not in_use)
        survivor.client().put("/certs/a", "2")
        w.wait_tree({"a": b"2"})
        w.stop_sampling()
        busy_wait(lambda: w.signals() == 1)
        log = w.proc.log()
        assert log.count("connected to") >= 2  # it moved to another member
        assert w.starts() == 1
        time.sleep(0.5)
        assert w.signals() == 1  # one change, one signal, however many reconnects
    finally:
        for member in members:
            member.cleanup()


def test_wait_window_survives_an_etcd_restart(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    """A change absorbed during --wait, then etcd restarts: it is still published."""
    server = own_etcd()
    client = server.client()
    client.put("/certs/a", "1")
    w = watched(server.endpoint, "--wait=3s:10s")
    w.wait_tree({"a": b"1"})
    time.sleep(1.2)  # past the child's start-up settle
    client.put("/certs/a", "2")
    time.sleep(0.3)  # absorbed, still waiting for quiet
    server.stop()
    time.sleep(0.5)
    server.start()
    w.wait_tree({"a": b"2"}, timeout=30)
    busy_wait(lambda: w.signals() == 1, timeout=10)
    assert w.starts() == 1


def test_auth_user_removed_and_added_again(
    own_etcd: Callable[..., EtcdServer], watched: Callable[..., Watched]
) -> None:
    server = own_etcd()
    server.client().put("/certs/a", "1")
    enable_auth(server)
    w = watched(server.endpoint, env={"ETCD_USERNAME": "reader", "ETCD_PASSWORD": "pw"})
    w.wait_tree({"a": b"1"})
    w.sample_while({"a": b"1"})
    etcdctl(server, "user", "delete", "reader")
    busy_wait(lambda: "authentication failed" in w.proc.log(), timeout=20)
    etcdctl(server, "user", "add", "reader:pw")
    etcdctl(server, "user", "grant-role", "reader", "reader")
    w.wait_resynced()
    w.stop_sampling()
    etcdctl(server, "put", "/certs/a", "2")
    w.wait_tree({"a": b"2"})
    busy_wait(lambda: w.signals() == 1)
    assert w.starts() == 1
