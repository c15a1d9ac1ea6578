"""--on-change: a command run after each change is live (and the child signalled).

For what a signal to one's own child cannot reach: a systemd service
(``systemctl reload nginx``), PostgreSQL outside the container (``pg_ctl
reload``), an HTTP reload endpoint (``curl -X POST .../-/reload``): confd's
``reload_cmd``, consul-template's ``command``, git-sync's exechook.

It runs on its own thread, so a slow hook never delays the next snapshot.
One run at a time: changes made live while it runs are merged and handed to
the next run (the paths' last state wins: written then removed is removed).
Its environment: the child's (no ETCD_* secrets), plus DISPENSER_REVISION,
DISPENSER_TARGET, and DISPENSER_WRITTEN / DISPENSER_REMOVED, the paths
relative to the target, one a line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .health import Stats
from .logs import fields, output_tail

log = logging.getLogger(__name__)

# command, env, timeout, cancel -> exit code, output
Runner = Callable[[str, Mapping[str, str], float, threading.Event], tuple[int, str]]


class OnChange:
    """Runs the hook for changes handed over by ``changed``, merged while it runs."""

    def __init__(
        self,
        command: str,
        env: Mapping[str, str],
        target: Path,
        run: Runner,
        stats: Stats,
        timeout: float,
    ) -> None:
        self.command = command
        self.env = dict(env)
        self.target = target
        self.run_command = run
        self.stats = stats
        self.timeout = timeout
        self._lock = threading.Condition()
        self._paths: dict[str, bool] = {}  # path -> written (True) or removed (False)
        self._revision: int | None = None  # the newest change not yet run for
        self._stopping = False
        self._cancel = threading.Event()  # set by stop(): a run in progress is killed
        self._thread: threading.Thread | None = None
        self.runs = 0  # finished runs, for tests and metrics

    def changed(
        self, revision: int, _files: Mapping[str, bytes], written: list[str], removed: list[str]
    ) -> None:
        """A change is live (publisher thread): run the hook for it, now or next."""
        with self._lock:
            self._paths.update(dict.fromkeys(written, True))
            self._paths.update(dict.fromkeys(removed, False))
            self._revision = revision
            self._lock.notify()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._loop, name="on-change", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, wait: float = 5.0) -> None:
        """No more runs; a run in progress is killed (its process group), not orphaned."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(wait)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._revision is None and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                revision, paths = self._revision, self._paths
                self._revision, self._paths = None, {}
            assert revision is not None
            self._run(revision, paths)

    def _run(self, revision: int, paths: dict[str, bool]) -> None:
        written = sorted(p for p, present in paths.items() if present)
        removed = sorted(p for p, present in paths.items() if not present)
        env = {
            **self.env,
            "DISPENSER_REVISION": str(revision),
            "DISPENSER_TARGET": str(self.target),
            "DISPENSER_WRITTEN": "\n".join(written),
            "DISPENSER_REMOVED": "\n".join(removed),
        }
        code, output = self.run_command(self.command, env, self.timeout, self._cancel)
        if self._cancel.is_set():
            return
        tail = output_tail(output)
        if code == 0:
            self.stats.on_change_error = ""
            log.info(
                "r%d: --on-change exited with 0%s",
                revision,
                f": {tail}" if tail else "",
                extra=fields("on_change", revision=revision, exit_code=code),
            )
        else:
            self.stats.on_change_failures += 1
            self.stats.on_change_error = f"r{revision}: exit code {code}: {tail or 'no output'}"
            log.error(
                "r%d: --on-change failed with exit code %d: %s",
                revision,
                code,
                tail or "no output",
                extra=fields("on_change_failed", revision=revision, exit_code=code),
            )
        self.runs += 1
