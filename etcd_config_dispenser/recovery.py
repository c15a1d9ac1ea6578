"""Start-up: what is in the target, which of it is ours, and what a crash left behind.

Nothing is followed, adopted or removed unless it is provably ours (see
``layout``): the right name, directly in the target, the right type by
``lstat``. Anything else is a problem, and all problems are reported before
anything is removed, so a refused start leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .fsops import NOT_A_DIR, lstat_at, open_dir, remove_at, walk
from .layout import (
    DATA_LINK,
    POOL_DIR,
    RESERVED_PREFIX,
    TMP_LINK,
    TMP_TOP_LINK,
    is_pool_file_name,
    is_snapshot_name,
    top_link_text,
)

log = logging.getLogger(__name__)


class TargetRefused(OSError):
    """The target holds entries this tool did not make: it is not used, nothing is removed."""


@dataclass
class Inventory:
    """The target's entries, sorted by what they are."""

    live: str | None = None  # the snapshot directory ..data names
    live_files: list[str] = field(default_factory=list)  # its files, relative paths
    debris: list[str] = field(default_factory=list)  # ours and not live: to remove
    links: list[str] = field(default_factory=list)  # top-level links of ours
    problems: list[str] = field(default_factory=list)  # not ours: one description each
    created: bool = False  # the target did not exist: made by open_target


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def _readlink(target_fd: int, name: str) -> str:
    return os.readlink(name, dir_fd=target_fd)


def _check_pool(target_fd: int) -> str | None:
    """A pool is a directory of numbered regular files with one link each (empty, or
    written just before a crash); anything else is somebody's."""
    try:
        fd = open_dir(POOL_DIR, target_fd)
    except OSError as err:
        if err.errno in NOT_A_DIR:
            return f"{POOL_DIR!r} is not a directory"
        raise
    try:
        for entry in os.scandir(fd):
            st = entry.stat(follow_symlinks=False)
            ours = stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and is_pool_file_name(entry.name)
            if not ours:
                return f"{POOL_DIR!r} holds {entry.name!r}, which is not a pool file of ours"
    finally:
        os.close(fd)
    return None


def _check_live(target_fd: int, name: str, inventory: Inventory) -> None:
    """The live snapshot: a real directory holding only files and directories."""
    try:
        fd = open_dir(name, target_fd)
    except FileNotFoundError:
        inventory.problems.append(f"{DATA_LINK!r} points to {name!r}, which does not exist")
        return
    except OSError as err:
        if err.errno in NOT_A_DIR:
            inventory.problems.append(f"{DATA_LINK!r} points to {name!r}, which is not a directory")
            return
        raise
    try:
        for rel, entry in walk(fd):
            if entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_file(follow_symlinks=False):
                inventory.live_files.append(rel)
            else:
                inventory.problems.append(
                    f"live snapshot {name!r} holds {rel!r}, which is not a file or directory"
                )
                return
    except OSError as err:  # a directory of it replaced by a link while it was read
        if err.errno not in NOT_A_DIR:
            raise
        inventory.problems.append(f"live snapshot {name!r} changed while it was read")
        return
    finally:
        os.close(fd)
    inventory.live = name


def inspect(target_fd: int) -> Inventory:
    """Sort every entry of the target; change nothing."""
    inventory = Inventory()
    data = lstat_at(target_fd, DATA_LINK)
    live: str | None = None
    if data is not None:
        text = _readlink(target_fd, DATA_LINK) if stat.S_ISLNK(data.st_mode) else None
        if text is None:
            inventory.problems.append(f"{DATA_LINK!r} is {_kind(data)}, not a symlink")
        elif not is_snapshot_name(text):
            inventory.problems.append(
                f"{DATA_LINK!r} points to {text!r}, which is not a snapshot directory name"
            )
        else:
            live = text
            _check_live(target_fd, text, inventory)
    for entry in os.scandir(target_fd):
        name = entry.name
        if name in (DATA_LINK, live):
            continue
        st = entry.stat(follow_symlinks=False)
        is_link, is_dir = stat.S_ISLNK(st.st_mode), stat.S_ISDIR(st.st_mode)
        if name in (TMP_LINK, TMP_TOP_LINK):
            ok = is_link
        elif name == POOL_DIR:
            problem = _check_pool(target_fd)
            if problem:
                inventory.problems.append(problem)
                continue
            ok = True
        elif is_snapshot_name(name):
            ok = is_dir
        elif name.startswith(RESERVED_PREFIX):
            inventory.problems.append(f"{name!r} ({_kind(st)[2:]}) is not a name this tool makes")
            continue
        else:
            if is_link and _readlink(target_fd, name) == top_link_text(name):
                inventory.links.append(name)
            else:
                inventory.problems.append(
                    f"{name!r} is {_kind(st)} that this tool did not write"
                    + (f" (-> {_readlink(target_fd, name)!r})" if is_link else "")
                )
            continue
        if ok:
            inventory.debris.append(name)
        else:
            inventory.problems.append(f"{name!r} is {_kind(st)}, not what this tool makes there")
    return inventory


def open_target(target: Path, make_dir: Callable[[int | None, str], None]) -> tuple[int, Inventory]:
    """Make the target if it is missing, open it, and clean it (see ``clean``)."""
    os.makedirs(target.parent, exist_ok=True)
    created = True
    try:
        make_dir(None, str(target))
    except FileExistsError:
        created = False
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = clean(fd, str(target))
        found.created = created
        return fd, found
    except OSError:
        os.close(fd)
        raise


def clean(target_fd: int, where: str) -> Inventory:
    """Remove what an earlier run left (only if every entry is ours); the inventory.

    Raises TargetRefused, naming the entries, before anything is removed.
    """
    found = inspect(target_fd)
    if found.problems:
        raise TargetRefused(
            f"target {where} holds entries not written by etcd-config-dispenser: "
            f"{'; '.join(found.problems[:5])}; move them away or choose an empty directory"
        )
    for name in found.debris:  # a pool is always left: no sign of a crash
        level = logging.DEBUG if name == POOL_DIR else logging.INFO
        log.log(level, "recover: removing %r, left by an earlier run", name)
        remove_at(target_fd, name)
    return found


def abandon(target: Path) -> None:
    """Nothing was published and nothing will be (--once failed) in a target this run
    made: remove it if it is still empty, so that no empty directory looks like a
    delivered one. Anything in it (someone else's) keeps it."""
    with contextlib.suppress(OSError):
        os.rmdir(target)
