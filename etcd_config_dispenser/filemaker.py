"""Makes the files and directories of a snapshot, with the mode and owner asked for.

Kept apart from the snapshot writer, which decides what goes where: this
module only makes entries, relative to open directories (``fsops``), and
tells a key's failure from the target's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Collection, Iterable, Mapping

from .fsops import Tree, lstat_at, open_dir, remove_at
from .layout import POOL_DIR
from .rules import FileAttributes, FileRule
from .values import SpoolError

POOL_SIZE = 8  # empty files kept ready for the next change
POOL_OPEN = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Errors that no single key explains: the whole target is unusable for now.
TARGET_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})  # no file (of ours) there
# A first guess of what one hard link into a new directory costs (measured
# here: 4 us on tmpfs, 14 us on ext4), until a copy of LINKS_MEASURED or more says.
LINK_SECONDS, LINKS_MEASURED = 10e-6, 64
PROBE = "..probe"  # a file made and removed to tell a key's failure from the target's


def dir_mode(file_mode: int) -> int:
    """Directories get x wherever r is set, and the owner always rwx: 0600 -> 0700,
    0644 -> 0755, 0440 -> 0750. Without owner write a read-only --mode would
    lock the dispenser itself out of its directories when it is not root.
    """
    mode = file_mode & 0o777
    return mode | ((mode & 0o444) >> 2) | 0o700


class FileMaker:
    """New files and directories with the mode (whatever the umask) and owner asked for.

    Creating an inode is the slow part of a small change, so new files come
    from a pool of empty ones made ahead (after the signal) and are renamed
    into place once written.
    """

    def __init__(
        self, mode: int = 0o600, uid: int = -1, gid: int = -1, rules: tuple[FileRule, ...] = ()
    ) -> None:
        self.mode = mode
        self.dir_mode = dir_mode(mode)
        self.uid = uid
        self.gid = gid
        self.attributes = FileAttributes(mode, uid, gid, rules)  # --file-mode, per path
        self.pool: list[str] = []  # names of empty files in ..pool
        self._pool_serial = 0
        self.link_seconds = LINK_SECONDS  # what a hard link took, as last measured

    def timed(self, links: int, seconds: float) -> None:
        """``links`` hard links took ``seconds``: the estimate a copy of every file uses."""
        if links >= LINKS_MEASURED:
            self.link_seconds = seconds / links

    def write(
        self, tree: Tree, rel: str, value: bytes, pool: int | None, fresh: bool = False
    ) -> int:
        """A new file at ``rel`` holding ``value``, replacing what was there; its open
        descriptor, for fsync. A pooled file replaces the old one in one rename.

        ``fresh``: ``tree`` is expected to have nothing at ``rel`` (a new directory):
        the file is created first and what is there removed only if that fails, one
        syscall a file instead of two (10,000 failing unlinks: 40 ms of a first sync)."""
        parent, leaf = tree.parent(rel, self.mkdir)
        pooled = self._take_pooled(pool) if pool is not None else None
        fd = self._created(tree, rel, parent, leaf, fresh) if pooled is None else pooled[1]
        try:
            if self.attributes.rules:
                self._follow_rules(fd, rel)
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            if pooled is not None:
                os.rename(pooled[0], leaf, src_dir_fd=pool, dst_dir_fd=parent)
                if os.lstat(leaf, dir_fd=parent).st_ino != os.fstat(fd).st_ino:
                    raise OSError(errno.EEXIST, f"{leaf!r} was swapped while written")
        except OSError:
            os.close(fd)
            if pooled is not None:
                with contextlib.suppress(OSError):
                    os.unlink(pooled[0], dir_fd=pool)
            raise
        return fd

    def _created(self, tree: Tree, rel: str, parent: int, leaf: str, fresh: bool) -> int:
        """A new file at ``rel`` (``leaf`` in ``parent``), whatever was there removed."""
        if fresh:
            try:
                return self.create(parent, leaf)
            except FileExistsError:  # someone put something there: as below
                pass
        tree.unlink(rel)
        return self.create(parent, leaf)

    def _follow_rules(self, fd: int, rel: str) -> None:
        """--file-mode: the first matching rule's mode and owner, before any byte is
        written (a reader never sees the value under the default mode)."""
        mode, uid, gid = self.attributes.of(rel)
        if mode != self.mode:
            os.fchmod(fd, mode)
        if (uid, gid) != (self.uid, self.gid):
            os.fchown(fd, uid, gid)

    def _take_pooled(self, pool: int) -> tuple[str, int] | None:
        """An empty file of ours from the pool, open for writing; None if none is left.

        The pool is in shared territory too: an entry that is not still the
        empty, single-link regular file we made (a hard link to a file
        elsewhere, a FIFO, a file with content) is dropped, never written.
        """
        owner = os.geteuid() if self.uid == -1 else self.uid
        while self.pool:
            name = self.pool.pop()
            try:
                fd = os.open(name, POOL_OPEN, dir_fd=pool)
            except OSError:  # gone, a link, a FIFO without reader...
                continue
            st = os.fstat(fd)
            ours = st.st_nlink == 1 and st.st_size == 0 and st.st_uid == owner
            if ours and stat.S_ISREG(st.st_mode):
                return name, fd
            os.close(fd)
        return None

    def link(self, source: Tree, tree: Tree, rel: str) -> bool:
        """Share the live file at ``rel``; False if the live snapshot has none."""
        try:
            src_parent, leaf = source.parent(rel)
        except OSError as err:
            if err.errno in ABSENT:
                return False
            raise
        if not _is_file(src_parent, leaf):
            return False
        parent, _ = tree.parent(rel, self.mkdir)
        try:  # two syscalls a file: a spare is made of 10,000s of these
            os.link(leaf, leaf, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            tree.unlink(rel)
            os.link(leaf, leaf, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
        return True

    def copy(
        self, target_fd: int, source: str, name: str, paths: Iterable[str], sync: bool
    ) -> list[str]:
        """A new directory ``name`` holding ``paths`` of ``source`` as hard links:
        no file contents copied; the paths ``source`` lacked. ``sync``: its
        directories are made durable (the files are already: the source's)."""
        self.mkdir(target_fd, name)
        started, paths = time.monotonic(), list(paths)
        with Tree(open_dir(name, target_fd)) as tree, Tree(open_dir(source, target_fd)) as src:
            missing = [rel for rel in paths if not self.link(src, tree, rel)]
            self.timed(len(paths), time.monotonic() - started)
            if sync:
                tree.sync()
        return missing

    def open_pool(self, target_fd: int) -> int | None:
        """The pool, if it has files; None if empty, or removed or replaced by someone
        (files are then made anew, and the housekeeping makes the pool again)."""
        if not self.pool:
            return None
        try:
            return open_dir(POOL_DIR, target_fd)
        except OSError:
            self.pool = []
            return None

    def fill_pool(self, target_fd: int) -> None:
        """Make the pool up to POOL_SIZE empty files (and ``..pool`` again if someone
        replaced it with something else)."""
        try:
            pool = open_dir(POOL_DIR, target_fd)
        except OSError as err:
            if err.errno not in ABSENT:
                raise
            remove_at(target_fd, POOL_DIR)  # our reserved name: whatever is there goes
            self.pool = []
            self.mkdir(target_fd, POOL_DIR)
            pool = open_dir(POOL_DIR, target_fd)
        try:
            while len(self.pool) < POOL_SIZE:
                self._pool_serial += 1
                name = str(self._pool_serial)
                os.close(self.create(pool, name))
                self.pool.append(name)
        finally:
            os.close(pool)

    def create(self, dir_fd: int, name: str) -> int:
        """A new empty file with the mode (whatever the umask) and owner asked for."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, self.mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, self.mode)
            if self.uid != -1 or self.gid != -1:
                os.fchown(fd, self.uid, self.gid)
        except OSError:
            os.close(fd)
            raise
        return fd

    def mkdir(self, dir_fd: int | None, name: str) -> None:
        """A new directory with the directory mode (whatever the umask) and owner."""
        os.mkdir(name, self.dir_mode, dir_fd=dir_fd)
        fd = open_dir(name, dir_fd)
        try:
            os.fchmod(fd, self.dir_mode)
            if self.uid != -1 or self.gid != -1:
                os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)


def apply_delta(
    maker: FileMaker,
    tree: Tree,
    source: Tree | None,
    files: Mapping[str, bytes],
    delta: Collection[str],
    changed: set[str],
    pool: int | None,
    written: list[int],
    keep: int,
) -> tuple[dict[str, str], int]:
    """Bring the paths of ``delta`` in ``tree`` to ``files`` with ``maker``: removals
    first, then writes (``changed`` ones, or any ``source`` lacks) or hard links from
    ``source``.

    The descriptors of the first ``keep`` new files are appended to
    ``written`` (to fsync each; more are closed at once: a big change is
    synced whole, and thousands of open files would hit RLIMIT_NOFILE).
    Returns the keys whose file could not be written, with why, and the
    number of files written.
    """
    failed: dict[str, str] = {}
    count = 0
    gone = {rel for rel in delta if rel not in files}  # one lookup a path, not two
    for rel in gone:
        tree.remove(rel)
    for rel in delta:
        if rel in gone:
            continue
        try:
            # Never truncate or rewrite a file: its inode may be shared with
            # another snapshot, or open in a reader. A new one replaces it.
            if rel in changed or source is None or not maker.link(source, tree, rel):
                fd = maker.write(tree, rel, files[rel], pool, fresh=source is None)
                count += 1
                if len(written) < keep:
                    written.append(fd)
                else:
                    os.close(fd)
        except OSError as err:  # a SpoolError: its value cannot be read; not the target's
            unread = isinstance(err, SpoolError)
            failed[rel] = f"cannot read its value: {err.strerror}" if unread else blame(tree, err)
            with contextlib.suppress(OSError):
                tree.unlink(rel)  # no older file of the spare stays served in its place
    return failed, count


def blame(tree: Tree, err: OSError) -> str:
    """Why one key could not be written; raise if the target itself is the reason."""
    if err.errno in TARGET_ERRNOS:
        raise err
    try:  # can anything be written here at all?
        fd = os.open(PROBE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, dir_fd=tree.fd)
        os.close(fd)
        os.unlink(PROBE, dir_fd=tree.fd)
    except OSError:
        raise err from None
    return err.strerror or str(err)


def _is_file(dir_fd: int, name: str) -> bool:
    st = lstat_at(dir_fd, name)
    return st is not None and stat.S_ISREG(st.st_mode)


def has_file(tree: Tree, rel: str) -> bool:
    """Whether ``rel`` is a regular file in ``tree`` (links and directories are not)."""
    return file_inode(tree, rel) is not None


def file_inode(tree: Tree, rel: str) -> int | None:
    """The inode of the regular file ``rel`` in ``tree``; None if there is none there."""
    try:
        st = lstat_at(*tree.parent(rel))
    except OSError as err:
        if err.errno in ABSENT:
            return None
        raise
    return st.st_ino if st is not None and stat.S_ISREG(st.st_mode) else None
