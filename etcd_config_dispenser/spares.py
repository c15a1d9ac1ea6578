"""Spares made a few links at a time, between changes: the rotation a burst needs.

A spare is a directory holding the live files as hard links, which the next
change is applied to instead of copying every file (see ``ledger``). Making
one costs a link per file (40-150 ms at 10,000 files here), so it is made
GROW_STEP links at a time, between changes and while a change waits for a
spare's grace, and then checked a step at a time too (``SpareCheck``): it
was open to anyone with write access to the target meanwhile. A step costs
about a millisecond at most, whatever the number of files (the first step
of a check sorts the directories: 17 ms at 50,000 of them): a change that
comes waits for one step at most.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable

from .filemaker import FileMaker, file_inode, has_file
from .fsops import Tree, open_dir, stamps, walk
from .layout import snapshot_name
from .ledger import Ledger, Snap
from .links import TopLinks

GROW_STEP = 32  # files linked into a spare being made between two looks at the clock
CHECK_STEP = 128  # entries of a spare checked between two looks at the clock
DIR_WEIGHT = 8  # a directory counts as that many files in a check step (it is fsynced)


class SpareCheck:
    """Whether a spare just made holds what we linked and nothing else, a step at a time.

    Its directories are stamped first (``fsops.stamps``), then every entry is
    compared with the live snapshot and every directory fsynced (the links of
    every step become durable). The stamps become the spare's: an entry changed
    before the walk passed it is caught by the walk, one changed after by the
    stamps, when the spare is next used or caught up. So the spare need not
    stay still for the whole check, only be as we made it where it is used.

    Every live file must be there, same inode, and every entry there must be a
    live file or one of the live snapshot's directories, except the paths
    changed since the spare was started (``redone``: rewritten when it is used).
    The first is proved by a count at the end (a step at a time too): the files
    seen, less those at changed paths, must be as many as the live files not
    changed; each of them was matched by inode on the way.
    """

    def __init__(self, spare: Snap, dirs: set[str]) -> None:
        self.spare = spare
        self._dirs = dirs | {""}  # every directory it may hold (see TopLinks.dirs_with)
        self._to_stamp = sorted(dirs)
        self._stamping = True
        self._stamps: set[tuple[str, int, int]] = set()
        self._walker: Generator[tuple[str, os.DirEntry[str]], None, None] | None = None
        self._files = 0  # regular files seen by the walk so far (then: not changed since)
        self._to_count: list[str] | None = None  # changed paths still to look for, at the end
        self._kept = 0  # live files it must hold

    def close(self) -> None:
        """Abandon the check (the walk holds open directories)."""
        if self._walker is not None:
            self._walker.close()
            self._walker = None

    def step(self, target_fd: int, live: str, redone: set[str], live_paths: set[str]) -> bool:
        """The next step; whether the check is over (the spare's stamps are then set).
        ``live``: the live snapshot now; ``redone``: the paths changed since the spare
        was started; ``live_paths``: the live snapshot's files. Raises OSError when
        the spare is not as we made it."""
        name = self.spare.name
        if self._stamping:  # the root at each call, and the next CHECK_STEP directories
            self._stamps |= stamps(target_fd, name, self._to_stamp[-CHECK_STEP:])
            del self._to_stamp[-CHECK_STEP:]
            self._stamping = bool(self._to_stamp)
            return False
        with Tree(open_dir(name, target_fd)) as spare, Tree(open_dir(live, target_fd)) as src:
            if self._walker is None:
                self._walker = walk(spare.fd)  # its own descriptors, kept across steps
            if self._to_count is None:
                budget = CHECK_STEP
                for rel, entry in self._walker:
                    budget -= self._look(spare, src, rel, entry, redone)
                    if budget <= 0:
                        return False
                os.fsync(spare.fd)
                # Counted against the paths changed by now (the walk checked against
                # fewer: a path changed since was a live file then): the live files it
                # must hold, and those of its files that are not such.
                self._to_count = list(redone)
                self._kept = len(live_paths) - len(live_paths & redone)
            for rel in self._to_count[-CHECK_STEP:]:  # a step at a time: a burst's paths
                self._files -= has_file(spare, rel)
            del self._to_count[-CHECK_STEP:]
            if self._to_count:
                return False
            if self._files != self._kept:
                raise FileNotFoundError(f"{name} lacks {self._kept - self._files} live files")
        self._walker = None
        self.spare.stamps = frozenset(self._stamps)
        return True

    def _look(
        self, spare: Tree, src: Tree, rel: str, entry: os.DirEntry[str], redone: set[str]
    ) -> int:
        """Check one entry of the spare; what it cost, in files."""
        if entry.is_dir(follow_symlinks=False):
            if rel not in self._dirs:
                raise FileExistsError(f"{self.spare.name}/{rel} was not made by us: not used")
            os.fsync(spare.dir(rel))
            return DIR_WEIGHT
        if entry.is_file(follow_symlinks=False):
            self._files += 1
            if rel in redone or file_inode(src, rel) == entry.inode():
                return 1
        raise FileExistsError(f"{self.spare.name}/{rel} was not made by us: not used")


class SpareMaker:
    """Makes the spares the ledger wants, a step at a time, in one target directory."""

    def __init__(
        self,
        target_fd: int,
        ledger: Ledger,
        maker: FileMaker,
        links: TopLinks,
        clock: Callable[[], float],
    ) -> None:
        self._fd = target_fd
        self.ledger = ledger
        self._maker = maker
        self._links = links
        self.clock = clock
        self._to_link: list[str] = []  # what the spare being made still lacks
        self._purged = 0  # the spare being made holds no path changed since this sequence
        self.checking: SpareCheck | None = None  # of the spare made, once every file is linked
        self._redone: tuple[int, int, set[str]] = (-1, -1, set())  # (from seq, to seq, paths)

    def grow(self, stop: Callable[[], bool]) -> None:
        """Make the spares the ledger wants: hard links to the live files in a new
        directory, GROW_STEP at a time, then checked (``SpareCheck``), until
        ``stop()`` says so (asked after each step); the rest next time.

        The live snapshot may change between steps: each step links from the one
        live then, and the spare counts as of the sequence it started at, so the
        paths changed since are redone when it is used or caught up (``ledger``).
        Without a spare, the first change after start-up would pay for a copy of
        every file before its signal. No reader ever saw it: it has no grace period.
        """
        ledger = self.ledger
        while True:  # one step at least, whatever the clock says
            self.drop_stale()
            live = ledger.live
            if live is None:
                return
            if ledger.growing is None:
                if not ledger.to_grow():
                    return
                name = snapshot_name(live.revision)
                self._maker.mkdir(self._fd, name)
                ledger.growing = Snap(name, live.seq, live.revision)
                self._to_link = list(self._links.live_paths)
                self._purged = live.seq
            if self._to_link:
                self._grow_step(ledger.growing)
            else:
                self._check_step(ledger.growing, live)
            if stop():
                return

    def drop_stale(self) -> None:
        """Close the check of a spare doomed meanwhile (a rollback, a failed step): its
        walk holds open directories of it."""
        if self.checking is not None and self.checking.spare is not self.ledger.growing:
            self.checking.close()
            self.checking = None

    def _grow_step(self, spare: Snap) -> None:
        """Link the next GROW_STEP files of the spare being made."""
        batch = self._to_link[-GROW_STEP:]
        started = time.monotonic()  # the real cost, whatever clock the ledger uses
        # What changed since the last step goes at once: a deleted key's value must not
        # wait for the spare to be linked whole (linked anew if live); during its check
        # (which changes nothing) it waits for the catch-up.
        self.relink(spare, self.ledger.changed_since(self._purged), batch)
        self._purged = self.ledger.seq
        self._maker.timed(len(batch), time.monotonic() - started)
        del self._to_link[-GROW_STEP:]

    def relink(
        self, spare: Snap, removed: Iterable[str], linked: Iterable[str], sync: bool = False
    ) -> None:
        """In ``spare``: ``removed`` go (and their directories left empty), then ``linked``
        are linked from the live snapshot; ``sync``: every directory opened is fsynced.
        A path the live snapshot should hold and lacks makes the spare no good: any
        failure dooms it (and raises)."""
        live = self.ledger.live
        assert live is not None
        try:
            with (
                Tree(open_dir(spare.name, self._fd)) as tree,
                Tree(open_dir(live.name, self._fd)) as src,
            ):
                for rel in removed:
                    tree.remove(rel)
                for rel in linked:
                    if not self._maker.link(src, tree, rel) and rel in self._links.live_paths:
                        raise FileNotFoundError(f"{rel!r} is missing from {live.name!r}")
                if sync:
                    tree.sync()
        except OSError:
            self.ledger.doom(spare.name, self.clock())
            raise

    def _check_step(self, spare: Snap, live: Snap) -> None:
        """The next step of the check of a spare whose files are all linked; once it is
        over, the spare joins the rotation (and is caught up at the next housekeeping:
        the check changes nothing, so paths changed meanwhile wait for that)."""
        redone = self._changed_since_start(spare)
        if self.checking is None:
            self.checking = SpareCheck(spare, self._links.dirs_with(redone))
        try:
            done = self.checking.step(self._fd, live.name, redone, self._links.live_paths)
        except OSError:
            self.checking.close()
            self.checking = None
            self.ledger.doom(spare.name, self.clock())
            raise
        if done:
            self.checking = None
            self.ledger.grown(spare)

    def _changed_since_start(self, spare: Snap) -> set[str]:
        """``ledger.changed_since(spare.seq)``, kept up to date rather than made anew at
        each step (after a change of every key, that is O(keys) a step)."""
        ledger = self.ledger
        if self._redone[0] != spare.seq or self._redone[1] < ledger.base:
            self._redone = (spare.seq, spare.seq, set())
        start, seen, paths = self._redone
        for entry in ledger.journal[seen - ledger.base :]:
            paths |= entry
        self._redone = (start, ledger.seq, paths)
        return paths

    def stamp(self, spare: Snap) -> None:
        """Note how a spare looks (see fsops.stamps): every directory it holds, the live
        one's and those of the paths it lacks (a deleted key's directory is still
        there, and a file planted in it would be served if it went unstamped)."""
        dirs = self._links.dirs_with(self.ledger.changed_since(spare.seq))
        spare.stamps = stamps(self._fd, spare.name, dirs)
