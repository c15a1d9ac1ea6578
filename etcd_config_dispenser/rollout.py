"""etcd-config-ctl status and wait: the instances' status keys (see ``status``), read back.

A rotation pipeline publishes a certificate, then waits until every live
instance serves that revision (and, where the instance verifies with
--verify-tls, verified it), and only then revokes the old certificate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .source import EtcdSource, range_end

POLL = 0.25  # seconds between reads while waiting


class Unreadable(Exception):
    """etcd did not answer until the deadline."""


def read(source: EtcdSource) -> list[dict[str, Any]]:
    """Every live instance's status (keys whose lease ran out are gone already)."""
    client = source.connected_client()
    found = []
    for value, _meta in client.get_range(source.prefix, range_end(source.prefix)):
        try:
            status = json.loads(value)
        except ValueError:
            continue  # not ours
        if isinstance(status, dict) and "instance" in status:
            found.append(status)
    return sorted(found, key=lambda s: str(s["instance"]))


def laggards(statuses: list[dict[str, Any]], revision: int, min_instances: int) -> list[str]:
    """Why the rollout of ``revision`` is not done yet: one entry per reason; [] if done."""
    behind = []
    for status in statuses:
        served, name = status.get("revision"), status["instance"]
        checked = status.get("verified_revision")
        if not isinstance(served, int) or served < revision:
            behind.append(f"{name} serves r{served}")
        elif status.get("verified") not in (None, "ok"):
            behind.append(f"{name}: {status['verified']}")
        elif status.get("verifies") and (not isinstance(checked, int) or checked < revision):
            behind.append(f"{name} has not verified r{revision} yet")
    if len(statuses) < min_instances:
        behind.append(f"{len(statuses)} live instances of at least {min_instances}")
    return behind


def wait(
    source: EtcdSource,
    revision: int,
    min_instances: int,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Until the rollout is done ([]) or ``timeout`` passed (what is still missing)."""
    deadline = clock() + timeout
    while True:
        try:
            missing = laggards(read(source), revision, min_instances)
        except Exception as err:
            source.close()
            source.skip_endpoint()
            if clock() >= deadline:
                raise Unreadable(str(err)) from None
            time.sleep(1.0)
            continue
        if not missing or clock() >= deadline:
            return missing
        time.sleep(POLL)


def table(statuses: list[dict[str, Any]]) -> str:
    """``etcd-config-ctl status``: one line per live instance."""
    rows = [("INSTANCE", "REVISION", "SERVED AT (UTC)", "VERIFIED", "EARLIEST EXPIRY", "HEALTHY")]
    for s in statuses:
        rows.append((
            str(s["instance"]),
            f"r{s['revision']}" if s.get("revision") is not None else "-",
            _when(s.get("served_at")),
            str(s.get("verified") or "-")[:40],
            _when(s.get("earliest_expiry")),
            "yes" if s.get("healthy") else "no",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def _when(stamp: object) -> str:
    if not isinstance(stamp, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))
