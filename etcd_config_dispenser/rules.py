"""The operator's glob rules: which keys to take (--include/--exclude) and which mode
and owner a file gets (--file-mode). Pure, no I/O.

Globs are matched against the key relative to the prefix, with Python's
``fnmatch`` (case-sensitive): ``*`` and ``?`` match "/" too, so
``--exclude='*-account'`` leaves that name out at any depth, and
``--include='www/*'`` takes everything under ``www``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class KeySelection:
    """A key is taken if it matches no --exclude and, when there is any --include,
    at least one --include: excluding wins, whatever the order of the flags (as
    rsync's filters do not, and confd's and consul-template's key lists need not)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def takes(self, rel: str) -> bool:
        if any(fnmatchcase(rel, glob) for glob in self.exclude):
            return False
        return not self.include or any(fnmatchcase(rel, glob) for glob in self.include)

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)


@dataclass(frozen=True)
class FileRule:
    """--file-mode=GLOB=MODE[:USER[:GROUP]]: -1 for an owner or group not given."""

    glob: str
    mode: int
    uid: int = -1
    gid: int = -1


@dataclass(frozen=True)
class FileAttributes:
    """Mode and owner of each file: the first --file-mode rule that matches, else the
    defaults (--mode, --owner, --group). Directories always follow the defaults."""

    mode: int = 0o600
    uid: int = -1
    gid: int = -1
    rules: tuple[FileRule, ...] = ()

    def of(self, rel: str) -> tuple[int, int, int]:
        for rule in self.rules:
            if fnmatchcase(rel, rule.glob):
                uid = self.uid if rule.uid == -1 else rule.uid
                gid = self.gid if rule.gid == -1 else rule.gid
                return rule.mode, uid, gid
        return self.mode, self.uid, self.gid
