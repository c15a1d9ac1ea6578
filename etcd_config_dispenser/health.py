"""--health-addr: /healthz for orchestrators, /metrics for Prometheus.

A plain HTTP server on its own thread that only reads ``Stats``, which the
publisher and the etcd session write (single assignments of ints and floats: safe to read from
another thread in CPython).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)

STALE_AFTER = 10.0  # seconds without a sign of life from etcd before /healthz says 503


@dataclass
class Stats:
    """What the publisher and the etcd session did; read by /healthz and /metrics."""

    revision: int = 0
    serving: str | None = None  # the live snapshot, ours or a previous run's
    first_sync: bool = False
    connected: bool = False
    last_ok: float = 0.0  # monotonic: last successful read, watch event or liveness check
    last_sync: float = 0.0  # wall clock: last snapshot made live
    last_error: str = ""
    write_error: str = ""  # why the last snapshot could not be written, until one is
    snapshots: int = 0
    signals: int = 0
    reconnects: int = 0
    etcd_failures: int = 0  # failed attempts to read or follow etcd
    write_failures: int = 0
    skipped_keys: int = 0  # keys not written now: refused by the key rules, or shadowed
    files: int = 0  # files in the live snapshot
    check_failures: int = 0
    on_change_failures: int = 0
    on_change_error: str = ""  # why the last --on-change run failed, until one succeeds
    missing_required: list[str] = field(default_factory=list)  # --require keys not in etcd
    stale_since: str | None = None  # --stale-start: the child runs on this earlier snapshot
    certificate_failures: int = 0  # snapshots --verify-certs refused
    certificate_refused: str = ""  # why the last one was, until one passes
    not_after: dict[str, float] = field(default_factory=dict)  # certificate path -> expiry
    reload_failures: int = 0  # --verify-tls: changes the child did not serve
    reload_failed: str = ""  # why the last one was not, until one is
    reload_checked: int | None = None  # the revision --verify-tls looked at last
    verifies: bool = False  # --verify-tls is on: a rollout waits for its verdict
    publisher_running: Callable[[], bool] = lambda: True

    def etcd_answered(self, reconnect: bool = False) -> None:
        if reconnect and self.last_ok:
            self.reconnects += 1
        self.connected = True
        self.last_ok = time.monotonic()

    def etcd_failed(self, error: str) -> None:
        self.etcd_failures += 1
        self.connected = False
        self.last_error = error

    def write_failed(self, error: str) -> None:
        self.write_failures += 1
        self.write_error = error

    def write_ok(self) -> None:
        self.write_error = ""

    def served(self, revision: int, name: str | None, files: int | None = None) -> None:
        """A snapshot is live (``files`` given: a new one)."""
        if self.verifies and not self.reload_failed and (files is None or not self.first_sync):
            # --verify-tls has nothing to look at: no file changed, or the child starts
            # with these files; a rollout waiting for this revision may count it.
            self.reload_checked = revision
        self.revision = revision
        self.serving = name
        if files is not None:
            self.first_sync = True
            self.files = files
            self.snapshots += 1
            self.last_sync = time.time()

    def serving_text(self) -> str:
        if self.first_sync:
            return f"serving r{self.revision}"
        if self.serving:
            return f"serving {self.serving!r}, left by an earlier run"
        return "nothing served yet"

    def running(self) -> bool:
        """/livez: the process and its publisher run (not whether etcd answers: a
        liveness probe must not restart a working child during an etcd outage)."""
        return self.publisher_running()

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): a snapshot is live, the target writable, etcd answered recently."""
        if self.write_error:
            return False, f"cannot write the target: {self.write_error}; {self.serving_text()}"
        if self.certificate_refused:
            return False, f"certificate refused: {self.certificate_refused}; {self.serving_text()}"
        if self.missing_required:
            missing = ", ".join(repr(p) for p in self.missing_required)
            return False, f"waiting for required keys: {missing}; {self.serving_text()}"
        if self.stale_since is not None:
            why = self.last_error or "no answer yet"
            return False, f"serving stale data: {self.stale_since}, etcd: {why}"
        if not self.first_sync:
            return False, f"no snapshot yet: {self.last_error or 'first read in progress'}"
        if self.reload_failed:
            return False, f"{self.reload_failed}; serving r{self.revision}"
        if self.on_change_error:
            return False, f"--on-change failed: {self.on_change_error}; serving r{self.revision}"
        if not self.connected:
            return False, f"etcd unavailable, serving r{self.revision}: {self.last_error}"
        quiet = time.monotonic() - self.last_ok
        if quiet > STALE_AFTER:
            return False, f"no answer from etcd for {quiet:.0f}s, serving r{self.revision}"
        return True, f"ok: r{self.revision}"


