"""What flows from etcd to the files: plain data, so every consumer can be tested without etcd."""

from __future__ import annotations

from dataclasses import dataclass

from .values import Value


@dataclass(frozen=True)
class Change:
    key: bytes
    value: bytes | None  # None: the key was deleted


@dataclass(frozen=True)
class Batch:
    """The changes of one watch response: one or more whole transactions, in order."""

    revision: int
    changes: list[Change]


@dataclass(frozen=True)
class FullRead:
    """Every key under the prefix at one revision (values spooled: see ``values``)."""

    revision: int
    kvs: list[tuple[bytes, Value]]


@dataclass(frozen=True)
class Ended:
    """The session stopped for good: asked to, or --once gave up (``error``)."""

    error: str | None = None


Event = FullRead | Batch | Ended
