"""systemd Type=notify against a real etcd: the datagrams a unit's manager would get, read
from a socket this test listens on (as systemd does, at $NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import RECORDER, DispenserProcess, busy_wait

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]


class NotifySocket:
    """An AF_UNIX datagram socket, and every message received on it, in order."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.at_ready: dict[str, bytes] | None = None  # what the target held at READY=1
        self.target: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "READY" in message and self.target is not None:
                self.at_ready = {p.name: p.read_bytes() for p in self.target.iterdir()
                                 if not p.name.startswith("..")}  # fmt: skip
            self.messages.append(message)

    def values(self, name: str) -> list[str]:
        return [m[name] for m in self.messages if name in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[NotifySocket, str]]:
    address = "\0etcd-config-dispenser-test-" + os.urandom(6).hex()  # abstract: "@..."
    listener = NotifySocket(address)
    try:
        yield listener, "@" + address[1:]
    finally:
        listener.close()


def test_ready_once_the_files_are_live_and_the_child_started_then_status_and_stopping(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start,
    notify: tuple[NotifySocket, str],
) -> None:  # fmt: skip
    listener, address = notify
    listener.target = target
    etcd.put(prefix + "cert.pem", b"1")  # type: ignore[attr-defined]
    out = tmp_path / "child.out"
    proc = dispenser(env={"NOTIFY_SOCKET": address},
                     command=[sys.executable, "-c", RECORDER, str(out)])  # fmt: skip
    busy_wait(lambda: listener.values("READY") == ["1"], timeout=20)
    assert listener.at_ready == {"cert.pem": b"1"}  # the files were there at READY=1
    revision = etcd.get_response(prefix + "cert.pem").header.revision  # type: ignore[attr-defined]
    assert listener.values("MAINPID") == [str(proc.pid)]
    assert f"ok: r{revision}" in listener.values("STATUS")
    busy_wait(lambda: out.exists() and "start" in out.read_text(), timeout=20)  # the child
    etcd.put(prefix + "cert.pem", b"2")  # type: ignore[attr-defined]
    busy_wait(lambda: f"ok: r{revision + 1}" in listener.values("STATUS"), timeout=20)
    assert "WATCHDOG" not in {k for m in listener.messages for k in m}  # not asked for
    proc.stop()
    busy_wait(lambda: listener.values("STOPPING") == ["1"], timeout=20)
    env = (out.parent / (out.name + ".env")).read_text()
    assert "NOTIFY_SOCKET" not in env  # systemd's socket is ours, not the child's


def test_watchdog_pings_at_half_the_interval(
    etcd: object, prefix: str, target: Path, dispenser: Start, notify: tuple[NotifySocket, str]
) -> None:
    listener, address = notify
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    dispenser(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    busy_wait(lambda: len(listener.values("WATCHDOG")) >= 5, timeout=20)


def test_a_watchdog_meant_for_another_process_is_not_ours(
    etcd: object, prefix: str, target: Path, dispenser: Start, notify: tuple[NotifySocket, str]
) -> None:
    listener, address = notify
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    dispenser(env=env)
    busy_wait(lambda: listener.values("READY") == ["1"], timeout=20)
    busy_wait(lambda: len(listener.values("STATUS")) >= 1, timeout=5)
    time.sleep(1)
    assert listener.values("WATCHDOG") == []
