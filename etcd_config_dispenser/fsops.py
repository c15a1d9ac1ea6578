"""Filesystem primitives of the snapshot writer: sync, remove, list. No policy here."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path``: one call instead of thousands of fsyncs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed, removed names) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(root: Path) -> list[str]:
    """Every file under ``root``, as paths relative to it."""
    return [
        os.path.relpath(os.path.join(parent, name), root)
        for parent, _dirs, names in os.walk(root)
        for name in names
    ]


def unlink_file(path: Path) -> bool:
    """Remove a file if there is one; return whether one was removed."""
    try:
        os.unlink(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False
    except PermissionError:  # EPERM: unlink() on a directory, on some systems
        if not path.is_dir():
            raise
        return False
    return True


def remove(path: Path) -> None:
    """Remove a file, link or directory tree; a missing one is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
