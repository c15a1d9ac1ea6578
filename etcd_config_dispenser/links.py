"""The user-visible links: ``NAME -> ..data/NAME``, one per top-level name of the live snapshot.

Kept apart from the snapshot writer: it is bookkeeping of which names the
live snapshot has (in memory, O(changed paths) per change) and the few
symlinks that follow from it (on disk, after the flip).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable, Mapping

from .fsops import lstat_at
from .keys import ancestors, top_level
from .layout import top_link_text

log = logging.getLogger(__name__)


def _is_our_link(target_fd: int, name: str) -> bool:
    try:
        return os.readlink(name, dir_fd=target_fd) == top_link_text(name)
    except OSError:  # not a link, or gone
        return False


class TopLinks:
    """The live snapshot's files and directories, and the links for its top-level names."""

    def __init__(self) -> None:
        self.live_paths: set[str] = set()  # every file of the live snapshot
        self.dirs: Counter[str] = Counter()  # its directories, with the files below each
        self._links: set[str] = set()  # links that exist on disk
        self._dirty = False  # a link operation failed: reconcile every name next time

    def dirs_with(self, paths: Iterable[str]) -> set[str]:
        """The live snapshot's directories and those above ``paths``: the directories a
        snapshot may hold that differs from the live one in ``paths`` (one whose last
        key was deleted since still holds that key's directory, and must be stamped)."""
        return set(self.dirs) | {d for p in paths for d in ancestors(p)}

    def adopt(self, links: Iterable[str], live_paths: Iterable[str]) -> None:
        """What a previous process left: its links and its live snapshot's files."""
        self._links = set(links)
        self._reset(set(live_paths))

    def update(self, target_fd: int, present: Mapping[str, bool], reset: bool, when: str) -> None:
        """The live snapshot changed: ``present`` says, for each path that may have changed,
        whether it is a file now (``reset``: every other path is gone).

        The memory is always updated; a failing link operation is logged and
        mended at the next update, since the snapshot itself is live already.
        """
        affected = self._track(present, reset)
        if self._dirty:
            affected |= self._tops() | self._links
        try:
            self._sync(target_fd, affected)
            self._dirty = False
        except OSError as err:
            self._dirty = True
            log.warning("%s: could not update the top-level links: %s", when, err)

    def _track(self, present: Mapping[str, bool], reset: bool) -> set[str]:
        """Update the live paths and directory counts (memory only); the top names affected."""
        if reset:
            self._reset({p for p, there in present.items() if there})
            return self._tops() | self._links
        affected = set()
        for rel, now in present.items():
            if (rel in self.live_paths) == now:
                continue
            affected.add(top_level(rel))
            step = 1 if now else -1
            if now:
                self.live_paths.add(rel)
            else:
                self.live_paths.discard(rel)
            for directory in ancestors(rel):
                self.dirs[directory] += step
                if not self.dirs[directory]:
                    del self.dirs[directory]
        return affected

    def _reset(self, live_paths: set[str]) -> None:
        self.live_paths = live_paths
        self.dirs = Counter(d for p in live_paths for d in ancestors(p))

    def _tops(self) -> set[str]:
        """The top-level names that have files (every one: only after a reset or a failure)."""
        return {top_level(p) for p in self.live_paths}

    def _has_files(self, top: str) -> bool:
        """Whether the live snapshot has files under this top-level name: a file of that
        name, or a directory (with files below it: ``dirs`` counts them). Not a count per
        name besides: in a flat layout that is one more map entry per key."""
        return top in self.live_paths or top in self.dirs

    def _sync(self, target_fd: int, affected: set[str]) -> None:
        """Keep one ``name -> ..data/name`` link per top-level name that has files."""
        for top in affected:
            has_files = self._has_files(top)
            if has_files and top not in self._links:
                try:
                    os.symlink(top_link_text(top), top, dir_fd=target_fd)
                except FileExistsError:
                    if not _is_our_link(target_fd, top):  # somebody's: never replaced
                        log.warning("%r in the target is not ours: its key is not shown", top)
                        continue
                self._links.add(top)
            elif not has_files and top in self._links:
                st = lstat_at(target_fd, top)
                if st is not None and stat.S_ISLNK(st.st_mode):  # never someone's dir
                    os.unlink(top, dir_fd=target_fd)
                self._links.discard(top)
