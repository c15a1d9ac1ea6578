"""The C heap's one setting this process changes: big blocks are mapped, never kept.

glibc serves a block of 128 KiB or more with its own mapping, given back to
the system when it is freed, but raises that threshold to the size of each
such block freed (up to 32 MiB), so that every later block below it comes
from the heap. Python's large sets, maps and arrays are such blocks. A full
read, then the first snapshot, makes and frees many of them (10,000 keys
make tables of 0.5 MiB): past the first, they pile up in the heap and stay
there, with the small objects made between them. Fixing the threshold keeps
them mapped: measured with 1 KiB values, the peak of the process fell from
49.0 to 47.3 MiB at 10,000 keys and from 61.0 to 56.6 MiB at 50,000
(64 KiB; 48.4 and 57.5 MiB at glibc's own 128 KiB, fixed). It costs a
mapping and an unmapping per such block, a few microseconds, and blocks
that big are made per full read or snapshot, not per change.

Where the C library is not glibc (musl has no ``mallopt``), nothing changes.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MAPPED_FROM = 64 * 1024  # bytes: blocks this big or bigger get their own mapping


def map_big_blocks() -> bool:
    """Fix glibc's mmap threshold at MAPPED_FROM; whether it could be set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MAPPED_FROM) == 1)
