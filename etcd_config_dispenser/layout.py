"""The on-disk contract: every name the snapshot machinery makes in the target, in one place.

::

    target/
      ..2026_11_25_10_00_00.000000123.r42/   a snapshot directory: every file at revision 42
      ..data -> ..2026_11_25_10_00_00.000000123.r42   the only thing readers follow
      ..data_tmp -> ...       being renamed onto ..data (the atomic flip); gone after it
      ..link_tmp -> ...       being renamed onto a top-level link; gone after it
      ..pool/1, 2, ...        empty files made ahead, renamed into a snapshot when written
      cert.pem -> ..data/cert.pem   one link per top-level name of the live snapshot

The target is shared territory: another container may write into it. So an
entry counts as ours only if its name fits one of these patterns exactly and
its type (by ``lstat``, never following a link) is the one we make; what
``..data`` says is trusted only if it is one snapshot name, nothing else.
Keys may not start with ``..`` (see ``keys``), so no key can collide with
these names.
"""

from __future__ import annotations

import re
import time

RESERVED_PREFIX = ".."  # first segments starting with this belong to the machinery
DATA_LINK = "..data"
TMP_LINK = "..data_tmp"
TMP_TOP_LINK = "..link_tmp"
POOL_DIR = "..pool"
SNAPSHOT_NAME_MAX = 64  # "..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN.r<revision>", with room

_SNAPSHOT_NAME = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}\.r\d{1,20}")
_POOL_FILE = re.compile(r"[1-9]\d{0,18}")


def is_snapshot_name(name: str) -> bool:
    """A name the writer gives snapshot directories (and nothing else matches)."""
    return bool(_SNAPSHOT_NAME.fullmatch(name))


def is_pool_file_name(name: str) -> bool:
    return bool(_POOL_FILE.fullmatch(name))


def snapshot_name(revision: int, now_ns: int | None = None) -> str:
    """A new snapshot directory name: UTC time to the nanosecond, then the revision."""
    ns = time.time_ns() if now_ns is None else now_ns
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(ns // 1_000_000_000))
    return f"{RESERVED_PREFIX}{stamp}.{ns % 1_000_000_000:09d}.r{revision}"


def describe_snapshot(name: str) -> str:
    """'..2026_11_25_10_00_00.000000123.r42' -> 'r42 of 2026-11-25 10:00:00 UTC'."""
    if not is_snapshot_name(name):
        return repr(name)
    stamp, _, revision = name[len(RESERVED_PREFIX) :].rpartition(".")
    day, hour = stamp[:10].replace("_", "-"), stamp[11:19].replace("_", ":")
    return f"{revision} of {day} {hour} UTC"


def top_link_text(name: str) -> str:
    """What the user-visible link for a top-level name points to."""
    return f"{DATA_LINK}/{name}"
