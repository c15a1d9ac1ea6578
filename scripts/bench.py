#!/usr/bin/env python3
"""Benchmark: put -> child signalled, against the fastest way to see the event.

One real local etcd on loopback. Every figure is a time from just before a put
(through etcd's JSON gateway, on a kept-alive connection) to a stamp of
CLOCK_MONOTONIC, which all processes share:

- the floor: a native watch (``etcdctl watch --prefix``, Go and gRPC) printing
  the event; the stamp is taken when its line is read;
- the dispenser: its child stamps the moment it has the SIGHUP.

Patterns: one-key changes back to back (each put right after the previous
signal), spaced (0.3 s apart), then back to back again (the rotation of spares
the first burst grew is still there); a target on ext4 (/var/tmp, or whatever holds
it) and on tmpfs (/dev/shm); 100 and 10,000 keys (and more with
--sizes). p50, p90 and p99, and the overhead over the floor measured in the
same run. Also: the initial sync (launch -> child started) beside a plain loop
creating the same files on the same disk in the same run, and the peak RSS.

Usage: scripts/bench.py [--back-to-back N] [--spaced N] [--sizes 100,10000]
Nothing here is asserted: it prints figures.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.local import EtcdServer  # the tests' real etcd, on free ports

# The child stamps CLOCK_MONOTONIC as it takes each SIGHUP, as nginx would reload. It
# catches SIGHUP (the dispenser waits for that, SigCgt) but keeps it blocked and takes
# it with sigwait: a handler with signal.pause() loses a signal that lands between the
# handler's return and the next pause() (seen once in 300 changes, the bench hung).
CHILD = """
import os, signal, time
signal.signal(signal.SIGHUP, lambda *_: None)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
os.write(1, b"start %d\\n" % time.monotonic_ns())
while True:
    signal.sigwait({signal.SIGHUP})
    os.write(1, b"hup %d\\n" % time.monotonic_ns())
"""
VALUE_SIZE = 1024


class Putter:
    """Puts through etcd's JSON gateway on one kept-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def _post(self, path: str, body: dict[str, object]) -> None:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")

    def put(self, key: str, value: bytes) -> None:
        b64 = base64.b64encode
        self._post("/v3/kv/put", {"key": b64(key.encode()).decode(), "value": b64(value).decode()})

    def put_many(self, items: dict[str, bytes]) -> None:
        b64 = base64.b64encode
        ops = [
            {"requestPut": {"key": b64(k.encode()).decode(), "value": b64(v).decode()}}
            for k, v in items.items()
        ]
        self._post("/v3/kv/txn", {"success": ops})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(values: list[float]) -> tuple[float, float, float]:
    return percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99)


