"""Housekeeping of the target, after the signal and off the critical path.

Deletes the snapshot directories no reader can still be in, brings spares
past their grace period up to the live content (so no directory keeps a value
that etcd no longer has), fills the pool of empty files and prepares a spare
for the next change. What is due is decided by the ``ledger``; this does it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .filemaker import FileMaker
from .fsops import remove_at, stamps, unchanged
from .ledger import Ledger, Snap
from .links import TopLinks
from .spares import SpareMaker

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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._fd = target_fd
        self.ledger = ledger
        self._maker = maker
        self._links = links
        self.clock = clock
        self.sleep = sleep
        self.spares = SpareMaker(target_fd, ledger, maker, links, clock)

    def run(self, step: float | None = None) -> float | None:
        """Housekeeping that is due: old snapshots deleted, spares brought up to date,
        the pool filled, a spare made. Returns when more will be due (monotonic).

        ``step``: seconds that making a spare may take in this run (None: until
        it is complete); the rest is due again at once, and the caller runs it
        between changes. Errors are logged and the rest still runs; it is tried
        again next time.
        """
        self.spares.drop_stale()  # before its directory is removed, a step at a time
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
        except OSError as err:
            log.warning("could not bring a spare up to date: %s", err)
        try:
            self._maker.fill_pool(self._fd)
        except OSError as err:  # new files are then made when written, a little slower
            log.warning("could not fill the pool of empty files: %s", err)
        deadline = None if step is None else self.clock() + step
        try:
            self.spares.grow(lambda: deadline is not None and self.clock() >= deadline)
        except OSError as err:  # not again before the next change: no loop on a full disk
            self.ledger.grow_failed = True
            log.warning("could not make a spare: %s; trying again after the next change", err)
        self.ledger.trim()
        if self.ledger.growing is not None:
            return self.clock()  # the next step now, unless a change comes first
        return self.ledger.next_due(self.clock())  # what failed above is due again too

    def stamp_retired(self) -> None:
        """Note how each spare retired since looks (see fsops.stamps): a spare is reused
        only while it still looks so."""
        for spare in self.ledger.spares:
            if spare.stamps is None:
                self.spares.stamp(spare)

    def _catch_up(self, spare: Snap, paths: set[str]) -> None:
        """Bring a spare past its grace period to the live content: it then holds no value
        that is no longer live, and the next change costs only its own paths."""
        made = spare.stamps
        if made is not None and not unchanged(self._fd, spare.name, made):
            self.ledger.doom(spare.name, self.clock())  # someone changed it: not ours now
            return
        self.spares.relink(spare, paths, paths, sync=True)
        self.ledger.caught_up(spare)  # stamped where a changed path was too (see stamp)
        spare.stamps = stamps(self._fd, spare.name, self._links.dirs_with(paths))

    def spare(self, now: float) -> tuple[Snap, set[str]] | None:
        """The spare for the next change and the paths it lacks: one past its grace;
        else, when every one is in its grace (a burst), the oldest once its shorter
        grace ends (``wait_for_spare``); None: the caller copies the live one."""
        spare = self._verified(now)
        if spare is None and self.ledger.spares:
            self.ledger.short(now)  # the rotation is too small for this rate
            if self.wait_for_spare(now):
                spare = self._verified(self.clock())
        return spare

    def _verified(self, now: float) -> tuple[Snap, set[str]] | None:
        """A spare that is ready and still as we left it (nobody added, removed or
        replaced an entry in its directories since)."""
        ledger = self.ledger
        while (spare := ledger.take_spare(now)) is not None:
            made = spare[0].stamps
            if made is None:  # retired and not looked at since: copy rather than trust it
                ledger.spares.insert(0, spare[0])
                return None
            if unchanged(self._fd, spare[0].name, made):
                return spare
            log.warning("snapshot %r was changed by someone else: not used", spare[0].name)
            ledger.doom(spare[0].name, now)
        return None

    def wait_for_spare(self, now: float) -> bool:
        """A change found every spare in its grace: wait for the oldest one's shorter
        grace to end, if that comes sooner than a copy of every file would take (at
        10,000 files: a few ms against 40-150 ms), making the next spare meanwhile.
        Whether it waited (False: copy instead)."""
        ready_at = self.ledger.spare_ready_at()
        copy_takes = len(self._links.live_paths) * self._maker.link_seconds
        if ready_at is None or ready_at - now >= copy_takes:
            return False
        while (before := self.clock()) < ready_at:
            try:  # a step at a time: no step outlasts the wait by much
                self.spares.grow(lambda: self.clock() >= ready_at)
            except OSError as err:  # only a spare for later failed
                self.ledger.grow_failed = True
                log.warning("could not make a spare: %s", err)
            left = ready_at - self.clock()
            if left > 0:
                self.sleep(left)
            if self.clock() == before:  # a clock that does not move: copy instead
                return False
        return True
