"""The user-visible links: ``NAME -> ..data/NAME``, one per top-level name of the live snapshot.

Kept apart from the snapshot writer: it is bookkeeping of which names the
live snapshot has (in memory, O(changed paths) per change) and the few
symlinks that follow from it (on disk, after the flip).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

from .fsops import remove
from .keys import top_level

log = logging.getLogger(__name__)

DATA_LINK = "..data"
TMP_TOP_LINK = "..link_tmp"


class TopLinks:
    """The live snapshot's files, counted by top-level name, and the links for those names."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.live_paths: set[str] = set()  # every file of the live snapshot
        self._counts: Counter[str] = Counter()  # files per top-level name
        self._links: set[str] = set()  # links that exist on disk
        self._dirty = False  # a link operation failed: reconcile every name next time

    def adopt(self, name: str) -> None:
        """A link left by a previous process, found at start-up."""
        self._links.add(name)

    def update(
        self, files: Mapping[str, bytes], changed: Collection[str] | None, when: str
    ) -> None:
        """``files`` is live now (``changed``: the paths that differ; None: any).

        The memory is always updated; a failing link operation is logged and
        mended at the next update, since the snapshot itself is live already.
        """
        affected = self._track(files, changed)
        if self._dirty:
            affected |= self._counts.keys() | self._links
        try:
            self._sync(affected)
            self._dirty = False
        except OSError as err:
            self._dirty = True
            log.warning("%s: could not update the top-level links: %s", when, err)

    def _track(self, files: Mapping[str, bytes], changed: Collection[str] | None) -> set[str]:
        """Update the live paths and per-name counts (memory only); the top names affected."""
        if changed is None:
            self.live_paths = set(files)
            self._counts = Counter(top_level(p) for p in self.live_paths)
            return set(self._counts) | self._links
        affected = set()
        for rel in changed:
            was, now = rel in self.live_paths, rel in files
            if was == now:
                continue
            top = top_level(rel)
            affected.add(top)
            if now:
                self.live_paths.add(rel)
                self._counts[top] += 1
            else:
                self.live_paths.discard(rel)
                self._counts[top] -= 1
        return affected

    def _sync(self, affected: set[str]) -> None:
        """Keep one ``name -> ..data/name`` link per top-level name that has files."""
        for top in affected:
            link = self.target / top
            if self._counts[top] > 0 and top not in self._links:
                try:
                    os.symlink(f"{DATA_LINK}/{top}", link)
                except FileExistsError:  # a dangling one of ours: replace it atomically
                    tmp = self.target / TMP_TOP_LINK
                    remove(tmp)
                    os.symlink(f"{DATA_LINK}/{top}", tmp)
                    os.replace(tmp, link)
                self._links.add(top)
            elif self._counts[top] <= 0:
                self._counts.pop(top, None)
                if top in self._links:
                    remove(link)
                    self._links.discard(top)