def fill(putter: Putter, prefix: str, count: int) -> None:
    value = os.urandom(VALUE_SIZE // 2).hex().encode()
    for start in range(0, count, 100):  # etcd takes at most 128 operations a transaction
        putter.put_many(
            {f"{prefix}key-{i:05d}.pem": value for i in range(start, min(start + 100, count))}
        )


def measure(
    putter: Putter, key: str, samples: int, spacing: float, read_stamp: object
) -> list[float]:
    """put -> stamp, in ms; each put right after the previous stamp, plus ``spacing``."""
    latencies = []
    for i in range(samples):
        before = time.monotonic_ns()
        putter.put(key, b"%08d" % i + b"v" * (VALUE_SIZE - 8))
        stamp = read_stamp()  # type: ignore[operator]
        latencies.append((stamp - before) / 1e6)
        if spacing:
            time.sleep(spacing)
    return latencies


def floor(server: EtcdServer, putter: Putter, samples: int, spacing: float) -> list[float]:
    """The native watch: etcdctl prints each event; stamped when its first line is read."""
    prefix = f"/floor{time.monotonic_ns()}/"
    watcher = subprocess.Popen(
        ["etcdctl", f"--endpoints={server.endpoint}", "watch", "--prefix", prefix],
        stdout=subprocess.PIPE, env={**os.environ, "ETCDCTL_API": "3"}, bufsize=0,
    )  # fmt: skip
    assert watcher.stdout is not None
    out = watcher.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the watch is registered: an event comes back
        putter.put(prefix + "warm-up", b"x")
        ready, _, _ = select.select([out], [], [], 0.2)
        if ready:
            break
    for _ in range(3):
        out.readline()
    time.sleep(0.2)
    while select.select([out], [], [], 0.0)[0]:  # warm-up events still on their way
        out.readline()

    def read_stamp() -> int:
        line = out.readline()  # "PUT"; then the key and the value
        stamp = time.monotonic_ns()
        assert line.strip() == b"PUT", line
        out.readline()
        out.readline()
        return stamp

    try:
        return measure(putter, prefix + "k", samples, spacing, read_stamp)
    finally:
        watcher.terminate()
        watcher.wait(10)


def plain_create(directory: Path, count: int) -> float:
    """Seconds to create and write ``count`` files of VALUE_SIZE, as a plain loop would."""
    directory.mkdir()
    value = b"x" * VALUE_SIZE
    start = time.monotonic()
    for i in range(count):
        fd = os.open(directory / f"key-{i:05d}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, value)
        os.close(fd)
    os.sync()
    elapsed = time.monotonic() - start
    shutil.rmtree(directory)
    return elapsed


class Dispenser:
    """The dispenser with a stamping child, on one prefix and one target."""

    def __init__(self, server: EtcdServer, prefix: str, target: Path) -> None:
        env = {**os.environ, "ETCD_ENDPOINTS": server.endpoint}
        child = target.parent / "child.py"
        child.write_text(CHILD)
        self.launched = time.monotonic_ns()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "etcd_config_dispenser", f"--prefix={prefix}",
             f"--target={target}", "--log-level=warning", "--", sys.executable, str(child)],
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.out = self.proc.stdout
        word, stamp = self.out.readline().split()
        assert word == b"start", word
        self.initial_sync = (int(stamp) - self.launched) / 1e9

    def read_stamp(self) -> int:
        word, stamp = self.out.readline().split()
        assert word == b"hup", word
        return int(stamp)

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM"))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--back-to-back", type=int, default=300, help="samples, back to back")
    parser.add_argument("--spaced", type=int, default=40, help="samples, 0.3 s apart")
    parser.add_argument("--sizes", default="100,10000", help="keys held, comma-separated")
    parser.add_argument("--filesystems", default="ext4,tmpfs", help="ext4 (/var/tmp), tmpfs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    roots = {"ext4": Path("/var/tmp"), "tmpfs": Path("/dev/shm")}  # ext4 here: the root fs
    rows: list[tuple[str, list[float]]] = []
    other: list[str] = []
    server = EtcdServer().start()
    try:
        http_port = server.client_port
        putter = Putter(http_port)
        rows.append(("floor, back to back", floor(server, putter, args.back_to_back, 0.0)))
        rows.append(("floor, spaced 0.3 s", floor(server, putter, args.spaced, 0.3)))
        for size in sizes:
            prefix = f"/bench{size}/"
            fill(putter, prefix, size)
            for fs in args.filesystems.split(","):
                with tempfile.TemporaryDirectory(prefix="bench-", dir=roots[fs]) as tmp:
                    plain = plain_create(Path(tmp) / "plain", size)
                    dispenser = Dispenser(server, prefix, Path(tmp) / "config")
                    time.sleep(1.5)  # housekeeping after the first snapshot
                    key = f"{prefix}key-{size // 2:05d}.pem"
                    name = f"{size} keys, {fs}"
                    read = dispenser.read_stamp
                    rows.append(
                        (
                            f"{name}, back to back",
                            measure(putter, key, args.back_to_back, 0.0, read),
                        )
                    )
                    rows.append(
                        (f"{name}, spaced 0.3 s", measure(putter, key, args.spaced, 0.3, read))
                    )
                    # The same burst again, within the 5 minutes the rotation it grew
                    # is kept: what a burst costs once the spares it needs are there.
                    rows.append(
                        (
                            f"{name}, back to back again",
                            measure(putter, key, args.back_to_back, 0.0, read),
                        )
                    )
                    sync = dispenser.initial_sync
                    other.append(
                        f"{name}: initial sync {sync:.2f} s (plain create loop {plain:.2f} s, "
                        f"+{sync - plain:.2f} s); peak RSS {dispenser.peak_rss_mib():.1f} MiB"
                    )
                    dispenser.stop()
    finally:
        server.cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} {platform.node()}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, commit {commit.stdout.strip() or '?'}, "
          f"{VALUE_SIZE}-byte values")  # fmt: skip
    print(f"\n{'put -> seen (ms)':<40}{'p50':>8}{'p90':>8}{'p99':>8}{'n':>6}")
    for name, values in rows:
        p50, p90, p99 = stats(values)
        print(f"{name:<40}{p50:>8.2f}{p90:>8.2f}{p99:>8.2f}{len(values):>6}")
    floors = {"back to back": stats(rows[0][1]), "spaced 0.3 s": stats(rows[1][1])}
    floors["back to back again"] = floors["back to back"]
    print("\noverhead over the native floor of the same pattern (ms)")
    for name, values in rows[2:]:
        base = floors[name.rsplit(", ", 1)[1]]
        p50, p90, p99 = stats(values)
        print(f"  {name:<38}p50 +{p50 - base[0]:.2f}  p90 +{p90 - base[1]:.2f}  "
              f"p99 +{p99 - base[2]:.2f}")  # fmt: skip
    print()
    for line in other:
        print(line)


if __name__ == "__main__":
    main()
