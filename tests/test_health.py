"""--health-addr (/healthz, /metrics) and --log-format=json, against a real etcd."""

from __future__ import annotations

import http.client
import json
import socket
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
    read_tree,
)

from etcd_config_dispenser import __version__

pytestmark = pytest.mark.integration

Start = Callable[..., DispenserProcess]


def test_healthz_and_metrics_follow_the_sync(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    etcd.put(prefix + "../bad", b"x")  # type: ignore[attr-defined]
    port = free_port()
    proc = dispenser(f"--health-addr=127.0.0.1:{port}")
    busy_wait(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
    _status, body = http_get(port, "/healthz")
    revision = etcd.get_response(prefix + "a").header.revision  # type: ignore[attr-defined]
    assert body.strip() == f"ok: r{revision}"
    status, text = http_get(port, "/metrics")
    assert status == 200
    assert metric(text, "revision") == revision
    assert metric(text, "snapshots_total") == 1
    assert metric(text, "skipped_keys") == 1  # a gauge: the keys skipped now
    assert metric(text, "files") == 1
    assert metric(text, "healthy") == 1
    assert metric(text, "last_sync_timestamp_seconds") > 1.7e9
    etcd.put(prefix + "a", b"2")  # type: ignore[attr-defined]
    busy_wait(lambda: metric(http_get(port, "/metrics")[1], "snapshots_total") == 2)
    text = http_get(port, "/metrics")[1]
    assert metric(text, "revision") == revision + 1
    assert metric(text, "skipped_keys") == 1  # not counted again at each change
    assert metric(text, "signals_total") == 0  # no child: nothing was signalled
    assert metric(text, f'build_info{{version="{__version__}"}}') == 1
    assert metric(text, 'sync_failures_total{reason="etcd"}') == 0
    assert "\nprocess_resident_memory_bytes " in text  # the standard process metrics
    assert "\nprocess_open_fds " in text
    assert http_get(port, "/nope")[0] == 404
    assert proc.stop() == 0


def head(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("HEAD", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_healthz_says_503_and_why_while_etcd_is_down(tmp_path: Path, target: Path) -> None:
    server = EtcdServer().start()
    port = free_port()
    proc = DispenserProcess(
        ["--prefix=/p", f"--target={target}", f"--health-addr=127.0.0.1:{port}",
         "--backoff-max=1"],
        {"ETCD_ENDPOINTS": server.endpoint},
        tmp_path / "dispenser.log",
    )  # fmt: skip
    try:
        server.client().put("/p/a", "1")
        busy_wait(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
        server.stop()
        busy_wait(lambda: http_get(port, "/healthz")[0] == 503, timeout=20)
        _status, reason = http_get(port, "/healthz")
        assert "etcd unavailable, serving r" in reason and "UNAVAILABLE" in reason
        assert read_tree(target) == {"a": b"1"}  # still served
        assert head(port, "/healthz") == (503, b"")  # HEAD: the status, no body
        assert http_get(port, "/livez") == (200, "alive\n")  # delivery down, process up
        server.start()
        busy_wait(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
        text = http_get(port, "/metrics")[1]
        assert metric(text, "reconnects_total") >= 1
        assert metric(text, 'sync_failures_total{reason="etcd"}') >= 1
        assert metric(text, 'sync_failures_total{reason="write"}') == 0
    finally:
        proc.cleanup()
        server.cleanup()


def test_health_address_in_use_is_a_clear_error(
    prefix: str, target: Path, dispenser: Start
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = dispenser(f"--health-addr=127.0.0.1:{port}")
        assert proc.wait() == 2
    assert "--health-addr: cannot listen on 127.0.0.1" in proc.log()


def test_json_logs_one_object_a_line_without_values_or_passwords(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    etcd.put(prefix + "secret.key", b"TOP-SECRET-VALUE")  # type: ignore[attr-defined]
    etcd.put(prefix + "..bad", b"x")  # type: ignore[attr-defined]
    proc = dispenser("--log-format=json", "--once")
    assert proc.wait() == 0
    entries = [json.loads(line) for line in proc.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["level"] == "warning" and "..bad" in e["message"] for e in entries)
    assert "TOP-SECRET-VALUE" not in proc.log()


def test_json_logs_carry_the_event_fields(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    """A collector selects on fields: what was written and removed, which revision,
    which signal went to which pid, how the child ended; no parsing of messages."""
    etcd.put(prefix + "gone", b"1")  # type: ignore[attr-defined]
    etcd.put(prefix + "dir/kept", b"1")  # type: ignore[attr-defined]
    child = ["sh", "-c", "trap 'echo hup' HUP; while :; do sleep 0.05; done"]
    proc = dispenser("--log-format=json", command=child)

    def events(name: str) -> list[dict[str, object]]:
        entries = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
        return [e for e in entries if e.get("event") == name]

    busy_wait(lambda: bool(events("child_started")), timeout=20)
    (first,) = events("first_sync")
    assert first["files"] == 2 and isinstance(first["revision"], int)
    tx = etcd.transactions  # type: ignore[attr-defined]
    etcd.transaction(  # type: ignore[attr-defined]
        compare=[], success=[tx.put(prefix + "dir/new", b"2"), tx.delete(prefix + "gone")],
        failure=[],
    )  # fmt: skip
    revision = etcd.get_response(prefix + "dir/new").header.revision  # type: ignore[attr-defined]
    busy_wait(lambda: bool(events("signalled")), timeout=20)
    (published,) = events("published")
    assert published["revision"] == revision
    assert published["written"] == ["dir/new"] and published["removed"] == ["gone"]
    assert published["files"] == 2
    (signalled,) = events("signalled")
    assert signalled["revision"] == revision and signalled["signal"] == "SIGHUP"
    (started,) = events("child_started")
    assert signalled["pid"] == started["pid"]
    assert proc.stop() == 143  # the child's status: killed by SIGTERM
    (exited,) = events("child_exited")
    assert exited["pid"] == started["pid"] and exited["exit_code"] == 143
