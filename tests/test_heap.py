"""The C heap setting (``heap``): big blocks stay mapped after a bigger one was freed.

Checked in a fresh interpreter on the C library itself: a chunk glibc mapped
has the IS_MMAPPED bit (2) in the size word just before it.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from etcd_config_dispenser.heap import map_big_blocks
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "set":
    assert map_big_blocks()
libc.free(libc.malloc(8 << 20))  # glibc raises its threshold to 8 MiB here, unless fixed
block = libc.malloc(200 << 10)  # a 0.5 MiB set's table is this kind of block
print(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
"""


def mapped(setting: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "2"


def test_a_big_block_is_mapped_after_a_bigger_one_was_freed() -> None:
    """With the setting, a 200 KiB block is its own mapping (given back when freed);
    without, glibc serves it from the heap, where it stays."""
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc: nothing to set")
    assert mapped("set")
    assert not mapped("unset")  # the test sees the difference the setting makes
