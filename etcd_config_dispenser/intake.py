"""Key rules applied to what etcd says: the key tree the snapshots are made from.

The second step of the flow (etcd events -> key rules -> snapshot -> signal):
plain data in and out, so it is tested without etcd; its one I/O is spooling
values held in memory (``spill``, see ``values``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .events import Batch, FullRead
from .keys import InvalidKey, KeyTree, key_to_relpath, show
from .logs import fields
from .rules import KeySelection
from .values import Spool, Value, open_spool

log = logging.getLogger(__name__)

# Bytes of values from watch responses held in memory before they are spooled:
# a few changes' worth, so that the next change rarely reads back its neighbours.
SPILL_BYTES = 1 << 20
MAX_SPOOLS = 16  # files of values open at once, before they are made one
MOVE_PAGE = 32  # values a spill moves a step (read back, written: about 0.2 ms)
SCAN_KEYS = 4096  # keys a spill looks at a step for values in the spools it drains


@dataclass
class _Spill:
    """A spill in progress: the spool it fills, the spools it empties, what is left."""

    spool: Spool
    drain: set[Spool]
    held: int  # bytes held in memory when it began (see ``KeyIntake._failed_at``)
    pending: list[str]  # keys whose value is to move (if it is still held or in ``drain``)
    after: str | None  # the last key looked at for values in ``drain``; None: no more


class KeyIntake:
    """Applies full reads and watch batches to a KeyTree under the key rules."""

    def __init__(
        self,
        prefix: bytes,
        max_path: int,
        selection: KeySelection | None = None,
        spool_at: int | None = None,
    ) -> None:
        self.prefix = prefix
        self.max_path = max_path
        self.selection = selection or KeySelection()  # --include/--exclude
        self.spool_at = spool_at  # the open directory values spill to (``spill``)
        self._failed_at: int | None = None  # ``held`` when a spill last failed
        self._spill_failed = False  # a spill failed once (said once, in the log)
        self._spilling: _Spill | None = None  # a spill in progress (see ``spill``)
        self._repair: set[str] = set()  # lost values: changed at the next full read
        self.spill_bytes = SPILL_BYTES
        self.tree = KeyTree()
        self._invalid: set[bytes] = set()  # keys in etcd now that the key rules refuse

    def _relpath(self, key: bytes, revision: int, deleted: bool = False) -> str | None:
        """The key's path, or None (and, unless it was deleted, a warning) if refused.

        A key left out by --include/--exclude is not looked at at all: neither
        written nor warned about, whatever its name."""
        if self.selection and key.startswith(self.prefix):
            rel = key[len(self.prefix) :].decode("utf-8", "surrogateescape")
            if not self.selection.takes(rel):
                return None
        try:
            path = key_to_relpath(key, self.prefix, self.max_path)
        except InvalidKey as err:
            if deleted:
                self._invalid.discard(key)
            else:
                self._invalid.add(key)
                log.warning(
                    "r%d: skipping key %s: it %s",
                    revision,
                    show(key),
                    err,
                    extra=fields("key_skipped", revision=revision, error=err),
                )
            return None
        return path

    def absorb(self, event: FullRead | Batch) -> set[str]:
        """Apply an event to the key tree; return the file paths it changed."""
        if isinstance(event, FullRead):
            return self._resync(event.revision, event.kvs)
        changed: set[str] = set()
        for change in event.changes:
            path = self._relpath(change.key, event.revision, deleted=change.value is None)
            if path is None:
                continue
            if change.value is None:
                changed |= self.tree.delete(path)
            else:
                changed |= self.tree.put(path, change.value)
                shadow = self.tree.shadowing_key(path)
                if shadow is not None:
                    log.warning(
                        "r%d: skipping key %s: %s is a file",
                        event.revision,
                        show(path),
                        show(shadow),
                        extra=fields("key_skipped", revision=event.revision),
                    )
        return changed

    def _resync(self, revision: int, kvs: Iterable[tuple[bytes, Value]]) -> set[str]:
        """Replace the whole key tree with a full read; the paths that differ."""
        tree = KeyTree()
        self._invalid = set()
        for key, value in kvs:
            path = self._relpath(key, revision)
            if path is not None:
                tree.put(path, value)
        for path, shadow in tree.hidden():
            log.warning(
                "r%d: skipping key %s: %s is a file",
                revision,
                show(path),
                show(shadow),
                extra=fields("key_skipped", revision=revision),
            )
        old, self.tree = self.tree, tree
        self._failed_at = None  # a new spool, perhaps a disk with room again
        self._spilling = None  # its keys were the old tree's
        repaired, self._repair = self._repair, set()
        return old.differs(tree) | repaired

    def spill(self) -> bool:
        """Spool the values held in memory once they pass SPILL_BYTES: values from watch
        responses add up (every certificate renewed once), and memory must grow with
        the number of keys, not their size (see ``values``). One spool per spill; each
        goes with its last value. Where there can be no spool, they stay in memory.

        A spool stays whole while any value in it is current: a key that never
        changes again pins a spool of others' old values, and a full read's spool
        holds the values of keys the rules leave out, and of keys deleted since.
        So the spools more than half stale are drained into the new one (which
        costs less than the stale bytes it frees), and past MAX_SPOOLS files the
        least used half too: the spools never hold much more than twice the
        current values. A spill that failed is not tried again before as much
        more is held, or the next full read.

        A step at a time, like a spare: MOVE_PAGE values moved, or SCAN_KEYS keys
        looked at for values in the drained spools, a call (about 0.2 ms), so that
        a change never waits for a whole drain (60 ms at 10,000 keys of 1 KiB).
        A spill moves the values held when it began; those that come meanwhile
        wait for the next one. Returns whether more is left to do: the caller
        calls again soon.
        """
        job = self._spilling
        if job is None:
            job = self._spilling = self._begin()
            if job is None:
                return False
        if job.pending:
            page = job.pending[-MOVE_PAGE:]
            del job.pending[-MOVE_PAGE:]
            try:
                self.tree.move(job.spool, page, job.drain)
            except OSError as err:  # a full disk: what is left stays where it is for now
                self._spilling = None
                self._failed(job.held, err)
                return False
        elif job.after is not None:
            job.pending, job.after = self.tree.in_spools(job.drain, job.after, SCAN_KEYS)
        if not job.pending and job.after is None:
            self._spilling, self._failed_at = None, None
        return self._spilling is not None

    def _begin(self) -> _Spill | None:
        """A spill, if one is due: enough held in memory, or spools to drain."""
        held = self.tree.held
        if self._failed_at is not None and held < self._failed_at + self.spill_bytes:
            return None  # failed lately: not again at each step (a full disk)
        drain = self._to_drain()
        if held < self.spill_bytes and not drain:
            return None
        spool = open_spool(self.spool_at)
        if spool is None:  # no O_TMPFILE, or no room: they stay in memory for now
            self._failed(held, OSError("no spool can be made in the target"))
            return None
        return _Spill(spool, drain, held, self.tree.held_paths(), "" if drain else None)

    def _failed(self, held: int, err: OSError) -> None:
        self._failed_at = held
        log_once = log.warning if not self._spill_failed else log.debug
        log_once("could not spool values: %s; they stay in memory for now", err)
        self._spill_failed = True

    def _to_drain(self) -> set[Spool]:
        """The spools to empty into the next one (see ``spill``)."""
        use = self.tree.spool_use()
        drain = {spool for spool, current in use.items() if 2 * current < spool.size}
        if len(use) - len(drain) >= MAX_SPOOLS:  # too many files: the least used half
            rest = sorted((s for s in use if s not in drain), key=use.__getitem__)
            drain.update(rest[: len(rest) // 2 + 1])
        return drain

    def lost(self) -> bool:
        """Whether a value could not be read back from its spool since last asked (logged:
        the caller asks etcd for everything again; until then the key is not written,
        and what was made of it, its expiry, its digest, is made again after)."""
        if not self.tree.unreadable:
            return False
        lost = sorted(self.tree.unreadable)
        self._repair |= self.tree.unreadable
        self.tree.unreadable.clear()
        log.error("cannot read back the value of %s: reading everything again", show(lost[0]))
        return True

    @property
    def skipped(self) -> int:
        """Keys not written now: refused by the key rules, or shadowed by a file."""
        return len(self._invalid) + len(self.tree.values) - len(self.tree.files)