def _metrics(stats: Stats) -> bytes | None:
    """The Prometheus text format, or None without the optional prometheus_client."""
    try:
        from prometheus_client import (
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
            generate_latest,
        )
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        return None

    class Collector:
        def collect(self) -> Iterator[Any]:
            prefix = "etcd_config_dispenser_"
            yield GaugeMetricFamily(prefix + "revision", "etcd revision of the live snapshot",
                                    value=stats.revision)  # fmt: skip
            yield GaugeMetricFamily(prefix + "last_sync_timestamp_seconds",
                                    "when the last snapshot was made live (Unix time)",
                                    value=stats.last_sync)  # fmt: skip
            yield GaugeMetricFamily(prefix + "healthy", "1 while /healthz answers 200",
                                    value=1.0 if stats.health()[0] else 0.0)  # fmt: skip
            yield GaugeMetricFamily(prefix + "skipped_keys",
                                    "keys not written now: refused by the key rules or shadowed",
                                    value=stats.skipped_keys)  # fmt: skip
            yield GaugeMetricFamily(prefix + "files", "files in the live snapshot",
                                    value=stats.files)  # fmt: skip
            for name, text, value in [
                ("snapshots", "snapshots made live", stats.snapshots),
                ("signals", "signals sent to the child after a change", stats.signals),
                ("reconnects", "connections to etcd after the first", stats.reconnects),
            ]:
                yield CounterMetricFamily(prefix + name, text, value=value)
            failures = CounterMetricFamily(
                prefix + "sync_failures",
                "attempts to deliver a change that failed, by reason: etcd (reading or "
                "following etcd), write (the target), check (rejected by --check), "
                "on_change (the --on-change command failed), "
                "certificate (refused by --verify-certs), reload (--verify-tls: not served)",
                labels=["reason"],
            )
            failures.add_metric(["etcd"], stats.etcd_failures)
            failures.add_metric(["write"], stats.write_failures)
            failures.add_metric(["check"], stats.check_failures)
            failures.add_metric(["on_change"], stats.on_change_failures)
            failures.add_metric(["certificate"], stats.certificate_failures)
            failures.add_metric(["reload"], stats.reload_failures)
            yield failures
            expiry = GaugeMetricFamily(
                prefix + "certificate_not_after_timestamp_seconds",
                "when the leaf certificate of a delivered PEM file expires (Unix time)",
                labels=["path"],
            )
            for path, when in sorted(stats.not_after.items()):
                expiry.add_metric([path], when)
            yield expiry
            info = GaugeMetricFamily(prefix + "build_info", "always 1; the version as a label",
                                     labels=["version"])  # fmt: skip
            info.add_metric([__version__], 1.0)
            yield info

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    # The standard process_* and python_* series, as every Prometheus client exports them.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return bytes(generate_latest(registry))


def serve(host: str, port: int, stats: Stats) -> ThreadingHTTPServer:
    """Start the server on a daemon thread; raises OSError if the address cannot be bound.

    ``http.server`` is imported here, not with the module: it (and the ``email``
    package it pulls in) costs 2.4 MiB of every process's memory, measured after
    etcd3 and gRPC are loaded, and most runs have no --health-addr."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._head_only = True
            self.do_GET()

        def do_GET(self) -> None:
            if self.path == "/healthz":
                healthy, reason = stats.health()
                self._answer(200 if healthy else 503, reason.encode() + b"\n")
            elif self.path == "/livez":
                alive = stats.running()
                self._answer(200 if alive else 503, b"alive\n" if alive else b"stopped\n")
            elif self.path == "/metrics":
                body = _metrics(stats)
                if body is None:
                    self._answer(501, b"install etcd-config-dispenser[metrics] for /metrics\n")
                else:
                    self._answer(200, body, "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._answer(404, b"try /healthz, /livez or /metrics\n")

        def _answer(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "_head_only", False):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
