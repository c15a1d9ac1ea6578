"""Child supervisor, in tini's shape: spawn, forward signals, reap, exit with the child's code.

Signals are blocked in every thread (``block_signals`` runs first in main,
before etcd's gRPC threads exist, so they inherit the mask) and collected
synchronously with ``sigtimedwait``: no async handlers, no races with the
threads that write snapshots.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from .logs import fields

log = logging.getLogger(__name__)

FORWARDED = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    }
)
TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
HANDLED = FORWARDED | {signal.SIGCHLD}  # SIGCHLD is collected, never forwarded
WAIT_STEP = 1.0  # seconds between checks when no signal arrives
PR_SET_CHILD_SUBREAPER = 36
# A signal in the child's first moments can kill it: nginx still parsing its
# config has no SIGHUP handler yet, and SIGHUP's default action is to exit.
# So a change waits until the child catches or ignores the signal, as Linux
# shows in /proc/PID/status, polled every SETTLE_POLL; a child that has not
# after START_SETTLE_MAX since its start gets the signal anyway (a program
# waiting in sigwait shows the signal neither caught nor ignored while it
# waits). Without /proc, a change waits until START_SETTLE after the start.
START_SETTLE = 1.0
START_SETTLE_MAX = 2.0
SETTLE_POLL = 0.005
# Signals whose default action is to do nothing: never worth waiting for.
HARMLESS = frozenset({signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT})


def handles(pid: int, signum: int) -> bool | None:
    """Whether process ``pid`` catches or ignores ``signum`` (SigCgt, SigIgn in
    /proc/PID/status); None if that cannot be read. Blocked (SigBlk) does not count:
    a shell blocks every signal for a moment around each fork, and a SIGHUP sent
    then kills it as soon as it unblocks."""
    try:
        with open(f"/proc/{pid}/status") as status:
            text = status.read()
    except OSError:
        return None
    bit, masks = 1 << (signum - 1), 0
    for line in text.splitlines():
        if line.startswith(("SigCgt:", "SigIgn:")):
            masks |= int(line.split(":", 1)[1], 16)
    return bool(masks & bit)


def block_signals() -> None:
    """Block the handled signals in this thread and every thread it starts later."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def become_subreaper() -> bool:
    """Adopt orphaned descendants even when not PID 1 (Linux PR_SET_CHILD_SUBREAPER).

    As PID 1 this is what the kernel does anyway; elsewhere (tests, a shell)
    it makes the reaping below apply to the child's orphans too.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded already (see fsops._libc)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def wait_signal(timeout: float) -> int | None:
    """One of the handled signals, or None after ``timeout``.

    After the process was stopped and continued (SIGSTOP, a cgroup freezer,
    docker pause), sigtimedwait has been seen to return without a signal and
    with garbage in si_signo: anything not asked for counts as nothing.
    """
    info = signal.sigtimedwait(HANDLED, timeout)
    if info is None or info.si_signo not in HANDLED:
        return None
    return int(info.si_signo)


def exit_code(status: int) -> int:
    """Exit code as a shell reports it: the code, or 128+N if signal N killed it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def describe_exit(status: int) -> str:
    """'exited with code 3', or 'killed by SIGSEGV (exit code 139)'."""
    if os.WIFSIGNALED(status):
        return f"killed by {_name(os.WTERMSIG(status))} (exit code {exit_code(status)})"
    return f"exited with code {exit_code(status)}"


