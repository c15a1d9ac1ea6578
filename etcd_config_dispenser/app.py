"""Wiring: block signals, recover the target, sync, start the child, supervise, exit."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Mapping

from . import health
from .checkcmd import run_check
from .child import Supervisor, become_subreaper, block_signals
from .config import EtcdConfig, child_environ
from .events import Ended, Event
from .health import Stats
from .layout import describe_snapshot
from .logs import fields
from .onchange import OnChange
from .options import Options
from .publisher import Listener, Publisher, Rules
from .recovery import abandon
from .sdnotify import Notifier
from .session import EtcdSession
from .snapshot import SnapshotWriter
from .source import EtcdSource
from .status import FilesDigest, StatusReporter
from .tlsverify import TlsVerifier

log = logging.getLogger("etcd_config_dispenser")


def _warn_secrets_in_environment(environ: Mapping[str, str]) -> None:
    """Whatever a process was started with stays readable in /proc/PID/environ by every
    process of the same user, the child included: secrets belong in files."""
    instead = {
        "ETCD_PASSWORD": "ETCD_PASSWORD_FILE",
        "ETCD_USERNAME_AND_PASSWORD": "ETCD_PASSWORD_FILE",
        "ETCD_CLIENT_KEY": "ETCD_CLIENT_KEY_FILE, or the key file's path",
    }
    for name, better in instead.items():
        value = environ.get(name)
        if value is None or (name == "ETCD_CLIENT_KEY" and "PRIVATE KEY" not in value):
            continue
        log.warning(
            "%s is in this process's environment, which processes of the same user can "
            "read (/proc/PID/environ): use %s instead",
            name,
            better,
        )


def run(options: Options, etcd: EtcdConfig) -> int:
    """Run until the child exits (its exit code) or, without a child, until SIGTERM (0)."""
    # Configure signals: before any thread exists, so that every thread inherits the mask.
    block_signals()
    if os.getpid() != 1:
        become_subreaper()
    _warn_secrets_in_environment(os.environ)
    if etcd.insecure_skip_verify:
        log.warning("ETCD_INSECURE_SKIP_VERIFY is set: the etcd server is NOT verified")
    writer = SnapshotWriter(
        options.target,
        options.mode,
        options.uid,
        options.gid,
        # Safe only when our own child is the first snapshot's only reader, and only
        # reads it after a clean start (not a stale start): see snapshot.py.
        defer_first_sync=bool(options.command) and not options.once and not options.stale_start,
        file_rules=options.file_rules,
    )
    try:
        live = writer.recover()
    except OSError as err:
        log.error("cannot use the target: %s", err)
        return 1
    if live:
        log.info("serving %s until the first sync replaces it", live)
    stats = Stats()
    stats.verifies = bool(options.verify_tls)
    stats.serving = live
    if options.health_addr:
        try:
            health.serve(*options.health_addr, stats)
        except OSError as err:
            log.error("--health-addr: cannot listen on %s:%d: %s", *options.health_addr, err)
            return 2
    env = child_environ(os.environ)
    supervisor = Supervisor(options.command, env, options.kill_timeout)
    inbox: queue.Queue[Event] = queue.Queue()
    stopping = threading.Event()  # set on the way out: a --check still running is killed
    source = EtcdSource(etcd, options.prefix)  # a full read's values spool in the target's fs
    session = EtcdSession(source, inbox, stats, options.backoff_max, spool_at=writer.target_fd)
    hook: OnChange | None = None
    if options.on_change:
        hook = OnChange(
            options.on_change,
            env,
            options.target,
            lambda cmd, env, timeout, cancel: run_check(
                cmd, env, supervisor, timeout, "--on-change", cancel
            ),
            stats,
            options.on_change_timeout,
        )
        hook.start()
    listeners: list[Listener] = []
    if hook is not None:
        listeners.append(hook.changed)
    reporter = None
    if options.status_prefix is not None:
        digest = FilesDigest()
        listeners.append(digest.update)
        status_source = EtcdSource(etcd, options.status_prefix)
        reporter = StatusReporter(status_source, options.instance, stats, digest)
        reporter.start()
    publisher = Publisher(
        writer,
        inbox,
        options.prefix,
        notify=lambda: supervisor.notify(options.signal),
        stats=stats,
        once=options.once,
        wait=options.wait,
        check=(
            (lambda: run_check(check, env, supervisor, cancel=stopping))
            if (check := options.check)
            else None
        ),
        rules=Rules(
            selection=options.selection,
            required=options.require,
            listeners=listeners,
            verify_certs=options.verify_certs,
            expiry_warning=options.expiry_warning,
            verify_tls=(
                TlsVerifier(list(options.verify_tls), options.verify_tls_timeout).verify
                if options.verify_tls
                else None
            ),
            rollback_on_failure=options.rollback_on_failure,
            reread=session.reread,  # a value lost from its spool: etcd has it
        ),
    )
    log.info(
        "syncing prefix %r from %s into %s",
        options.prefix.decode(),
        ",".join(map(str, etcd.endpoints)),
        options.target,
    )
    stats.publisher_running = lambda: not publisher.done.is_set()
    # The flow: etcd session -> inbox -> publisher (key rules, snapshot, signal).
    publisher.start()
    session.start()
    notifier = Notifier(os.environ)  # systemd Type=notify, if it is asked for
    notifier.follow(stats)
    try:
        # Start the child only once its files exist (or, --stale-start, a previous run's).
        stale_start = options.stale_start if live else None  # a sidecar: READY=1 then
        deadline = options.timeout if options.once else stale_start
        stopped_by = supervisor.wait_for(publisher.first_sync, publisher.done, timeout=deadline)
        waiting = stopped_by is None and not options.once and not publisher.first_sync.is_set()
        if waiting and not _start_stale(publisher, stats, live):  # etcd answered: wait
            stopped_by = supervisor.wait_for(publisher.first_sync, publisher.done)
        if stopped_by is not None:
            when = "" if publisher.first_sync.is_set() else " before the first sync"
            log.info("stopped by %s%s", signal.Signals(stopped_by).name, when)
            if options.once and not publisher.first_sync.is_set():  # --once did not succeed
                _once_result(publisher, writer, stats, None)  # removes a target it made
                return 128 + stopped_by
            return 0
        if options.once:
            return _once_result(publisher, writer, stats, options.timeout)
        if not publisher.first_sync.is_set() and stats.stale_since is None:
            return 1  # the publisher stopped: logged there
        code = supervisor.spawn()
        if code is not None:
            return code
        notifier.ready(stats)  # files live, child started
        # Forward signals and reap until the child exits.
        return supervisor.supervise(publisher.done)
    finally:
        stopping.set()
        notifier.stopping()
        session.stop()
        inbox.put(Ended())
        publisher.done.wait(5.0)
        if hook is not None:
            hook.stop()
        if reporter is not None:
            reporter.stop()


def _once_result(
    publisher: Publisher, writer: SnapshotWriter, stats: Stats, timeout: float | None
) -> int:
    """--once: 0 if a snapshot is live and --check did not refuse it; else 1, said why
    (``timeout`` None: stopped by a signal, said already) and a target it made removed."""
    if publisher.first_sync.is_set():
        return 1 if publisher.first_rejected else 0
    if not publisher.done.is_set() and timeout is not None:
        why = stats.health()[1]
        log.error(
            "giving up: no snapshot within %gs: %s",
            timeout,
            why,
            extra=fields("gave_up", error=why),
        )
    if writer.made_target and writer.serving is None:
        abandon(writer.target)
    return 1


def _start_stale(publisher: Publisher, stats: Stats, live: str | None) -> bool:
    """--stale-start: whether the child may start on the snapshot a previous run left
    (etcd did not answer in time); the first snapshot from etcd then signals it."""
    if publisher.done.is_set() or live is None or stats.last_ok:
        return False  # stale only while etcd has said nothing at all
    stats.stale_since = f"{describe_snapshot(live)}, left by an earlier run"
    if publisher.first_sync.is_set():  # it came after all: nothing stale (see Publisher)
        stats.stale_since = None
        return True
    log.warning(
        "etcd has not answered: starting the child on the previous run's snapshot (%s); %s",
        stats.stale_since,
        stats.last_error or "no answer yet",
        extra=fields("stale_start"),
    )
    return True
