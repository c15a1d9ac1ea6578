"""Key -> path rules: which etcd keys become which files, and which are refused.

Pure functions and data: everything that decides whether a key may touch
the disk lives here, so that it can be tested as a table. The one I/O is
the values' (``values``): the key tree reads a spooled value when asked for
it, and ``KeyTree.spill`` moves values to a spool.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable

from .layout import RESERVED_PREFIX
from .values import Spool, Spooled, SpoolError, Value, ValueView, as_bytes, same

MAX_NAME = 255  # bytes in one path segment (NAME_MAX on Linux filesystems)
MAX_PATH = 4096  # bytes in a whole path (PATH_MAX)
# Directories deep: far beyond any configuration, and it keeps every walk of a
# snapshot (ours, and the standard library's) cheap and far from any limit.
MAX_DEPTH = 64
SPILL_PAGE = 256  # values read back and spooled at a time when every one moves


class InvalidKey(ValueError):
    """A key that must not become a file. The message says which rule it broke."""


def normalise_prefix(prefix: str) -> bytes:
    """The prefix as etcd bytes, ending in exactly one "/" (as the Go original does)."""
    return prefix.rstrip("/").encode("utf-8", "surrogateescape") + b"/"  # any bytes argv had


def key_to_relpath(key: bytes, prefix: bytes, max_path: int = MAX_PATH) -> str:
    """Map an etcd key to a path relative to the target directory.

    The key relative to the prefix is the path: ``a/b/c`` makes directories
    ``a`` and ``b``. A relative key may not:

    1. be empty or end in "/";
    2. be absolute (start with "/" after the prefix), or contain an empty
       segment ("a//b"): refused rather than normalised, so that two keys can
       never name the same file;
    3. have a segment that is "." or "..";
    4. start with ".." (reserved for ``..data`` and the snapshot directories,
       as in Kubernetes' validatePath);
    5. contain a NUL byte;
    6. be invalid UTF-8 (names are shown to people and written into configs;
       Linux would take any bytes, but a name nobody can type is a mistake);
    7. have a segment longer than MAX_NAME bytes, or be longer than
       ``max_path`` bytes (the caller lowers it by the length of the target
       and snapshot directory names, so the full path still fits PATH_MAX);
    8. have more than MAX_DEPTH segments;
    9. contain a control character (a newline, a tab, ESC...): such a name
       breaks every list of names (--on-change's DISPENSER_WRITTEN, a shell's
       ``for f in $(ls)``) and nobody types one on purpose.
    """
    if not key.startswith(prefix):
        raise InvalidKey("is not under the prefix")
    rel = key[len(prefix) :]
    if not rel:
        raise InvalidKey("is empty after the prefix")
    if b"\0" in rel:
        raise InvalidKey("contains a NUL byte")
    if rel.startswith(b"/"):
        raise InvalidKey("is absolute after the prefix")
    if rel.endswith(b"/"):
        raise InvalidKey("ends in '/'")
    if len(rel) > max_path:
        raise InvalidKey(f"is longer than {max_path} bytes")
    try:
        text = rel.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidKey("is not valid UTF-8") from None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise InvalidKey("contains a control character")
    segments = text.split("/")
    if len(segments) > MAX_DEPTH:
        raise InvalidKey(f"is more than {MAX_DEPTH} directories deep")
    for segment in segments:
        if segment == "":
            raise InvalidKey("has an empty segment ('//')")
        if segment in (".", ".."):
            raise InvalidKey(f"has a '{segment}' segment")
        if len(segment.encode("utf-8")) > MAX_NAME:
            raise InvalidKey(f"has a segment longer than {MAX_NAME} bytes")
    if segments[0].startswith(RESERVED_PREFIX):
        raise InvalidKey(f"starts with '{RESERVED_PREFIX}', which is reserved")
    return text


def show(key: bytes | str) -> str:
    """A key or path for a log line, quoted one way everywhere: control characters
    escaped, so a key can never forge a log line; bytes that are not UTF-8 escaped."""
    text = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key
    return repr(text)


def top_level(path: str) -> str:
    """The first segment: the name of the user-visible symlink in the target (the path
    itself, not a copy, when it has one segment: 70 bytes a key in a flat layout)."""
    return path.partition("/")[0] if "/" in path else path


def ancestors(path: str) -> Iterable[str]:
    """'a/b/c' -> 'a', 'a/b'."""
    index = path.find("/")
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)


class KeyTree:
    """Every valid key under the prefix, and which of them are files on disk.

    A file/directory clash (keys ``a`` and ``a/b`` both exist) cannot be
    written: ``a`` cannot be a file and a directory at once. The shallower
    key wins: while ``a`` exists, ``a/b`` is kept here but not written, with a
    warning; when ``a`` is deleted, ``a/b`` appears. The rule depends only on
    the set of keys, never on the order of events, so a restart or a resync
    gives the same files.

    Updates cost O(depth + affected keys), not O(all keys): a one-key change
    at 10,000 keys must cost about what it costs at 100. Values are bytes or
    spooled (``values``): compared by digest, read only when asked for.
    """

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}  # every valid key
        self._files: dict[str, Value] = {}  # the visible ones
        self._sorted: list[str] = []
        self.held = 0  # bytes of the values held in memory (not spooled)
        self._held_paths: set[str] = set()  # the keys whose value is held in memory
        self._spools: dict[Spool, list[int]] = {}  # spool -> [values, bytes] current in it
        self.unreadable: set[str] = set()  # paths whose spooled value could not be read

    def _set(self, path: str, value: Value) -> None:
        self._count(self.values.get(path), -1)
        self._count(value, 1)
        self.values[path] = value
        if isinstance(value, bytes):
            self._held_paths.add(path)
        else:
            self._held_paths.discard(path)

    def _count(self, value: Value | None, sign: int) -> None:
        """Keep ``held`` and the use of each spool (no scan of every key to know them)."""
        if isinstance(value, bytes):
            self.held += sign * len(value)
        elif value is not None:
            use = self._spools.setdefault(value.spool, [0, 0])
            use[0] += sign
            use[1] += sign * value.size
            if not use[0]:
                del self._spools[value.spool]

    def spill(self, spool: Spool, drain: Collection[Spool] = ()) -> None:
        """Move the values held in memory, and those in the spools ``drain``, to ``spool``
        (read back a page at a time; one that cannot be stays, noted ``unreadable``).
        Raises OSError: then nothing moved."""
        paths = list(self._held_paths)
        if drain:  # a scan of every key: only when spools are drained (rarely)
            paths += [
                p for p, v in self.values.items() if isinstance(v, Spooled) and v.spool in drain
            ]
        moved: list[tuple[str, Spooled]] = []
        for start in range(0, len(paths), SPILL_PAGE):
            page = []
            for path in paths[start : start + SPILL_PAGE]:
                try:
                    page.append((path, as_bytes(self.values[path])))
                except SpoolError:
                    self.unreadable.add(path)
            refs = spool.add([value for _path, value in page])
            moved += zip([path for path, _value in page], refs, strict=True)
        for path, ref in moved:
            self._set(path, ref)
            if path in self._files:
                self._files[path] = ref

    def spool_use(self) -> dict[Spool, int]:
        """The spools the values are in, with the bytes of the values current in each."""
        return {spool: use[1] for spool, use in self._spools.items()}

    @property
    def files(self) -> ValueView:
        """The visible keys' values, by path (spooled ones read when asked for)."""
        return ValueView(self._files, self.unreadable)

    def differs(self, other: KeyTree) -> set[str]:
        """The file paths whose content or presence differs between two trees."""
        old, new = self._files, other._files
        return {p for p in old.keys() | new.keys() if not same(old.get(p), new.get(p))}

    def shadowing_key(self, path: str) -> str | None:
        """The shallower key that hides ``path``, if any."""
        for ancestor in ancestors(path):
            if ancestor in self.values:
                return ancestor
        return None

    def _descendants(self, path: str) -> list[str]:
        # "/" sorts just before "0", so every "path/..." key sits in one run.
        start = bisect.bisect_left(self._sorted, path + "/")
        end = bisect.bisect_left(self._sorted, path + "0")
        return self._sorted[start:end]

    def put(self, path: str, value: Value) -> set[str]:
        """Set a key; return the file paths whose content or presence changed."""
        if path in self.values:
            if same(self.values[path], value):
                return set()  # and the value kept as it is (spooled, perhaps)
            self._set(path, value)
            if path in self._files:
                self._files[path] = value
                return {path}
            return set()
        bisect.insort(self._sorted, path)
        self._set(path, value)
        if self.shadowing_key(path) is not None:
            return set()
        self._files[path] = value
        changed = {path}
        for descendant in self._descendants(path):
            if self._files.pop(descendant, None) is not None:
                changed.add(descendant)
        return changed

    def delete(self, path: str) -> set[str]:
        """Remove a key; return the file paths whose content or presence changed."""
        if path not in self.values:
            return set()
        self._count(self.values.pop(path), -1)
        self._held_paths.discard(path)
        del self._sorted[bisect.bisect_left(self._sorted, path)]
        if self._files.pop(path, None) is None:
            return set()
        changed = {path}
        for descendant in self._descendants(path):
            if self.shadowing_key(descendant) is None:
                self._files[descendant] = self.values[descendant]
                changed.add(descendant)
        return changed

    def hidden(self) -> list[tuple[str, str]]:
        """(key path, shadowing key path) for every key not written because of a clash."""
        return [
            (path, shadow)
            for path in self.values
            if path not in self._files and (shadow := self.shadowing_key(path)) is not None
        ]
