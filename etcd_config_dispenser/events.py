"""What flows from etcd to the files: plain data, so every consumer can be tested without etcd."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
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


class KeyValues(Collection[tuple[bytes, Value]]):
    """A full read's (key, value) pairs, kept a page at a time: the keys in one list and
    each page's values as one sequence (a ``SpooledRun``: one object a page), not a
    tuple and a value object a key. At 10,000 keys that is 1.5 MB less at the moment
    the process is largest (the read, then the first snapshot made of it)."""

    def __init__(self) -> None:
        self._keys: list[bytes] = []
        self._pages: list[Sequence[Value]] = []

    def add(self, keys: list[bytes], values: Sequence[Value]) -> None:
        if len(keys) != len(values):
            raise ValueError("a page of keys and values of different lengths")
        self._keys += keys
        self._pages.append(values)

    def __iter__(self) -> Iterator[tuple[bytes, Value]]:
        keys = iter(self._keys)
        for page in self._pages:
            for value in page:
                yield next(keys), value

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, item: object) -> bool:
        return any(pair == item for pair in self)


@dataclass(frozen=True)
class FullRead:
    """Every key under the prefix at one revision (values spooled: see ``values``)."""

    revision: int
    kvs: Collection[tuple[bytes, Value]]


@dataclass(frozen=True)
class Ended:
    """The session stopped for good: asked to, or --once gave up (``error``)."""

    error: str | None = None


Event = FullRead | Batch | Ended
