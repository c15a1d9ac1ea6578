"""Filesystem primitives of the snapshot writer, relative to open directories. No policy here.

The target is shared territory, so every operation is made relative to an
open directory, and every directory is opened with ``O_NOFOLLOW``: a symlink
that someone plants in the target or in a snapshot directory, at any moment,
is never followed. Writing or removing through a planted link fails (ELOOP,
ENOTDIR) instead of reaching outside the target. Trees are walked with a
loop, never with recursion: a deep tree costs iterations, not stack frames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Generator, Iterable
from pathlib import Path

# The C library as the interpreter already has it loaded (dlopen(NULL)): not
# ctypes.util.find_library, which runs ldconfig and imports shutil, tempfile,
# bz2 and lzma (0.7 MiB of every process, for one symbol).
_libc = ctypes.CDLL(None, use_errno=True)

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_DIRS_MAX = 64  # directories a Tree keeps open at once (RLIMIT_NOFILE may be 1024)
# A directory entry that is a symlink where a directory was expected.
NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """Open a directory, never through a symlink (ELOOP or ENOTDIR if it is one)."""
    return os.open(name, O_DIR, dir_fd=dir_fd)


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd``: one call instead of thousands of fsyncs."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str, most: int | None = None) -> bool:
    """Remove the entry ``name`` of a directory: a file, a link or a whole tree.

    Links are removed, never followed; a missing entry is fine. Iterative, so
    the depth of the tree does not matter. ``most``: stop after removing about
    that many entries (a big tree takes a while: others may go first); returns
    whether it is all gone, and the next call goes on where this one stopped.
    """
    st = lstat_at(dir_fd, name)
    if st is None:
        return True
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return True
    budget = most if most is not None else -1
    stack = [(open_dir(name, dir_fd), dir_fd, name)]  # (directory, its parent, its name)
    try:
        while stack:
            fd, parent, dname = stack[-1]
            for entry in os.scandir(fd):
                if budget == 0:
                    return False
                if entry.is_dir(follow_symlinks=False):
                    stack.append((open_dir(entry.name, fd), fd, entry.name))
                    break
                os.unlink(entry.name, dir_fd=fd)
                budget -= 1
            else:  # empty now
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=parent)
    finally:
        for fd, _parent, _name in stack:
            os.close(fd)
    return True


Stamps = frozenset[tuple[str, int, int]]


def stamps(dir_fd: int, name: str, dirs: Iterable[str]) -> Stamps:
    """(path, inode, ctime in ns) of a tree's root and of ``dirs`` below it, by lstat.

    A directory's ctime changes whenever an entry in it is added, removed or
    replaced (and its mtime with it; but the mtime can be set back with
    utime(), the ctime cannot): equal stamps later mean nobody changed what
    the tree holds (a link or a missing directory stamps as inode 0).
    """
    out = set()
    for rel in ("", *dirs):
        try:
            st = os.lstat(f"{name}/{rel}" if rel else name, dir_fd=dir_fd)
            ok = stat.S_ISDIR(st.st_mode)
        except OSError:  # gone, or a link on the way (ELOOP): not as we left it
            ok = False
        out.add((rel, st.st_ino, st.st_ctime_ns) if ok else (rel, 0, 0))
    return frozenset(out)


def unchanged(dir_fd: int, name: str, made: Stamps) -> bool:
    """Whether the tree ``name`` still stamps as ``made`` (the same directories)."""
    return stamps(dir_fd, name, (rel for rel, *_ in made)) == made


def walk(dir_fd: int) -> Generator[tuple[str, os.DirEntry[str]], None, None]:
    """Every entry under an open directory, as (relative path, entry); links not followed.

    A directory is opened when the walk reaches it, through a ``Tree`` (at most
    OPEN_DIRS_MAX open at once), so a walk kept open between steps holds a few
    descriptors, not one per directory seen."""
    with Tree(os.dup(dir_fd)) as tree:
        todo = [""]
        while todo:
            prefix = todo.pop()
            with os.scandir(tree.dir(prefix) if prefix else tree.fd) as entries:
                for entry in entries:
                    rel = f"{prefix}/{entry.name}" if prefix else entry.name
                    yield rel, entry
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(rel)


class Tree:
    """An open directory and the subdirectories below it that were opened, by relative path.

    Paths are relative ("a/b/c"), already checked by the key rules. Each
    directory on the way is opened without following links, so a planted
    link in a snapshot stops the operation rather than redirecting it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._dirs: dict[str, int] = {"": fd}
        self._closed: set[str] = set()  # opened, then closed to stay under OPEN_DIRS_MAX

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs = {}

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir(self, rel: str, make: Callable[[int, str], None] | None = None) -> int:
        """The directory ``rel`` (open); with ``make``, missing ones are created by it."""
        fd = self._dirs.get(rel)
        if fd is not None:
            return fd
        if len(self._dirs) >= OPEN_DIRS_MAX:  # thousands of directories: not one fd each
            for done, fd in list(self._dirs.items())[1:]:
                os.close(fd)
                self._closed.add(done)
            self._dirs = {"": self.fd}
        done = rel
        while done and done not in self._dirs:  # the deepest one already open
            done = done.rpartition("/")[0]
        fd = self._dirs[done]
        rest = rel[len(done) :].lstrip("/")
        for segment in rest.split("/"):
            try:
                child = open_dir(segment, fd)
            except FileNotFoundError:
                if make is None:
                    raise
                make(fd, segment)
                child = open_dir(segment, fd)
            done = f"{done}/{segment}" if done else segment
            self._dirs[done] = child
            fd = child
        return fd

    def parent(self, rel: str, make: Callable[[int, str], None] | None = None) -> tuple[int, str]:
        """(open parent directory, last segment) of a file path."""
        head, _, leaf = rel.rpartition("/")
        return self.dir(head, make), leaf

    def unlink(self, rel: str) -> bool:
        """Remove the file ``rel``, if there is one there; return whether one was removed."""
        try:
            fd, leaf = self.parent(rel)
            os.unlink(leaf, dir_fd=fd)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        except OSError as err:
            if err.errno in NOT_A_DIR or err.errno == errno.EPERM:  # a link; EPERM: a dir
                return False
            raise
        return True

    def remove(self, rel: str) -> None:
        """Remove the file ``rel``, if there is one, and its directories left empty (even
        with no file there: an empty directory someone planted at a deleted key's place
        would be served)."""
        self.unlink(rel)
        self.prune(rel.rpartition("/")[0])

    def prune(self, rel_dir: str) -> list[str]:
        """Remove ``rel_dir`` and its parents while they are empty; the ones removed."""
        removed = []
        while rel_dir:
            head = rel_dir.rpartition("/")[0]
            try:
                os.rmdir(rel_dir.rpartition("/")[2], dir_fd=self.dir(head))
            except OSError:  # not empty, or already gone
                break
            fd = self._dirs.pop(rel_dir, None)
            if fd is not None:
                os.close(fd)
            removed.append(rel_dir)
            rel_dir = head
        return removed

    def sync(self) -> None:
        """fsync every directory opened so far: the ones a change may have touched."""
        for fd in self._dirs.values():
            os.fsync(fd)
        for rel in self._closed - self._dirs.keys():
            try:
                fd = self.dir(rel)
            except FileNotFoundError:  # pruned since: its parent was synced
                continue
            os.fsync(fd)


def files_in(dir_fd: int) -> list[str]:
    """Every regular file under an open directory, as relative paths; links not followed."""
    return [rel for rel, entry in walk(dir_fd) if entry.is_file(follow_symlinks=False)]
