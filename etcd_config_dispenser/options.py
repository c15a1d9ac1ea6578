"""The parsed command line: what ``cli`` hands to ``app``."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path


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
