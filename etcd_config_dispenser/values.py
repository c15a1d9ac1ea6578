"""Where the values are kept: in spool files, not in memory.

A full read brings every value at once (10 MB at 10,000 keys of 1 KiB, 50 MB
at 50,000), and they stay current until etcd changes them, which for most keys
is never: held in memory, they set the process's size. So the session writes
each page of a full read to a spool as it arrives, and the key tree keeps, per
key, only where its value is (8 bytes in an array; the spool keeps its end
and digest in arrays, 24 bytes): memory grows with the number of keys, not
with their size. A ``Spooled`` object, which says where one value is, is
made only when a value is asked for (``SpooledRun``). Values that arrive in watch responses
stay in memory until they add up to 1 MiB, then go to a spool of their own
(``KeyIntake.spill``, which also drains the spools that are mostly stale).

The spool is an unnamed file (``O_TMPFILE``) on the target's filesystem,
where the values are going anyway: nobody can open it by a name (the target
is shared territory), and it goes when the last value in it is replaced. It
costs disk (or, on tmpfs, memory outside the process) about the size of the
values, at most about twice (three times while a full read comes in).
Where ``O_TMPFILE`` is not supported, or the spool cannot be written (a
full disk), values stay in memory, as before: never a failure.

A value read back is checked against its digest (a spool changed under us,
or a failing disk, raises ``SpoolError``, never serves another value: the key
is then not written, and etcd is asked for everything again).
"""

from __future__ import annotations

import array
import errno
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import overload

DIGEST_SIZE = 16  # bytes of BLAKE2b: equal digests are equal values, for all purposes
SPOOL_OPEN = os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC


class SpoolError(OSError):
    """A spooled value cannot be read back as written (a failing disk): its key needs
    etcd's value again, and the target is not to blame."""


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class Spool:
    """An unnamed file of values, appended to a page at a time; closed with its last value.

    Where each value ends and its digest are kept here, in arrays (24 bytes a
    value), rather than as Python objects per value (about 170 bytes)."""

    def __init__(self, dir_fd: int) -> None:
        self._fd = -1
        # In the directory the writer holds open, not by its path (which anyone could
        # point elsewhere); O_EXCL: it can never be given a name (linkat) either.
        self._fd = os.open(".", SPOOL_OPEN, 0o600, dir_fd=dir_fd)
        self._ends = array.array("q")  # where value i ends; it starts where i - 1 ends
        self._digests = bytearray()  # DIGEST_SIZE bytes per value

    def __del__(self) -> None:  # no value refers to it any more: its space is freed
        if self._fd >= 0:
            os.close(self._fd)

    def add(self, values: Sequence[bytes]) -> SpooledRun:
        """Append ``values`` (one write); where each one is."""
        start = self._ends[-1] if self._ends else 0
        blob, offset = memoryview(b"".join(values)), start
        while blob:
            written = os.pwrite(self._fd, blob, offset)
            blob, offset = blob[written:], offset + written
        first, end = len(self._ends), start
        for value in values:  # only once all is written: a failed add leaves no trace
            end += len(value)
            self._ends.append(end)
            self._digests += digest(value)
        return SpooledRun(self, first, len(values))

    @property
    def size(self) -> int:
        """Bytes written to it."""
        return self._ends[-1] if self._ends else 0

    def span(self, index: int) -> tuple[int, int]:
        """(offset, size) of value ``index``."""
        start = self._ends[index - 1] if index else 0
        return start, self._ends[index] - start

    def digest(self, index: int) -> bytes:
        return bytes(self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def read(self, index: int) -> bytes:
        """Value ``index``, checked against its digest (never another value)."""
        offset, size = self.span(index)
        data = b""
        try:
            while len(data) < size:  # short reads: only at a file's end, which this is not
                more = os.pread(self._fd, size - len(data), offset + len(data))
                if not more:
                    raise SpoolError(errno.EIO, "the spool of values is shorter than written")
                data += more
        except SpoolError:
            raise
        except OSError as err:
            raise SpoolError(err.errno, f"cannot read a spooled value: {err.strerror}") from err
        if digest(data) != self.digest(index):
            raise SpoolError(errno.EIO, "a spooled value changed since it was written")
        return data


class Spooled:
    """A value in a spool: which one (its place and digest are the spool's)."""

    __slots__ = ("index", "spool")

    def __init__(self, spool: Spool, index: int) -> None:
        self.spool = spool
        self.index = index

    @property
    def size(self) -> int:
        return self.spool.span(self.index)[1]

    @property
    def digest(self) -> bytes:
        return self.spool.digest(self.index)

    def read(self) -> bytes:
        return self.spool.read(self.index)


Value = bytes | Spooled


class SpooledRun(Sequence[Spooled]):
    """Values ``first`` to ``first + length - 1`` of one spool, as a sequence: one small
    object for a page of values, where a list of ``Spooled`` costs about 80 bytes a
    value (its object and its index) for as long as the page is kept."""

    __slots__ = ("first", "length", "spool")

    def __init__(self, spool: Spool, first: int, length: int) -> None:
        self.spool = spool
        self.first = first
        self.length = length

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, i: int) -> Spooled: ...

    @overload
    def __getitem__(self, i: slice) -> list[Spooled]: ...

    def __getitem__(self, i: int | slice) -> Spooled | list[Spooled]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.length))]
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError("no such value in this run")
        return Spooled(self.spool, self.first + i)


def open_spool(dir_fd: int | None) -> Spool | None:
    """A spool in the open directory ``dir_fd``; None where there can be none (values
    then stay in memory)."""
    if dir_fd is None:
        return None
    try:
        return Spool(dir_fd)
    except OSError:  # no O_TMPFILE on this filesystem (EOPNOTSUPP, EISDIR), gone...
        return None


def kept(spool: Spool | None, values: Sequence[bytes]) -> Sequence[Value]:
    """``values`` as kept: spooled if they can be, else as they are (in memory)."""
    if spool is None or not values:
        return values
    try:
        return spool.add(values)
    except OSError:  # a full disk: these stay in memory
        return values


def as_bytes(value: Value) -> bytes:
    return value if isinstance(value, bytes) else value.read()


def same(a: Value | None, b: Value | None) -> bool:
    """Whether two values are equal (by digest when either is spooled: no read)."""
    if a is None or b is None:
        return a is b
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a == b
    if _size(a) != _size(b):
        return False
    return _digest(a) == _digest(b)


def _size(value: Value) -> int:
    return len(value) if isinstance(value, bytes) else value.size


def _digest(value: Value) -> bytes:
    return digest(value) if isinstance(value, bytes) else value.digest


class ValueView(Mapping[str, bytes]):
    """A mapping of paths to values, as bytes: spooled ones are read when asked for."""

    def __init__(self, values: Mapping[str, Value], unreadable: set[str] | None = None) -> None:
        self._values = values
        self._unreadable = unreadable  # where to note the paths that could not be read

    def __getitem__(self, path: str) -> bytes:
        try:
            return as_bytes(self._values[path])
        except SpoolError:
            if self._unreadable is not None:
                self._unreadable.add(path)
            raise

    def __contains__(self, path: object) -> bool:
        return path in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def readable(files: Mapping[str, bytes], path: str) -> bytes | None:
    """``files[path]``; None if there is none, or it cannot be read back (the key is then
    noted unreadable, and etcd asked for it again: see ``ValueView``)."""
    try:
        return files.get(path)
    except SpoolError:
        return None
