"""--check and --on-change: run a command to its end; its exit code and output tail.

--check is like confd's ``check_cmd``, --on-change like its ``reload_cmd``.
The command is started through the supervisor's ``own`` so that the reaper
leaves its exit status to us, and its output goes through a pipe of which
only the last CHECK_OUTPUT_MAX bytes are ever held: a check that prints
300 MB costs no memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Mapping

from .child import Supervisor, exit_code

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 30.0  # seconds a --check command may run before SIGKILL
CHECK_OUTPUT_MAX = 4000  # bytes of its output kept for the log
DRAIN_MAX = 64  # reads after the exit: a background process may keep the pipe open


def run_check(
    command: str,
    env: Mapping[str, str],
    supervisor: Supervisor,
    timeout: float = CHECK_TIMEOUT,
    what: str = "check",
    cancel: threading.Event | None = None,
) -> tuple[int, str]:
    """Run ``sh -c command`` to the end; its exit code and the tail of its output.

    It runs in a process group of its own: a timeout (or ``cancel``, set when
    the dispenser stops) kills the whole group, so that no ``sleep`` or
    ``curl`` it started runs on alone, or alongside the next run."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    redirect = [(os.POSIX_SPAWN_DUP2, write_end, 1), (os.POSIX_SPAWN_DUP2, write_end, 2)]
    tail = bytearray()

    def start() -> int:
        return os.posix_spawn(
            "/bin/sh", ["sh", "-c", command], env, file_actions=redirect,
            setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setpgroup=0,
        )  # fmt: skip

    try:
        with contextlib.ExitStack() as stack:
            try:
                pid = stack.enter_context(supervisor.own(start))
            except OSError as err:  # a check that cannot run has not passed
                return 127, f"cannot run the {what}: {err}"
            os.close(write_end)
            write_end = -1
            status = _wait(pid, read_end, tail, timeout, what, cancel or threading.Event())
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)
    return exit_code(status), tail.decode(errors="replace")


def _wait(
    pid: int, output: int, tail: bytearray, timeout: float, what: str, cancel: threading.Event
) -> int:
    """Keep the tail of the output until the process exits; its wait status."""
    deadline = time.monotonic() + timeout
    status: int | None = None
    drained = 0
    poller: select.poll | None = _poller(output)
    while True:
        ready = poller.poll(0 if status is not None else 10) if poller else []
        if ready and drained < DRAIN_MAX:
            chunk = os.read(output, 65536)
            if chunk:
                tail += chunk
                del tail[:-CHECK_OUTPUT_MAX]
                drained += status is not None
                continue
            poller = None  # EOF: nothing more will come
        if status is not None:  # exited, and nothing more to read (or EOF)
            return status
        if poller is None:
            time.sleep(0.005)
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            status = wait_status
        elif time.monotonic() > deadline or cancel.is_set():
            why = "the dispenser stops" if cancel.is_set() else f"still running after {timeout:g}s"
            log.warning("%s: %s: SIGKILL to its process group", what, why)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = float("inf")
            cancel = threading.Event()  # once


def _poller(fd: int) -> select.poll:
    """poll, not select: select fails on a descriptor numbered 1024 or more."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller
