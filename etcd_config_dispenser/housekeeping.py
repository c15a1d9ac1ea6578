"""Housekeeping of the target, after the signal and off the critical path.

Deletes the snapshot directories no reader can still be in, brings spares
past their grace period up to the live content (so no directory keeps a value
that etcd no longer has), fills the pool of empty files and prepares a spare
for the next change. What is due is decided by the ``ledger``; this does it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .filemaker import FileMaker
from .fsops import Tree, open_dir, remove_at, stamps, unchanged
from .layout import snapshot_name
from .ledger import Ledger, Snap
from .links import TopLinks

log = logging.getLogger(__name__)

REMOVE_RETRY = 1.0  # seconds before removing an old snapshot is tried again
# Entries removed in one step: removing 10,000 files takes up to a second on a
# busy disk, and a change must not wait for it (the publisher checks between).
REMOVE_STEP = 256


def discard(target_fd: int, *names: str) -> list[str]:
    """Remove entries of ours that failed half-way; the ones that could not be (logged, not
    raised: the caller dooms them, so they are tried again, never forgotten)."""
    left = []
    for name in names:
        try:
            remove_at(target_fd, name)
        except OSError as err:
            log.warning("could not remove %r: %s", name, err)
            left.append(name)
    return left


class Housekeeper:
    """Does the housekeeping the ledger says is due, in one target directory."""

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

    def run(self) -> float | None:
        """Housekeeping that is due: old snapshots deleted, spares brought up to date,
        the pool filled, a spare prepared. Returns when more will be due (monotonic).

        Errors are logged and the rest still runs; it is tried again next time.
        """
        due = self.ledger.housekeeping(self.clock())
        for i, name in enumerate(due.delete):
            try:
                if not remove_at(self._fd, name, REMOVE_STEP):  # a big one: a step at a time
                    for rest in due.delete[i:]:
                        self.ledger.doomed[rest] = self.clock()
                    return self.clock()  # more now, unless a change comes first
            except OSError as err:  # never forgotten: it may hold values etcd dropped
                log.warning("could not remove old snapshot %r: %s; trying again", name, err)
                self.ledger.doom(name, self.clock() + REMOVE_RETRY)
        try:
            for spare, paths in due.catch_up:
                self._catch_up(spare, paths)
            self.stamp_retired()
            self._maker.fill_pool(self._fd)
            live = self.ledger.live
            if live is not None and not self.ledger.spares and self.ledger.max_spares > 0:
                self._prepare_spare(live)
        except OSError as err:
            log.warning("could not prepare for the next change: %s", err)
        self.ledger.trim()
        return self.ledger.next_due(self.clock())  # what failed above is due again too

    def stamp_retired(self) -> None:
        """Note how each spare retired since looks (see fsops.stamps): a spare is reused
        only while it still looks so."""
        for spare in self.ledger.spares:
            if spare.stamps is None:
                spare.stamps = stamps(self._fd, spare.name, self._links.dirs)

    def _catch_up(self, spare: Snap, paths: set[str]) -> None:
        """Bring a spare past its grace period to the live content: it then holds no value
        that is no longer live, and the next change costs only its own paths."""
        live = self.ledger.live
        assert live is not None
        made = spare.stamps
        if made is not None and not unchanged(self._fd, spare.name, made):
            self.ledger.doom(spare.name, self.clock())  # someone changed it: not ours now
            return
        try:
            with (
                Tree(open_dir(spare.name, self._fd)) as tree,
                Tree(open_dir(live.name, self._fd)) as src,
            ):
                for rel in paths:
                    tree.remove(rel)
                live_paths = self._links.live_paths
                lost = [r for r in paths if not self._maker.link(src, tree, r) and r in live_paths]
                if lost:  # the live one lacks what it should hold: this copy is no good
                    raise FileNotFoundError(f"{lost[0]!r} is missing from {live.name!r}")
                tree.sync()
        except OSError:
            self.ledger.doom(spare.name, self.clock())
            raise
        self.ledger.caught_up(spare)
        spare.stamps = stamps(self._fd, spare.name, self._links.dirs)

    def _prepare_spare(self, live: Snap) -> None:
        """A hard-linked copy of the live snapshot, so the next change finds a spare.

        Without one, the first change after start-up would pay for the copy
        before its signal; here it is paid after. No reader ever saw it, so
        it has no grace period.
        """
        name = snapshot_name(live.revision)
        try:
            paths = self._links.live_paths
            if self._maker.copy(self._fd, live.name, name, paths, sync=True):
                raise FileNotFoundError(f"files are missing from {live.name!r}")
        except OSError:
            for left in discard(self._fd, name):
                self.ledger.doom(left, self.clock())
            raise
        made = stamps(self._fd, name, self._links.dirs)
        self.ledger.add_spare(Snap(name, live.seq, live.revision, None, made))
