"""Which snapshot directories exist, what each one holds, and which to use next. No I/O.

Publishes are numbered: publish ``k`` moves the live content from sequence
``k`` to ``k + 1``, and ``journal[k]`` holds the paths it changed. A
directory whose content is that of sequence ``s`` therefore differs from the
live one in exactly the paths of ``journal[s:]``: bringing it up to date
costs those paths, not a rewrite of every file. ``dirty`` holds paths the
live directory may not hold as the key tree says (a write that failed, a
change rolled back by --check): every publish rewrites them, so the caller
never has to remember what was not served.

A retired directory may still be read by someone who resolved ``..data``
just before the flip, so it is left untouched for ``grace`` seconds, or
during a burst (no spare past ``grace``) for ``min_grace`` at least: changes
back to back then cycle through the directories retired in the last
``min_grace`` instead of each copying every file. Once
that is over it is either deleted (beyond ``wanted``) or brought up to
the live content (``catch_up``): then no directory under the target holds a
value that etcd no longer has, and the next change starts from it.

Changes ``i`` seconds apart need about ``min_grace / i`` directories in that
rotation. It starts at ``max_spares``; a change that finds none ready
(``short``) asks for one more, up to ``most_spares``, made a few links at a
time between changes (``growing``), and the rotation shrinks back once no
change has been short for ``BURST_MEMORY`` seconds. A directory costs one
entry per file (disk, or kernel memory on tmpfs), so only a target that sees
bursts keeps more than ``max_spares``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .fsops import Stamps

BURST_MEMORY = 300.0  # seconds a grown rotation is kept after the last change it served


@dataclass
class Snap:
    """A snapshot directory of this process: its name and the sequence its files are at."""

    name: str
    seq: int
    revision: int
    retired_at: float | None = None  # monotonic time it stopped being live; None: never live
    stamps: Stamps | None = None  # its directories when we last changed it (see fsops.stamps)


@dataclass
class Housekeeping:
    """What is due now: directories to delete, spares to bring up to the live content."""

    delete: list[str] = field(default_factory=list)
    catch_up: list[tuple[Snap, set[str]]] = field(default_factory=list)
    next_due: float | None = None  # when more will be due (monotonic), if ever


class Ledger:
    def __init__(
        self,
        grace: float,
        max_spares: int,
        min_grace: float | None = None,
        most_spares: int | None = None,
    ) -> None:
        self.grace = grace
        self.min_grace = grace if min_grace is None else min(min_grace, grace)
        self.max_spares = max_spares
        self.most_spares = max(max_spares, most_spares or 0)  # what a burst may grow to
        self.wanted = max_spares  # spares to keep now
        self.short_at: float | None = None  # when a change last found no spare ready
        self.growing: Snap | None = None  # a spare being made, a few links at a time
        self.grow_failed = False  # making one failed: not again before the next change
        self.live: Snap | None = None
        self.adopted: str | None = None  # live, left by a previous process; contents untracked
        self.spares: list[Snap] = []  # oldest retirement first
        self.doomed: dict[str, float] = {}  # directory name -> delete it from this time on
        self.previous: Snap | str | None = None  # what rollback() goes back to
        self.journal: list[frozenset[str]] = []
        self.base = 0  # sequence of journal[0]
        self.dirty: set[str] = set()
        self.live_since: float | None = None  # when the live one became live

    @property
    def seq(self) -> int:
        return self.base + len(self.journal)

    def changed_since(self, seq: int) -> set[str]:
        """The paths changed since sequence ``seq`` (what a directory at ``seq`` lacks)."""
        paths: set[str] = set()
        for entry in self.journal[seq - self.base :]:
            paths |= entry
        return paths

    def _past_grace(self, snap: Snap, now: float) -> bool:
        return snap.retired_at is None or now - snap.retired_at >= self.grace

    def take_spare(self, now: float) -> tuple[Snap, set[str]] | None:
        """The oldest spare no reader can be in, and the paths it lacks; it leaves the spares."""
        if self.live is None:
            return None  # spares are only known relative to a live snapshot of ours
        ready = [s for s in self.spares if self._past_grace(s, now)]
        if ready:
            spare = ready[0]
        else:  # a burst: the oldest one past the shorter grace, if any
            ready_at = self.spare_ready_at()
            if ready_at is None or now < ready_at:
                return None
            spare = self.spares[0]
        self.spares.remove(spare)
        return spare, self.changed_since(spare.seq)

    def spare_ready_at(self) -> float | None:
        """When the oldest spare's shorter grace ends (the same sum ``take_spare`` tests,
        so that a wait until then is never refused by a float's last bit)."""
        if not self.spares:
            return None
        retired_at = self.spares[0].retired_at
        return retired_at + self.min_grace if retired_at is not None else float("-inf")

    def short(self, now: float) -> None:
        """A change found no spare ready: keep one more than now, up to ``most_spares``
        (not one more per change: the one being made may be all this rate needs)."""
        self.short_at = now
        if self.growing is None:
            self.wanted = min(self.most_spares, max(self.wanted, len(self.spares) + 1))

    def to_grow(self) -> bool:
        """Whether a spare should be made now (and none is being made). A change takes a
        spare and retires the live one: only a copy or this adds one to the rotation."""
        if self.live is None or self.growing is not None or self.grow_failed:
            return False
        return len(self.spares) < self.wanted

    def grown(self, spare: Snap) -> None:
        """The spare being made is complete."""
        self.growing = None
        self.spares.append(spare)

    def published(self, name: str, revision: int, changed: Collection[str], now: float) -> None:
        """``name`` is live now; ``changed`` are the paths it differs in from the one before."""
        old = self.live
        self.previous = old if old is not None else self.adopted
        if old is not None:
            old.retired_at = now
            self.spares.append(old)
        else:  # the first snapshot of this process: nothing before it is ours to reuse
            for spare in self.spares:
                self.doomed[spare.name] = now + self.grace
            self.spares = []
            if self.adopted is not None:
                self.doomed[self.adopted] = now + self.grace
                self.adopted = None
        self.journal.append(frozenset(changed) if old is not None else frozenset())
        self.live = Snap(name, self.seq, revision)
        self.live_since = now
        self.dirty = set()
        self.grow_failed = False

    def failed(self, paths: Collection[str]) -> None:
        """These paths are not live as the key tree has them: rewrite them next time."""
        self.dirty |= set(paths)

    def rolled_back(self, now: float) -> tuple[str, Collection[str] | None]:
        """The last publish is undone; (the name live again, the paths that changed back:
        None when the previous process's snapshot, whose files are not tracked, is back)."""
        previous, rejected = self.previous, self.live
        if previous is None or rejected is None:
            raise ValueError("no previous snapshot to go back to")
        self.previous = None
        rejected.retired_at = now
        if isinstance(previous, str):
            self.adopted, self.live = previous, None
            self.doomed.pop(previous, None)
            self.doomed[rejected.name] = now + self.grace
            if self.growing is not None:  # made from ours, not from what is live now
                self.doom(self.growing.name, now)
            return previous, None
        paths = self.journal[-1]  # (trimmed away only when what is back is not ours)
        self.journal.append(paths)  # the way back touches the same paths
        self.spares.remove(previous)
        self.spares.append(rejected)
        self.live = Snap(previous.name, self.seq, previous.revision)
        self.dirty |= paths
        return previous.name, paths

    def settle(self) -> None:
        """The last publish stays: nothing to roll back to any more."""
        self.previous = None

    def housekeeping(self, now: float) -> Housekeeping:
        """What may be done now (nothing a reader could still be in, nothing rollback needs)."""
        due = Housekeeping()
        protected = self.previous if isinstance(self.previous, Snap) else None
        for name, when in list(self.doomed.items()):
            if when <= now and name != self.previous:
                due.delete.append(name)
                del self.doomed[name]
        if self.short_at is not None and now - self.short_at >= BURST_MEMORY:
            self.wanted, self.short_at = self.max_spares, None  # the bursts are over
        ready = [s for s in self.spares if self._past_grace(s, now) and s is not protected]
        quiet = self.live is None or now - (self.live_since or 0.0) >= self.grace
        excess = len(self.spares) - self.wanted if quiet else 0  # a burst keeps them
        for spare in ready[: max(0, excess)]:  # oldest first
            self.spares.remove(spare)
            due.delete.append(spare.name)
        if self.live is not None:
            for spare in self.spares:
                ready_now = self._past_grace(spare, now) and spare is not protected
                if ready_now and spare.seq != self.live.seq:
                    due.catch_up.append((spare, self.changed_since(spare.seq)))
        due.next_due = self.next_due(now)
        return due

    def next_due(self, now: float) -> float | None:
        """When housekeeping is next due: a spare's grace ends, a doomed directory's time
        comes, a burst is over (monotonic); None if nothing waits."""
        quiet = self.live is None or now - (self.live_since or 0.0) >= self.grace
        # The same tests as housekeeping() (no float gap at the edge).
        waits = [
            s.retired_at + self.grace
            for s in self.spares
            if s.retired_at is not None and not self._past_grace(s, now)
        ]
        waits += list(self.doomed.values())
        # A grace (or the burst) may have ended while the run that asks was busy: what it
        # made due then is due now, or it would wait for the next change (old values kept).
        protected = self.previous if isinstance(self.previous, Snap) else None
        ready = [s for s in self.spares if self._past_grace(s, now) and s is not protected]
        if self.live is not None and any(s.seq != self.live.seq for s in ready):
            waits.append(now)  # a spare to bring up to date
        if not quiet and len(self.spares) > self.wanted and self.live_since is not None:
            waits.append(self.live_since + self.grace)  # the burst's extra spares go then
        if self.short_at is not None and self.wanted > self.max_spares:
            waits.append(self.short_at + BURST_MEMORY)  # the rotation shrinks back then
        if self.to_grow() or self.growing is not None:
            waits.append(now)  # a spare to make (a step at a time)
        # (Once quiet, an extra spare is either past its grace and behind, so due now by
        # the rule above, or still in its grace, so due when it ends.)
        return max(min(waits), now + 1e-3) if waits else None

    def doom(self, name: str, when: float) -> None:
        """Delete the directory ``name`` from ``when`` on (it is no spare any more)."""
        self.spares = [s for s in self.spares if s.name != name]
        if self.growing is not None and self.growing.name == name:
            self.growing = None
        self.doomed[name] = when

    def caught_up(self, spare: Snap) -> None:
        """``spare`` holds the live content now."""
        assert self.live is not None
        spare.seq = self.live.seq

    def add_spare(self, spare: Snap) -> None:
        self.spares.append(spare)

    def trim(self) -> None:
        """Forget journal entries that no directory needs any more."""
        seqs = [s.seq for s in self.spares]
        if self.growing is not None:
            seqs.append(self.growing.seq)
        if self.live is not None:
            seqs.append(self.live.seq)
        if isinstance(self.previous, Snap):
            seqs.append(self.previous.seq)
        keep_from = min(seqs, default=self.seq)
        del self.journal[: keep_from - self.base]
        self.base = keep_from

    def names(self) -> list[str]:
        """Every snapshot directory this ledger knows of: live, spares, doomed."""
        live = [self.live.name] if self.live else [self.adopted] if self.adopted else []
        growing = [self.growing.name] if self.growing is not None else []
        return live + [s.name for s in self.spares] + growing + list(self.doomed)
