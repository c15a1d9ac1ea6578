"""Snapshot writer: one consistent directory per etcd revision, made live by one rename.

On disk (the Kubernetes AtomicWriter layout)::

    target/
      ..2026_11_25_10_00_00.000000123.r42/   every file at revision 42
        cert.pem
        sub/c.txt
      ..data -> ..2026_11_25_10_00_00.000000123.r42   the only thing readers follow
      cert.pem -> ..data/cert.pem                    one link per top-level name
      sub -> ..data/sub

A reader that opens ``target/cert.pem`` gets a whole file of one revision; a
reader that resolves ``..data`` once and reads several files from there gets
one whole revision.

Cost: a change must cost about the same at 10,000 keys as at 100, so a
snapshot directory is not rebuilt per change. A directory that stopped being
live at least ``grace`` seconds ago is renamed and brought up to date with
only the paths that changed since it was live (a journal of changed paths).
Only when no such spare exists is a new directory made, by hard-linking the
live files (safe: a file is never modified in place, only unlinked and
created anew) and then applying the change.

Creating an inode (a file, a symlink, a directory) is the slow part of a
small change (about 0.75 ms each on the ext4 disks measured; a rename costs
0.02 ms), so new files come from a pool of empty ones made in ``..pool``
after the signal, and are renamed into place when written.

Durability: before the flip, the new files and their directories are on disk
(fsync, or one syncfs for a big change). The flip itself is made durable by
``finish`` right after the signal. A power loss in between leaves ``..data``
at the previous snapshot, which is complete and is not reused before
``finish`` has run. One exception, for a fast start (``defer_first_sync``):
when the target held no snapshot and a child will be started, the first
snapshot is flipped in before its syncfs (about 1 s at 10,000 files), which
``finish`` runs. Nothing else reads the target before the child starts, and
the next start after a power loss replaces that snapshot before starting it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from .fsops import files_under, fsync_dir, remove, syncfs, unlink_file
from .links import DATA_LINK, TMP_TOP_LINK, TopLinks

log = logging.getLogger(__name__)

TMP_LINK = "..data_tmp"
POOL_DIR = "..pool"
SNAPSHOT_PREFIX = ".."
FSYNC_EACH_MAX = 32  # up to this many files: fsync each; beyond: one syncfs
MAX_SPARES = 4  # spares kept past their grace period; younger ones are never deleted
POOL_SIZE = 8  # empty files kept ready for the next change
GRACE = 0.25  # seconds a retired snapshot stays untouched for readers still in it
SNAPSHOT_NAME_MAX = 64  # "..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN.r<revision>", with room


class SnapshotError(OSError):
    """A snapshot could not be made live. The previous one is still served."""


_SNAPSHOT_NAME = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}\.r\d+")


def _is_ours(name: str) -> bool:
    """A name this tool makes in the target: a snapshot directory or a temporary."""
    return name in (TMP_LINK, TMP_TOP_LINK, POOL_DIR) or bool(_SNAPSHOT_NAME.fullmatch(name))


def dir_mode(file_mode: int) -> int:
    """Directories get x wherever r is set, and the owner always rwx: 0600 -> 0700,
    0644 -> 0755, 0440 -> 0750. Without owner write a read-only --mode would
    lock the dispenser itself out of its directories when it is not root.
    """
    mode = file_mode & 0o777
    return mode | ((mode & 0o444) >> 2) | 0o700


@dataclass
class _Snapshot:
    """A snapshot directory whose contents we know: the files as of publish ``seq``."""

    name: str
    seq: int
    revision: int
    retired_at: float = 0.0  # monotonic time it stopped being live


class SnapshotWriter:
    """Publishes snapshots into one target directory that it owns."""

    def __init__(
        self,
        target: Path,
        mode: int = 0o600,
        uid: int = -1,
        gid: int = -1,
        grace: float = GRACE,
        clock: Callable[[], float] = time.monotonic,
        defer_first_sync: bool = False,
    ) -> None:
        self.target = target
        self.mode = mode
        self.dir_mode = dir_mode(mode)
        self.uid = uid
        self.gid = gid
        self.grace = grace
        self.clock = clock
        self._live: _Snapshot | None = None
        self._spares: list[_Snapshot] = []
        self.defer_first_sync = defer_first_sync
        self._adopted: str | None = None  # live, but not written by this process
        self._unknown: list[str] = []  # snapshot dirs of unknown contents, to delete
        self._unknown_retired_at = 0.0
        self._previous: _Snapshot | str | None = None  # what rollback() goes back to
        self._journal: list[Collection[str]] = []  # journal[i]: paths changed by publish i
        self._journal_base = 0  # publish number of journal[0]
        self._links = TopLinks(target)
        self._unsynced = False  # the first snapshot waits for finish() to be synced
        self._pool: list[str] = []  # names of empty files in ..pool
        self._pool_serial = 0

    @property
    def _seq(self) -> int:
        return self._journal_base + len(self._journal)

    # -- start-up ---------------------------------------------------------

    def recover(self) -> str | None:
        """Clean up after a crash and adopt the target; return the live snapshot's name.

        A leftover ``..data_tmp`` and every snapshot directory that ``..data``
        does not point to (half-built or stale) are removed. The live one keeps
        being served until the first publish replaces it. Entries that this
        tool did not write are never touched: their presence is an error,
        found before anything is removed.
        """
        os.makedirs(self.target.parent, exist_ok=True)
        self._make_dir(self.target, exist_ok=True)
        live_name: str | None = None
        data = self.target / DATA_LINK
        if data.is_symlink():
            live_name = os.readlink(data)
        ours, foreign, links = [], [], []
        for entry in os.scandir(self.target):
            if entry.name in (DATA_LINK, live_name):
                continue
            if _is_ours(entry.name):
                ours.append(entry.name)
            elif entry.is_symlink() and os.readlink(entry.path) == f"{DATA_LINK}/{entry.name}":
                links.append(entry.name)
            else:
                foreign.append(entry.name)
        if foreign:
            raise SnapshotError(
                f"target {self.target} holds entries not written by etcd-config-dispenser: "
                f"{', '.join(sorted(foreign)[:5])}; move them away or choose an empty directory"
            )
        for name in ours:
            log.info("recover: removing leftover %s", name)
            remove(self.target / name)
        for name in links:
            self._links.adopt(name)
        self._adopted = live_name if live_name and (self.target / live_name).is_dir() else None
        return live_name

    # -- publish ----------------------------------------------------------

    def publish(self, files: Mapping[str, bytes], changed: Collection[str], revision: int) -> bool:
        """Make ``files`` the live snapshot; return whether anything changed.

        ``changed`` lists the paths whose content or presence differs from the
        previous publish (ignored for the first one, which writes everything).

        1. Nothing changed: return False, touch nothing.
        2. Choose a directory: a spare retired >= grace ago (renamed), else a new
           one hard-linked from the live one, else a new empty one.
        3. Bring it to ``files``: remove, then write, only the paths that differ.
        4. Make it durable: fsync each file and directory, or one syncfs.
        5. Flip: symlink ``..data_tmp`` -> new dir, rename it onto ``..data``.
           This is the atomic moment. fsync the target directory.
        6. Add and remove the top-level links.
        The old live directory becomes a spare; ``finish`` (after the signal)
        makes the flip durable and deletes what is not kept.
        """
        first = self._live is None
        if not first and not changed:  # (1)
            return False
        name = self._new_name(revision)
        path = self.target / name
        if first:  # spares are only known relative to a live snapshot of ours
            self._unknown.extend(spare.name for spare in self._spares)
            self._spares = []
        base, delta = self._choose_base(changed)  # (2)
        empty = base is None and first
        use_syncfs = base is None or len(delta) > FSYNC_EACH_MAX
        deferred = first and self.defer_first_sync and self._adopted is None
        tmp_link = self.target / TMP_LINK
        try:
            if base is not None:
                os.rename(self.target / base.name, path)
            elif first:
                self._make_dir(path)
                delta = files.keys()
            else:
                self._link_tree(path)
            dirs = self._apply(path, files, delta, empty, fsync_each=not use_syncfs)  # (3)
            if deferred:  # (4) synced in finish(), see the module docstring
                self._unsynced = True
            elif use_syncfs:
                syncfs(path)
            else:
                for directory in dirs:
                    fsync_dir(directory)
            remove(tmp_link)  # (5)
            os.symlink(name, tmp_link)
            os.replace(tmp_link, self.target / DATA_LINK)
        except OSError as err:
            remove(tmp_link)
            remove(path)
            raise SnapshotError(err.errno, f"snapshot r{revision} not published: {err}") from err
        self._previous = self._live or self._adopted
        if self._live is not None:
            self._live.retired_at = self.clock()
            self._spares.append(self._live)
        else:
            if self._adopted is not None:
                self._unknown.append(self._adopted)
                self._adopted = None
            self._unknown_retired_at = self.clock()
        self._journal.append(() if first else set(changed))  # no dir predates the first
        self._live = _Snapshot(name, self._seq, revision)
        self._links.update(files, None if first else changed, f"r{revision}")  # (6)
        return True

    def rollback(self) -> str:
        """Make the previous snapshot live again, right after a ``publish``; its name.

        For --check: the new snapshot was live while the check ran; if it
        failed, ``..data`` goes back to the one before, which stays untouched
        until ``finish``: a spare of ours, or the snapshot a previous process
        left (then the next publish writes everything again). The rejected
        one is kept as a spare. The caller still has the rejected files in its
        state: it must hand their paths to the next ``publish`` again.
        """
        previous, rejected = self._previous, self._live
        if previous is None or rejected is None:
            raise SnapshotError("no previous snapshot to go back to")
        name = previous if isinstance(previous, str) else previous.name
        tmp_link = self.target / TMP_LINK
        try:
            remove(tmp_link)
            os.symlink(name, tmp_link)
            os.replace(tmp_link, self.target / DATA_LINK)
        except OSError as err:
            remove(tmp_link)
            raise SnapshotError(err.errno, f"could not put {name} back: {err}") from err
        self._previous = None
        rejected.retired_at = self.clock()
        if isinstance(previous, str):  # a previous process's snapshot: contents unknown
            self._unknown.remove(previous)
            self._adopted, self._live = previous, None
            self._unknown.append(rejected.name)
            on_disk = {p: b"" for p in files_under(self.target / previous)}
            self._links.update(on_disk, None, f"back to {name}")
        else:
            paths = self._journal[-1]
            self._journal.append(set(paths))  # the way back touches the same paths
            self._spares.remove(previous)
            self._spares.append(rejected)
            self._live = previous
            back = {p: b"" for p in paths if (self.target / name / p).is_file()}
            self._links.update(back, paths, f"back to {name}")
        return name

    @property
    def can_roll_back(self) -> bool:
        """Whether the last publish has something to go back to (until ``finish``)."""
        return self._previous is not None

    def _new_name(self, revision: int) -> str:
        ns = time.time_ns()
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(ns // 1_000_000_000))
        return f"{SNAPSHOT_PREFIX}{stamp}.{ns % 1_000_000_000:09d}.r{revision}"

    def _choose_base(self, changed: Collection[str]) -> tuple[_Snapshot | None, Collection[str]]:
        """The oldest spare past its grace period and the paths it lacks; else (None, changed)."""
        now = self.clock()
        for spare in self._spares:
            if now - spare.retired_at >= self.grace:
                self._spares.remove(spare)
                delta: set[str] = set(changed)
                for entry in self._journal[spare.seq - self._journal_base :]:
                    delta.update(entry)
                return spare, delta
        return None, changed

    def _link_tree(self, path: Path) -> None:
        """Hard-link every live file into a new directory: no file contents copied."""
        assert self._live is not None
        live = self.target / self._live.name
        made: set[Path] = {path}
        self._make_dir(path, exist_ok=True)
        for rel in self._links.live_paths:
            dest = path / rel
            self._make_parents(dest, path, made)
            os.link(live / rel, dest)

    def _apply(
        self,
        root: Path,
        files: Mapping[str, bytes],
        delta: Collection[str],
        empty: bool,
        fsync_each: bool,
    ) -> set[Path]:
        """Remove, then write, the paths of ``delta``; return the directories touched."""
        dirs: set[Path] = {root}
        for rel in delta:
            if rel not in files:
                dest = root / rel
                if unlink_file(dest):
                    dirs.add(dest.parent)
                    self._prune_empty(dest.parent, root, dirs)
        made: set[Path] = {root}
        for rel in delta:
            value = files.get(rel)
            if value is None:
                continue
            dest = root / rel
            self._make_parents(dest, root, made)
            if empty:
                self._write_file(dest, value, fsync_each)
            else:
                # Never truncate: the old inode may be shared with another
                # snapshot, or still open in a reader. A new one replaces it.
                unlink_file(dest)
                self._write_file(dest, value, fsync_each, from_pool=True)
            dirs.add(dest.parent)
        return dirs | made

    def _write_file(self, dest: Path, value: bytes, fsync: bool, from_pool: bool = False) -> None:
        """Write ``value`` as a new file at ``dest``: a pooled empty file, or a new one."""
        if from_pool and self._pool:
            pooled = self.target / POOL_DIR / self._pool.pop()
            fd = os.open(pooled, os.O_WRONLY | os.O_CLOEXEC)
        else:
            pooled = None
            fd = self._create(dest)
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except OSError:
            if pooled is not None:
                unlink_file(pooled)
            raise
        finally:
            os.close(fd)
        if pooled is not None:
            os.rename(pooled, dest)

    def _create(self, path: Path) -> int:
        """A new empty file with the mode (whatever the umask) and owner asked for."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        try:
            os.fchmod(fd, self.mode)
            if self.uid != -1 or self.gid != -1:
                os.fchown(fd, self.uid, self.gid)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _make_dir(self, path: Path, exist_ok: bool = False) -> None:
        try:
            os.mkdir(path, self.dir_mode)
        except FileExistsError:
            if not exist_ok:
                raise
            return
        os.chmod(path, self.dir_mode)
        if self.uid != -1 or self.gid != -1:
            os.chown(path, self.uid, self.gid)

    def _make_parents(self, dest: Path, root: Path, made: set[Path]) -> None:
        parent = dest.parent
        if parent in made:
            return
        if parent != root:
            self._make_parents(parent, root, made)
            self._make_dir(parent, exist_ok=True)
        made.add(parent)

    def _prune_empty(self, directory: Path, root: Path, dirs: set[Path]) -> None:
        while directory != root:
            try:
                os.rmdir(directory)
            except OSError:  # not empty, or already gone
                return
            dirs.discard(directory)
            directory = directory.parent
            dirs.add(directory)

    # -- after the signal -------------------------------------------------

    def finish(self, prepare: bool = True) -> None:
        """After the signal, off the critical path: the rest of a publish.

        Makes the flip durable (fsync of the target directory), deletes
        snapshot dirs that are neither live nor kept, and (``prepare``) makes
        ready for the next change: empty files and a spare snapshot. Errors
        in cleaning are logged and the rest still runs.
        """
        self._previous = None
        try:
            if self._unsynced:
                syncfs(self.target)
                self._unsynced = False
            else:
                fsync_dir(self.target)
        except OSError as err:
            log.warning("could not make the snapshot durable: %s", err)
        if self._unknown:
            # The previous process's snapshot gets the same grace as any other.
            time.sleep(max(0.0, self.grace - (self.clock() - self._unknown_retired_at)))
        now = self.clock()
        excess = len(self._spares) - MAX_SPARES
        doomed = list(self._unknown)
        self._unknown = []
        for spare in list(self._spares):  # oldest first; younger than grace: never
            if excess <= 0 or now - spare.retired_at < self.grace:
                break
            self._spares.remove(spare)
            doomed.append(spare.name)
            excess -= 1
        for name in doomed:
            try:
                remove(self.target / name)
            except OSError as err:
                log.warning("could not remove old snapshot %s: %s", name, err)
        seqs = [s.seq for s in self._spares]
        if self._live is not None:
            seqs.append(self._live.seq)
        keep_from = min(seqs, default=self._seq)
        del self._journal[: keep_from - self._journal_base]
        self._journal_base = keep_from
        if not prepare:
            return
        try:
            self._fill_pool()
            if not self._spares and self._live is not None:
                self._prepare_spare(self._live)
        except OSError as err:
            log.warning("could not prepare for the next change: %s", err)

    def _prepare_spare(self, live: _Snapshot) -> None:
        """A hard-linked copy of the live snapshot, so the next change finds a spare.

        Without one, the first change after start-up would pay for the copy
        (about 145 ms at 10,000 files) before its signal; here it is paid
        after the signal. No reader ever saw it, so it has no grace period.
        """
        name = self._new_name(live.revision)
        try:
            self._link_tree(self.target / name)
        except OSError:
            remove(self.target / name)
            raise
        self._spares.append(_Snapshot(name, live.seq, live.revision, self.clock() - self.grace))

    def _fill_pool(self) -> None:
        pool = self.target / POOL_DIR
        self._make_dir(pool, exist_ok=True)  # recover() removed any left by another process
        while len(self._pool) < POOL_SIZE:
            self._pool_serial += 1
            name = str(self._pool_serial)
            os.close(self._create(pool / name))
            self._pool.append(name)

    @property
    def kept_dirs(self) -> list[str]:
        """Snapshot directories this writer keeps: the live one and the spares."""
        live = [self._live.name] if self._live else [self._adopted] if self._adopted else []
        return live + [spare.name for spare in self._spares]