class Supervisor:
    """Runs one child (or none, as a sidecar) and waits for it like PID 1 would."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], kill_timeout: float = 10.0
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.kill_timeout = kill_timeout
        self.pid: int | None = None
        self.started_at = 0.0
        self._handled: tuple[int, int] | None = None  # (pid, signal) seen caught
        self._reserved: set[int] = set()  # processes started by own(): reaped by their starter
        self._lock = threading.Lock()  # guards pid and _reserved against a concurrent reap

    def spawn(self) -> int | None:
        """Start the child; return None, or the exit code if it cannot start (127/126)."""
        if not self.argv:
            return None
        try:
            pid = os.posix_spawnp(
                self.argv[0],
                self.argv,
                self.env,
                setsigmask=(),  # the child must not inherit our blocked signals
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores these
            )
        except FileNotFoundError:
            log.error(
                "cannot start %s: command not found",
                self.argv[0],
                extra=fields("child_not_started", exit_code=127),
            )
            return 127
        except OSError as err:  # not executable, not a program, a file in the path...
            log.error(
                "cannot start %s: %s",
                self.argv[0],
                err.strerror,
                extra=fields("child_not_started", exit_code=126, error=err.strerror),
            )
            return 126
        with self._lock:
            self.pid = pid
            self.started_at = time.monotonic()
        log.info(  # the command shell-quoted: it pastes into a shell
            "started child pid %d: %s",
            pid,
            shlex.join(self.argv),
            extra=fields("child_started", pid=pid),
        )
        return None

    def notify(self, signum: int) -> tuple[str, int] | None:
        """Tell the child its files changed, once it can take the signal (see START_SETTLE).

        Called from the publisher thread only; forwarded signals go out at once.
        Returns (signal name, pid) if a signal was sent, None if not (no child).
        """
        pid = self.pid
        if pid is None:
            return None
        if signum not in HARMLESS and (pid, signum) != self._handled:
            self._wait_until_handled(pid, signum)
        return (_name(signum), pid) if self.send(signum) else None

    def _wait_until_handled(self, pid: int, signum: int) -> None:
        give_up = self.started_at + START_SETTLE_MAX
        while (caught := handles(pid, signum)) is False and time.monotonic() < give_up:
            time.sleep(SETTLE_POLL)
        if caught is None:  # no /proc: the old rule of thumb
            time.sleep(max(0.0, self.started_at + START_SETTLE - time.monotonic()))
        elif caught:
            self._handled = (pid, signum)  # programs keep their handlers: look once

    def send(self, signum: int) -> bool:
        """Send a signal to the child, if it is running; whether it was sent. Any thread."""
        with self._lock:
            if self.pid is None:
                return False
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                log.warning("child pid %d is gone; %s not sent", self.pid, _name(signum))
                return False
            except OSError as err:
                log.warning("could not send %s to pid %d: %s", _name(signum), self.pid, err)
                return False
            return True

    def wait_for(
        self, *events: threading.Event, poll: float = 0.05, timeout: float | None = None
    ) -> int | None:
        """Before the child starts: wait until one of ``events`` is set (or ``timeout``
        seconds passed).

        Returns None then, or the signal number of a terminating signal that
        arrived first (there is nothing to forward it to yet).
        """
        give_up = time.monotonic() + timeout if timeout is not None else float("inf")
        while not any(event.is_set() for event in events) and time.monotonic() < give_up:
            signum = wait_signal(poll)
            if signum in TERMINATING:
                return signum
            if signum == signal.SIGCHLD:
                self.reap()
        return None

    def supervise(self, done: threading.Event) -> int:
        """Forward signals and reap until the child exits; return its exit code.

        With no child: wait for a terminating signal (exit 0). If ``done`` is
        set (the publisher died), the child is stopped and the exit code is 1:
        serving files that silently stopped updating would be worse.
        """
        deadline: float | None = None
        abandoned = False
        while True:
            # Wait for one signal, and forward it.
            signum = wait_signal(WAIT_STEP)
            if signum is not None and signum != signal.SIGCHLD:
                if self.pid is None:
                    if signum in TERMINATING:
                        log.info("%s received, no child: exiting", _name(signum))
                        return 0
                else:
                    log.info("forwarding %s to child pid %d", _name(signum), self.pid)
                    self.send(signum)
                    if signum in TERMINATING and deadline is None:
                        deadline = time.monotonic() + self.kill_timeout
            # Now, reap zombies.
            code = self.reap()
            if code is not None:
                return 1 if abandoned else code
            if done.is_set() and not abandoned:
                if self.pid is None:
                    return 1
                log.error("publisher stopped: stopping child pid %d", self.pid)
                abandoned = True
                self.send(signal.SIGTERM)
                deadline = time.monotonic() + self.kill_timeout
            # A child that ignores SIGTERM is killed when its time is up.
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("child did not exit %.0fs after the signal: SIGKILL", self.kill_timeout)
                self.send(signal.SIGKILL)
                deadline = None

    @contextlib.contextmanager
    def own(self, start: Callable[[], int]) -> Iterator[int]:
        """Start a process (``start`` returns its pid) that its starter waits for itself.

        ``reap`` leaves it alone until the block ends: it would otherwise take
        its exit status (a failed --check would look like a success). The pid
        is registered before any reap can see the process exit.
        """
        with self._lock:
            pid = start()
            self._reserved.add(pid)
        try:
            yield pid
        finally:
            with self._lock:
                self._reserved.discard(pid)

    def reap(self) -> int | None:
        """Reap every exited process, orphans too (as PID 1); the child's code if it exited."""
        code = None
        while True:
            try:  # look first (WNOWAIT): a running check reaps its own process
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return code
            if info is None:
                return code
            with self._lock:
                if info.si_pid in self._reserved:
                    return code  # the rest on the next round, once the check is done
                try:
                    pid, status = os.waitpid(info.si_pid, os.WNOHANG)
                except ChildProcessError:  # a check reaped by run_check in between
                    continue
                if pid == 0:
                    return code
                if pid == self.pid:
                    self.pid = None
                    code = exit_code(status)
                    log.info(
                        "child pid %d %s",
                        pid,
                        describe_exit(status),
                        extra=fields("child_exited", pid=pid, exit_code=code),
                    )
                else:
                    log.debug("reaped orphan pid %d", pid)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
