"""Spares made a few links at a time, between changes: the rotation a burst needs.

A spare is a directory holding the live files as hard links, which the next
change is applied to instead of copying every file (see ``ledger``). Making
one costs a link per file (40-150 ms at 10,000 files here), so it is made
GROW_STEP links at a time, between changes and while a change waits for a
spare's grace, and checked when complete: it was open to anyone with write
access to the target meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .filemaker import FileMaker
from .fsops import Tree, open_dir, stamps, walk
from .layout import snapshot_name
from .ledger import Ledger, Snap
from .links import TopLinks

GROW_STEP = 32  # files linked into a spare being made between two looks at the clock


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

    def grow(self, stop: Callable[[], bool], complete: bool = True) -> None:
        """Make the spares the ledger wants: hard links to the live files in a new
        directory, GROW_STEP at a time, until ``stop()`` says so (checked after each
        step); the rest next time.

        The live snapshot may change between steps: each step links from the one
        live then, and the spare counts as of the sequence it started at, so the
        paths changed since are redone when it is used or caught up (``ledger``).
        Without a spare, the first change after start-up would pay for a copy of
        every file before its signal. No reader ever saw it: it has no grace period.
        ``complete``: False leaves the last step (see ``wait_for_spare``).
        """
        ledger = self.ledger
        while True:  # one step at least, whatever the clock says
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
            if not complete and len(self._to_link) <= GROW_STEP:
                return
            self._grow_step(ledger.growing, live)
            if stop():
                return

    def _grow_step(self, spare: Snap, live: Snap) -> None:
        """Link the next GROW_STEP files of the spare being made; complete it after the last."""
        batch = self._to_link[-GROW_STEP:]
        started = time.monotonic()  # the real cost, whatever clock the ledger uses
        try:
            with (
                Tree(open_dir(spare.name, self._fd)) as tree,
                Tree(open_dir(live.name, self._fd)) as src,
            ):
                # What changed since the last step goes at once: a deleted key's value
                # must not wait for the spare to be complete (linked anew if live).
                for rel in self.ledger.changed_since(self._purged):
                    tree.remove(rel)  # and its directories left empty
                self._purged = self.ledger.seq
                for rel in batch:
                    if not self._maker.link(src, tree, rel) and rel in self._links.live_paths:
                        raise FileNotFoundError(f"{rel!r} is missing from {live.name!r}")
                self._maker.timed(len(batch), time.monotonic() - started)
                del self._to_link[-GROW_STEP:]
                if not self._to_link:
                    self._check_made(spare, tree, src.fd)
                    tree.sync()  # every directory of it: the links of every step
        except OSError:
            self.ledger.doom(spare.name, self.clock())
            raise
        if not self._to_link:
            self.stamp(spare)
            self.ledger.grown(spare)

    def stamp(self, spare: Snap) -> None:
        """Note how a spare looks (see fsops.stamps): every directory it holds, the live
        one's and those of the paths it lacks (a deleted key's directory is still
        there, and a file planted in it would be served if it went unstamped)."""
        dirs = self._links.dirs_with(self.ledger.changed_since(spare.seq))
        spare.stamps = stamps(self._fd, spare.name, dirs)

    def _check_made(self, spare: Snap, tree: Tree, live_fd: int) -> None:
        """Raise unless the spare just made holds what we linked and nothing else: it
        was open to anyone with write access to the target while it was made, a step
        at a time (reused spares are checked by their stamps; this one has none yet).
        Every live file must be there (same inode) and every file there must be a
        live one, except the paths changed since the spare was started, which are
        rewritten when it is used anyway. Its directories are opened in ``tree``,
        for the caller's fsync of each."""
        live_files, live_dirs = {}, set()
        for rel, entry in walk(live_fd):
            if entry.is_dir(follow_symlinks=False):
                live_dirs.add(rel)
            elif entry.is_file(follow_symlinks=False):
                live_files[rel] = entry.inode()
        redone = self.ledger.changed_since(spare.seq)
        made: dict[str, int] = {}
        for rel, entry in walk(tree.fd):
            if entry.is_dir(follow_symlinks=False):
                ok = rel in live_dirs or any(p.startswith(rel + "/") for p in redone)
                tree.dir(rel)
            elif entry.is_file(follow_symlinks=False):
                made[rel] = entry.inode()
                ok = rel in redone or live_files.get(rel) == entry.inode()
            else:
                ok = False
            if not ok:
                raise FileExistsError(f"{spare.name}/{rel} was not made by us: not used")
        paths = self._links.live_paths  # what the live one holds, as far as we know
        lost = [r for r in paths if r not in redone and made.get(r, 0) != live_files.get(r)]
        if lost:
            raise FileNotFoundError(f"{spare.name}/{lost[0]} is missing: not used")
