"""What flows from etcd to the files: plain data, so every consumer can be tested without etcd."""

from __future__ import annotations

import array
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from .values import Value, same


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
    """A full read's (key, value) pairs, kept compact while the read comes in: the keys
    joined in one buffer with their ends in an array, each page's values as one
    sequence (a ``SpooledRun``: one object a page). A bytes object and a tuple and a
    value object a key cost about 190 bytes a key (9 MB at 50,000) at the moment the
    process is largest: the read, then the first snapshot made of it."""

    def __init__(self) -> None:
        self._keys = bytearray()  # every key, one after the other
        self._ends = array.array("q")  # where key i ends in _keys
        self._pages: list[Sequence[Value]] = []

    def add(self, keys: Sequence[bytes], values: Sequence[Value]) -> None:
        if len(keys) != len(values):
            raise ValueError("a page of keys and values of different lengths")
        end = len(self._keys)
        for key in keys:
            end += len(key)
            self._ends.append(end)
        self._keys += b"".join(keys)
        self._pages.append(values)

    def __iter__(self) -> Iterator[tuple[bytes, Value]]:
        keys, ends, start, i = self._keys, self._ends, 0, 0
        for page in self._pages:
            for value in page:
                yield bytes(keys[start : ends[i]]), value
                start, i = ends[i], i + 1

    def __len__(self) -> int:
        return len(self._ends)

    def __contains__(self, item: object) -> bool:
        """Whether ``item`` is one of the pairs: its value compared as ``same`` does (a
        spooled value is made anew each time it is given out)."""
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        return any(k == key and same(v, value) for k, v in self)


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
