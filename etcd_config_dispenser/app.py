"""Wiring: block signals, recover the target, sync, start the child, supervise, exit."""

from __future__ import annotations

import logging
import os
import queue
import signal
from collections.abc import Mapping

from . import health
from .checkcmd import run_check
from .child import Supervisor, become_subreaper, block_signals
from .config import EtcdConfig, child_environ
from .events import Ended, Event
from .health import Stats
from .options import Options
from .publisher import Publisher
from .session import EtcdSession
from .snapshot import SnapshotWriter
from .source import EtcdSource

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
        # Safe only when our own child is the first snapshot's only reader: see snapshot.py.
        defer_first_sync=bool(options.command) and not options.once,
    )
    try:
        live = writer.recover()
    except OSError as err:
        log.error("cannot use the target: %s", err)
        return 1
    if live:
        log.info("serving %s until the first sync replaces it", live)
    stats = Stats()
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
    session = EtcdSession(
        EtcdSource(etcd, options.prefix),
        inbox,
        stats,
        backoff_max=options.backoff_max,
        once=options.once,
    )
    publisher = Publisher(
        writer,
        inbox,
        options.prefix,
        notify=lambda: supervisor.notify(options.signal),
        stats=stats,
        once=options.once,
        wait=options.wait,
        check=(lambda: run_check(check, env, supervisor)) if (check := options.check) else None,
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
    try:
        # Start the child only once its files exist.
        stopped_by = supervisor.wait_for(publisher.first_sync, publisher.done)
        if stopped_by is not None:
            when = "" if publisher.first_sync.is_set() else " before the first sync"
            log.info("stopped by %s%s", signal.Signals(stopped_by).name, when)
            return 0
        if not publisher.first_sync.is_set():
            return 1  # --once could not read etcd or write the target: logged there
        if options.once:
            return 1 if publisher.first_rejected else 0
        code = supervisor.spawn()
        if code is not None:
            return code
        # Forward signals and reap until the child exits.
        return supervisor.supervise(publisher.done)
    finally:
        session.stop()
        inbox.put(Ended())
        publisher.done.wait(5.0)
