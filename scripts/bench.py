#!/usr/bin/env python3
"""Benchmark: commit -> child signalled, against a bare watch on the same local etcd.

Measures, in one run:
  - the floor: put -> event seen by a plain etcd3 watch;
  - put -> child signalled through the dispenser (after the flip), at 100 and
    at 10,000 keys (1 KiB values), p50 and p99;
  - the initial sync at 10,000 keys (dispenser start -> child start);
  - peak RSS of the dispenser at 10,000 keys.
Prints a table and the ratios. Times come from CLOCK_MONOTONIC, which is
shared by every process on the machine, so the child reports when it got the
signal and the benchmark subtracts the moment before its put.

Usage: scripts/bench.py [--samples N] [--spacing SECONDS] [--big N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import EtcdServer, txn_put  # the tests' real etcd, on free ports

# The child: blocks SIGHUP, waits for it synchronously, prints when it arrived.
CHILD = """
import os, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
print("start", time.monotonic_ns(), flush=True)
while True:
    signal.sigwait({signal.SIGHUP})
    print("hup", time.monotonic_ns(), flush=True)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fill(client: object, prefix: str, count: int, size: int) -> None:
    value = os.urandom(size // 2).hex().encode()
    for start in range(0, count, 100):  # etcd takes at most 128 operations a transaction
        keys = range(start, min(start + 100, count))
        txn_put(client, prefix, {f"key-{i:05d}.pem": value for i in keys})  # type: ignore[arg-type]


def bare_watch(server: EtcdServer, samples: int, spacing: float) -> list[float]:
    """put -> event seen by a plain etcd3 watch callback, in ms."""
    watcher, writer = server.client(), server.client()
    seen: list[int] = []
    arrived = threading.Event()

    def on_event(response: object) -> None:
        seen.append(time.monotonic_ns())
        arrived.set()

    watch_id = watcher.add_watch_prefix_callback("/bare/", on_event)
    latencies = []
    for i in range(samples):
        arrived.clear()
        before = time.monotonic_ns()
        writer.put("/bare/key", str(i))
        arrived.wait(5)
        latencies.append((seen[-1] - before) / 1e6)
        time.sleep(spacing)
    watcher.cancel_watch(watch_id)  # not closed: etcd3's watch thread would log the closed channel
    writer.close()
    return latencies


def through_dispenser(
    server: EtcdServer, keys: int, samples: int, spacing: float, size: int
) -> dict[str, float | list[float]]:
    """put -> child signalled after the flip, in ms; plus initial sync and peak RSS."""
    client = server.client()
    prefix = f"/bench{keys}/"
    fill(client, prefix, keys, size)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        child = Path(tmp) / "child.py"
        child.write_text(CHILD)
        env = {**os.environ, "ETCD_ENDPOINTS": server.endpoint}
        started = time.monotonic_ns()
        proc = subprocess.Popen(
            [sys.executable, "-m", "etcd_config_dispenser", f"--prefix={prefix}",
             f"--target={tmp}/config", "--log-level=warning", "--",
             sys.executable, str(child)],
            stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        word, stamp = proc.stdout.readline().split()
        assert word == "start"
        initial_sync = (int(stamp) - started) / 1e6
        time.sleep(1.0)  # let the first snapshot's garbage collection finish
        latencies = []
        value = os.urandom(size // 2).hex()
        for i in range(samples):
            before = time.monotonic_ns()
            client.put(f"{prefix}key-{i % keys:05d}.pem", f"{i:08d}{value[8:]}")
            word, stamp = proc.stdout.readline().split()
            latencies.append((int(stamp) - before) / 1e6)
            time.sleep(spacing)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_rss = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
        proc.terminate()
        proc.wait(15)
    client.close()
    return {"latencies": latencies, "initial_sync": initial_sync, "peak_rss_mib": peak_rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100, help="transactions per scenario")
    parser.add_argument("--spacing", type=float, default=0.3, help="seconds between them")
    parser.add_argument("--big", type=int, default=10_000, help="keys in the large scenario")
    parser.add_argument("--size", type=int, default=1024, help="bytes per value")
    args = parser.parse_args()

    server = EtcdServer().start()
    try:
        floor = bare_watch(server, args.samples, args.spacing)
        small = through_dispenser(server, 100, args.samples, args.spacing, args.size)
        big = through_dispenser(server, args.big, args.samples, args.spacing, args.size)
    finally:
        server.cleanup()

    def row(name: str, values: list[float]) -> tuple[str, float, float]:
        return name, statistics.median(values), percentile(values, 0.99)

    rows = [
        row("bare watch (floor)", floor),
        row("dispenser, 100 keys", small["latencies"]),  # type: ignore[arg-type]
        row(f"dispenser, {args.big} keys", big["latencies"]),  # type: ignore[arg-type]
    ]
    print(f"\n{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.samples} single-key transactions per row, {args.spacing}s apart, "
          f"{args.size}-byte values")  # fmt: skip
    print(f"\n{'put -> seen':<28}{'p50 ms':>10}{'p99 ms':>10}")
    for name, p50, p99 in rows:
        print(f"{name:<28}{p50:>10.2f}{p99:>10.2f}")
    floor_p50, floor_p99 = rows[0][1], rows[0][2]
    print("\noverhead over the bare watch (target: p50 <= 1.5 ms, p99 <= 5 ms)")
    for name, p50, p99 in rows[1:]:
        print(f"  {name:<26}p50 +{p50 - floor_p50:.2f} ms   p99 +{p99 - floor_p99:.2f} ms")
    ratio = rows[2][1] / rows[1][1]
    print(f"\none-key change, {args.big} keys / 100 keys (p50): {ratio:.2f}x (target <= 2x)")
    print(f"initial sync at {args.big} keys: {big['initial_sync']:.0f} ms (target <= 1500 ms)")
    print(f"peak RSS at {args.big} keys: {big['peak_rss_mib']:.1f} MiB (target <= 80 MiB)")


if __name__ == "__main__":
    main()
