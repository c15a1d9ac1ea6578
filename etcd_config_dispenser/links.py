"""The user-visible links: ``NAME -> ..data/NAME``, one per top-level name of the live snapshot.

Kept apart from the snapshot writer: it is bookkeeping of which names the
live snapshot has (in memory, O(changed paths) per change) and the few
symlinks that follow from it (on disk, after the flip).
"""

from __future__ import annotations

import itertools
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

    def update(self, target_fd: int, present: Mapping[str, bool], when: str) -> None:
        """The live snapshot changed: ``present`` says, for each path that may have changed,
        whether it is a file now.

        The memory is always updated; a failing link operation is logged and
        mended at the next update, since the snapshot itself is live already.
        """
        self._apply(target_fd, self._track(present), when)

    def reset(self, target_fd: int, live_paths: set[str], when: str) -> None:
        """The live snapshot's files are ``live_paths`` (kept, not copied), and only those:
        a first snapshot, or a previous run's put back. As ``update`` otherwise."""
        self._reset(live_paths)
        self._apply(target_fd, self._every_name(), when)

    def _apply(self, target_fd: int, affected: Iterable[str], when: str) -> None:
        if self._dirty:  # every name: those in ``affected`` have files or a link, or need none
            affected = self._every_name()
        try:
            self._sync(target_fd, affected)
            self._dirty = False
        except OSError as err:
            self._dirty = True
            log.warning("%s: could not update the top-level links: %s", when, err)

    def _track(self, present: Mapping[str, bool]) -> set[str]:
        """Update the live paths and directory counts (memory only); the top names affected."""
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

    def _every_name(self) -> Iterable[str]:
        """Every top-level name that has files or a link (after a reset or a failure): the
        files at the top, each directory at the top once, then the links (a name among
        them again changes nothing). Not one set of them all: in a flat layout, that is
        2 MiB at 50,000 keys at the moment the process is largest."""
        directories = {top_level(p) for p in self.live_paths if "/" in p}
        files = (p for p in self.live_paths if "/" not in p)
        return itertools.chain(files, directories, list(self._links))

    def _has_files(self, top: str) -> bool:
        """Whether the live snapshot has files under this top-level name: a file of that
        name, or a directory (with files below it: ``dirs`` counts them). Not a count per
        name besides: in a flat layout that is one more map entry per key."""
        return top in self.live_paths or top in self.dirs

    def _sync(self, target_fd: int, affected: Iterable[str]) -> None:
        """Keep one ``name -> ..data/name`` link per top-level name that has files (each
        name in ``affected`` looked at, once or more: the second time changes nothing)."""
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
