"""--status-prefix: each instance tells etcd what it serves, so a rollout can wait for all.

One key per instance, ``PREFIX/NAME``, holding JSON: the revision served,
a digest of the served files, when, the last --verify-tls result and the
earliest certificate expiry. It is written under a lease of LEASE_TTL
seconds that this thread keeps alive: an instance that dies (or loses etcd)
disappears by itself, and ``etcd-config-ctl wait`` only waits for live
ones. etcd is the only shared infrastructure. The instance needs read on
the config prefix and write on its own status key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from .health import Stats
from .keys import show
from .source import EtcdSource
from .values import readable

log = logging.getLogger(__name__)

LEASE_TTL = 10  # seconds: a dead instance's key is gone this long after its last sign of life
REFRESH_EVERY = 3.0  # seconds between lease keep-alives (and looks at the status)


class FilesDigest:
    """A digest of the served files that costs O(paths changed) per change: the XOR of
    sha256(path NUL value) over every file, so the order never matters."""

    def __init__(self) -> None:
        self._each: dict[str, int] = {}
        self._total = 0

    def update(
        self, _revision: int, files: Mapping[str, bytes], written: list[str], removed: list[str]
    ) -> None:
        """A change is live (publisher thread): the paths it wrote and removed."""
        for path in (*written, *removed):
            self._total ^= self._each.pop(path, 0)
            value = readable(files, path)  # None: unreadable, read from etcd again
            if value is not None:
                digest = hashlib.sha256(path.encode() + b"\0" + value).digest()
                self._each[path] = int.from_bytes(digest, "big")
                self._total ^= self._each[path]

    def hexdigest(self) -> str:
        return f"{self._total:064x}"


def status_of(instance: str, stats: Stats, digest: str) -> dict[str, Any]:
    """What one instance reports (``etcd-config-ctl status`` shows it)."""
    expiry = min(stats.not_after.values()) if stats.not_after else None
    return {
        "instance": instance,
        "revision": stats.revision if stats.first_sync else None,
        "files_sha256": digest,
        "served_at": stats.last_sync or None,
        "verifies": stats.verifies,
        "verified": None if stats.reload_checked is None else (stats.reload_failed or "ok"),
        "verified_revision": stats.reload_checked,
        "earliest_expiry": expiry,
        "healthy": stats.health()[0],
    }


class StatusReporter:
    """Keeps ``PREFIX/NAME`` current under a lease, on its own thread and connection."""

    def __init__(
        self, source: EtcdSource, instance: str, stats: Stats, digest: FilesDigest
    ) -> None:
        self.source = source  # its prefix is the status prefix
        self.key = source.prefix + instance.encode()
        self.instance = instance
        self.stats = stats
        self.digest = digest
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 3.0) -> None:
        """A clean stop: the thread deletes the key and revokes its lease (not only when
        the lease runs out), from the thread itself, so no put of its can come after."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)

    def _run(self) -> None:
        lease: Any = None
        written = ""
        failing = False
        while not self._stop.is_set():
            try:
                client = self.source.connected_client()
                if lease is None:
                    lease, written = client.lease(LEASE_TTL), ""
                else:
                    refreshed = list(client.refresh_lease(lease.id))
                    if not refreshed or refreshed[0].TTL <= 0:  # expired meanwhile: anew
                        lease, written = client.lease(LEASE_TTL), ""
                text = self._text()
                if text != written or client.get(self.key)[0] != text.encode():
                    # (read back too: another instance by the same name may have
                    # deleted it, or written its own; the names must differ: logged)
                    if written and text == written:
                        why = "changed by someone else: another instance of this name?"
                        log.warning("status: %s was %s", show(self.key), why)
                    client.put(self.key, text, lease=lease)
                    written = text
                if failing:
                    log.info("status: %s written again", show(self.key))
                failing = False
                self._pause(REFRESH_EVERY)
            except Exception as err:  # any failure, etcd's or ours: the thread goes on
                if not failing:
                    log.warning("status: cannot write %s: %s", show(self.key), err)
                failing, lease = True, None
                self.source.close()
                self.source.skip_endpoint()  # as the session does: the next one next
                self._stop.wait(1.0)
        self._withdraw(lease)

    def _withdraw(self, lease: Any) -> None:
        try:
            if lease is not None:
                lease.revoke()  # the key goes with it
            else:
                self.source.connected_client().delete(self.key)
        except Exception as err:  # etcd gone: the lease runs out instead
            log.debug("status: could not withdraw %s: %s", show(self.key), err)
        self.source.close()

    def _text(self) -> str:
        return json.dumps(status_of(self.instance, self.stats, self.digest.hexdigest()))

    def _pause(self, most: float) -> None:
        """Until the lease needs a keep-alive, or sooner when the status changed: a
        rollout is waiting for it."""
        deadline = time.monotonic() + most
        seen = self._text()
        while not self._stop.wait(0.05) and time.monotonic() < deadline:
            if self._text() != seen:
                return
