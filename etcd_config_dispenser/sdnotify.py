"""systemd's notify protocol, for ``Type=notify`` units: READY, STATUS, WATCHDOG, STOPPING.

A datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading "@" is
the abstract namespace), as sd_notify(3) sends it: no library needed. READY=1
goes out once the first snapshot is live and the child started, so units
ordered ``After=`` this one find their files. STATUS= is /healthz's reason
("ok: r42", "etcd unavailable, serving r42: ..."), sent when it changes, so
``systemctl status`` shows it. With ``WatchdogSec=``, WATCHDOG=1 is sent at
half the interval while the publisher thread is alive: a publisher that
died (or a process that hangs whole) gets the unit restarted. Nothing is
sent, and nothing fails, without $NOTIFY_SOCKET.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from .health import Stats

log = logging.getLogger(__name__)

STATUS_EVERY = 1.0  # seconds between looks at the status


class Notifier:
    """Sends to systemd's notify socket, if there is one."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog: float | None = None  # seconds between WATCHDOG=1
        pid = environ.get("WATCHDOG_PID")
        usec = environ.get("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6 / 2
        self._stop = threading.Event()

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:  # systemd gone or the socket wrong: never fatal
            log.debug("sd_notify: %s", err)

    def ready(self, stats: Stats) -> None:
        self.send("READY=1", f"STATUS={stats.health()[1]}", f"MAINPID={os.getpid()}")

    def follow(self, stats: Stats) -> None:
        """Until stop(): STATUS when /healthz's reason changes; WATCHDOG=1 while running."""
        if not self.address:
            return
        threading.Thread(target=self._follow, args=(stats,), name="sd-notify", daemon=True).start()

    def _follow(self, stats: Stats) -> None:
        shown = ""
        step = min(STATUS_EVERY, self.watchdog or STATUS_EVERY)
        while not self._stop.wait(step):
            status = stats.health()[1]
            lines = [f"STATUS={status}"] if status != shown else []
            shown = status
            if self.watchdog is not None and stats.running():
                lines.append("WATCHDOG=1")
            if lines:
                self.send(*lines)

    def stopping(self) -> None:
        self._stop.set()
        self.send("STOPPING=1")
