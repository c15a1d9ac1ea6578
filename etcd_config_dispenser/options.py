"""The parsed command line: what ``cli`` hands to ``app``."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from .rules import FileRule, KeySelection
from .tlsverify import Address


@dataclass(frozen=True)
class Options:
    prefix: bytes
    target: Path
    signal: signal.Signals
    mode: int
    uid: int
    gid: int
    once: bool
    kill_timeout: float
    backoff_max: float
    wait: tuple[float, float] | None
    check: str | None
    health_addr: tuple[str, int] | None
    log_level: str
    log_format: str
    command: list[str]
    selection: KeySelection = field(default_factory=KeySelection)  # --include, --exclude
    file_rules: tuple[FileRule, ...] = ()  # --file-mode
    require: tuple[str, ...] = ()  # paths relative to the target
    on_change: str | None = None
    on_change_timeout: float = 60.0
    stale_start: float | None = None  # seconds
    timeout: float = 60.0  # --once: seconds to get a snapshot
    verify_certs: bool = False
    verify_tls: tuple[Address, ...] = ()
    verify_tls_timeout: float = 10.0
    rollback_on_failure: bool = False
    status_prefix: bytes | None = None  # ends in "/"
    instance: str = ""
    expiry_warning: float = 14 * 86400.0  # seconds
