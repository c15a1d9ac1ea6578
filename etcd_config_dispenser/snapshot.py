"""Snapshot writer: one consistent directory per etcd revision, made live by one rename.

On disk (the Kubernetes AtomicWriter layout, names in ``layout``)::

    target/
      ..2026_11_25_10_00_00.000000123.r42/   every file at revision 42
      ..data -> ..2026_11_25_10_00_00.000000123.r42   the only thing readers follow
      cert.pem -> ..data/cert.pem                    one link per top-level name

A reader that opens ``target/cert.pem`` gets a whole file of one revision; a
reader that resolves ``..data`` once and reads several files from there gets
one whole revision, as long as it reads within the grace period.

A change costs the paths it changed, not the files held: it is applied to a
directory that already holds the rest (a retired snapshot past its grace
period, kept up to date by ``maintain``; see ``ledger``). In a burst, when
every one is still in its grace, the change waits for the oldest one's
shorter grace (``housekeeping``) while more are made (``spares``); only when
there is none, or a copy is cheaper than the wait (a few hundred files), is
the live one hard-linked into a new directory first. New files come
from a pool of empty ones made ahead (creating an inode is the slow part of
a small change) and are renamed into place. A file is never modified in
place: unchanged files are shared between snapshots as hard links.

Every operation goes through an open directory without following links
(``fsops``): whatever someone plants in the target, nothing outside it is
written or removed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import recovery
from .filemaker import ABSENT, FileMaker, apply_delta, has_file
from .fsops import Tree, files_in, open_dir, remove_at, syncfs
from .housekeeping import Housekeeper, discard
from .keys import MAX_PATH
from .layout import DATA_LINK, SNAPSHOT_NAME_MAX, TMP_LINK, snapshot_name
from .ledger import Ledger
from .links import TopLinks
from .rules import FileRule

log = logging.getLogger(__name__)

FSYNC_EACH_MAX = 32  # up to this many files written: fsync each; beyond: one syncfs
MAX_SPARES = 2  # retired snapshots kept, past their grace period, for the next changes
MOST_SPARES = 6  # ... and during bursts, at most (see ledger)
GRACE = 0.25  # seconds a retired snapshot stays untouched for readers still in it
# ... at least, during a burst (see ledger). What it protects is a reader that
# resolved ``..data`` once and reads several files from there: tens of
# microseconds for a certificate and its key, unless the reader is descheduled.
# Readers through the top-level links resolve ``..data`` at each open and never
# see a retired snapshot change. Kubernetes' AtomicWriter deletes the old one
# at once. Changes back to back (2-3 ms apart at 10,000 keys here) need about
# MIN_GRACE / interval spares, each one entry per file: 10 ms keeps that at 4-5.
MIN_GRACE = 0.005


class SnapshotError(OSError):
    """A snapshot could not be made live. The previous one is still served."""


@dataclass
class Published:
    """What one publish did: the snapshot made live and what changed in it."""

    name: str
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> why it was not written


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
        max_spares: int = MAX_SPARES,
        min_grace: float = MIN_GRACE,
        file_rules: tuple[FileRule, ...] = (),
        most_spares: int = MOST_SPARES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self._maker = FileMaker(mode, uid, gid, file_rules)
        self.clock = clock
        self.sleep = sleep
        self.defer_first_sync = defer_first_sync
        self.ledger = Ledger(grace, max_spares, min_grace, most_spares if max_spares else 0)
        self._links = TopLinks()
        self._fd = -1  # the target, open from recover() on
        self._unsynced = False  # the first snapshot waits for settle() to be synced
        self.made_target = False  # recover() made the target (see recovery.abandon)

    # -- start-up ---------------------------------------------------------

    def recover(self) -> str | None:
        """Open the target, clean up after a crash, adopt the live snapshot; its name.

        Only entries that are provably ours are removed (see ``recovery``); if
        anything else is there, TargetRefused names it and nothing is removed.
        The live snapshot is served until the first publish replaces it.
        """
        self._fd, found = recovery.open_target(self.target, self._maker.mkdir)
        self._links.adopt(found.links, found.live_files)
        self._housekeeper = Housekeeper(
            self._fd, self.ledger, self._maker, self._links, self.clock, self.sleep
        )
        self.ledger.adopted = found.live
        self.made_target = found.created
        return found.live

    @property
    def serving(self) -> str | None:
        """The live snapshot's name, whoever wrote it."""
        live = self.ledger.live
        return live.name if live is not None else self.ledger.adopted

    # -- publish ----------------------------------------------------------

    def publish(
        self, files: Mapping[str, bytes], changed: set[str], revision: int
    ) -> Published | None:
        """Make ``files`` the live snapshot; None if nothing changed.

        ``changed``: the paths whose content or presence differs from the
        previous publish (the first one writes everything); read, never changed
        (nor copied, unless there is more to add to it). Paths the writer
        still owes (``ledger.dirty``) are added. A key whose file cannot be
        written is left out and named in ``failed``; an error that no key
        explains raises SnapshotError and leaves the live snapshot as it was.

        1. Nothing changed: return None, touch nothing.
        2. Choose a directory: a spare past its grace period (renamed); else
           the oldest spare once its shorter grace ends, if that comes sooner
           than a copy of every file would take; else a new one hard-linked
           from the live one, else (first) a new one.
        3. Bring it to ``files``: remove, then write, the paths that differ;
           a path that only the journal names is linked from the live one.
        4. Make it durable: fsync each new file and every directory touched,
           or one syncfs for a big change (first snapshot: see settle).
        5. Flip: symlink ``..data_tmp`` -> new dir, rename it onto ``..data``.
           This is the atomic moment.
        6. Add and remove the top-level links.
        The retired directory is left for ``maintain``; ``settle``
        (after the signal) makes the flip itself durable.
        """
        ledger = self.ledger
        first = ledger.live is None
        if ledger.dirty:  # a new set only then: at the first publish ``changed`` is every path
            changed = changed | ledger.dirty
        if not first and not changed:  # (1)
            return None
        now = self.clock()
        name = snapshot_name(revision)
        delta: Collection[str] = files if first else changed  # files: a view, not a copy
        renamed, spare = False, None  # renamed: the spare is ``name`` now, gone with it
        try:
            spare = None if first else self._housekeeper.spare(now)  # (2)
            if spare is not None:
                os.rename(spare[0].name, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                renamed = True
                delta = spare[1] | changed
            elif first:
                self._maker.mkdir(self._fd, name)
            else:
                assert self.serving is not None
                copy = (self._maker, self._fd, self.serving, self._links.live_paths)
                delta = _copy_live(*copy, name, files, changed)
            defer = first and self.defer_first_sync and ledger.adopted is None  # see settle
            live = None if first else self.serving
            args = (self._maker, self._fd, name, live, files, delta, changed, first, defer)
            result = _fill(*args)  # (3), (4)
            self._unsynced = self._unsynced or defer
            self._flip(name)  # (5)
        except OSError as err:
            for left in discard(self._fd, TMP_LINK, name):
                ledger.doom(left, now)  # tried again by the housekeeping, never forgotten
            if spare is not None and not renamed:  # its content is unknown: never reuse it
                ledger.doom(spare[0].name, now)
            ledger.failed(delta if first else changed)  # owed: the next publish tries again
            raise SnapshotError(err.errno, f"snapshot r{revision} not published: {err}") from err
        ledger.published(name, revision, changed, self.clock())  # retired from the flip on
        ledger.failed(result.failed)
        if first:  # (6) every path at once: one set, which the links keep, not a map too
            live_paths = {p for p in files if p not in result.failed}
            self._links.reset(self._fd, live_paths, f"r{revision}")
            result.written = sorted(p for p in changed if p in live_paths)
        else:
            present = {p: p in files and p not in result.failed for p in delta}
            self._links.update(self._fd, present, f"r{revision}")
            result.written = sorted(p for p in changed if present.get(p))
        result.removed = sorted(p for p in changed if p not in files)
        return result

    def _flip(self, name: str) -> None:
        """Point ``..data`` at ``name`` in one rename: the atomic moment."""
        remove_at(self._fd, TMP_LINK)
        os.symlink(name, TMP_LINK, dir_fd=self._fd)
        os.rename(TMP_LINK, DATA_LINK, src_dir_fd=self._fd, dst_dir_fd=self._fd)

    def rollback(self) -> str:
        """Make the previous snapshot live again, right after a ``publish``; its name.

        For --check: the rejected snapshot was live while the check ran; it
        becomes a spare, and its paths stay owed (``ledger.dirty``), so the
        next publish tries them again without the caller's help.
        """
        if self.ledger.previous is None:
            raise SnapshotError("no previous snapshot to go back to")
        name = self.ledger.previous
        name = name if isinstance(name, str) else name.name
        try:
            self._flip(name)
        except OSError as err:
            discard(self._fd, TMP_LINK)
            raise SnapshotError(err.errno, f"could not put {name} back: {err}") from err
        name, paths = self.ledger.rolled_back(self.clock())
        present = _present(self._fd, name, paths)
        if present is None:  # live again all the same; the links follow next time
            pass
        elif paths is None:  # a previous run's snapshot: every other path is gone
            live_paths = {p for p, there in present.items() if there}
            self._links.reset(self._fd, live_paths, f"back to {name}")
        else:
            self._links.update(self._fd, present, f"back to {name}")
        return name

    def owe(self, paths: Collection[str]) -> None:
        """These paths differ from what is live: the next publish writes them."""
        self.ledger.failed(paths)

    @property
    def target_fd(self) -> int | None:
        """The target, as the writer holds it open (None before ``recover``): where values
        spool (see ``values``), whatever its path comes to point at."""
        return self._fd if self._fd >= 0 else None

    @property
    def can_roll_back(self) -> bool:
        """Whether the last publish has something to go back to (until ``settle``)."""
        return self.ledger.previous is not None

    # -- after the signal -------------------------------------------------

    def settle(self) -> None:
        """The last publish stays: make the flip durable; nothing to roll back to now.

        Right after the signal, off the critical path; the snapshot just
        retired is stamped too, so that the next change, even back to back,
        may reuse it once its grace is over. A failure is logged: the
        snapshot is live either way.
        """
        self.ledger.settle()
        try:
            if self._unsynced:
                syncfs(self._fd)
                self._unsynced = False
            else:
                os.fsync(self._fd)
            self._housekeeper.stamp_retired()
        except OSError as err:
            log.warning("could not make the snapshot durable: %s", err)

    def maintain(self, step: float | None = None) -> float | None:
        """Housekeeping that is due (see ``housekeeping``); when more will be due.
        ``step``: seconds a spare being made may take now (None: all it needs)."""
        return self._housekeeper.run(step)

    @property
    def kept_dirs(self) -> list[str]:
        """Snapshot directories this writer knows of: live, spares, and those to delete."""
        return self.ledger.names()


def max_key_path(target: Path) -> int:
    """The longest key path that still fits PATH_MAX below a snapshot directory."""
    return MAX_PATH - len(os.fsencode(target)) - SNAPSHOT_NAME_MAX - 2


def _fill(
    maker: FileMaker,
    target_fd: int,
    name: str,
    live: str | None,
    files: Mapping[str, bytes],
    delta: Collection[str],
    changed: set[str],
    first: bool,
    defer_sync: bool,
) -> Published:
    """Steps 3 and 4 of ``publish`` in the directory ``name``, from the ``live`` one."""
    result = Published(name)
    try:
        source = Tree(open_dir(live, target_fd)) if live is not None else None
    except OSError as err:  # replaced by someone: every file is written instead
        if err.errno not in ABSENT:
            raise
        source = None
    pool = maker.open_pool(target_fd) if not first else None
    written: list[int] = []
    try:
        with Tree(open_dir(name, target_fd)) as tree:
            args = (tree, source, files, delta, changed, pool, written, FSYNC_EACH_MAX)
            result.failed, count = apply_delta(maker, *args)
            if defer_sync:
                pass  # the first snapshot: synced whole by settle(), see app
            elif first or count > FSYNC_EACH_MAX:
                syncfs(tree.fd)
            else:
                for fd in written:
                    os.fsync(fd)
                tree.sync()
    finally:
        for fd in written:
            os.close(fd)
        if pool is not None:
            os.close(pool)
        if source is not None:
            source.close()
    return result


def _copy_live(
    maker: FileMaker,
    target_fd: int,
    live: str,
    paths: Collection[str],
    name: str,
    files: Mapping[str, bytes],
    changed: set[str],
) -> set[str]:
    """A new directory ``name`` with the live files as hard links; the paths still to
    write (all of them, if the live snapshot is no longer a directory of ours)."""
    try:
        missing = maker.copy(target_fd, live, name, paths, sync=True)
    except OSError as err:
        if err.errno not in ABSENT:
            raise
        log.warning("live snapshot %r is gone or replaced: writing every file", live)
        if discard(target_fd, name):
            raise
        maker.mkdir(target_fd, name)
        return set(files)
    return changed | set(missing)  # lost from the live one: written anew


def _present(target_fd: int, name: str, paths: Collection[str] | None) -> dict[str, bool] | None:
    """Which of ``paths`` are files in snapshot ``name`` (``None``: all its files); None if
    it cannot be read."""
    try:
        with Tree(open_dir(name, target_fd)) as tree:
            if paths is None:
                return dict.fromkeys(files_in(tree.fd), True)
            return {p: has_file(tree, p) for p in paths}
    except OSError as err:
        log.warning("%r: cannot read it: %s", name, err)
        return None
