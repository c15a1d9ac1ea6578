"""Key -> path rules: which etcd keys become which files, and which are refused.

Pure functions and data: everything that decides whether a key may touch
the disk lives here, so that it can be tested as a table. The one I/O is
the values' (``values``): the key tree reads a spooled value when asked for
it, and ``KeyTree.move`` moves values to a spool.
"""

from __future__ import annotations

import array
import bisect
import re
from collections.abc import Collection, Iterable, Iterator, Mapping

from .layout import RESERVED_PREFIX
from .values import Spool, Spooled, SpoolError, Value, ValueView, as_bytes, same

MAX_NAME = 255  # bytes in one path segment (NAME_MAX on Linux filesystems)
MAX_PATH = 4096  # bytes in a whole path (PATH_MAX)
# Directories deep: far beyond any configuration, and it keeps every walk of a
# snapshot (ours, and the standard library's) cheap and far from any limit.
MAX_DEPTH = 64
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: one search, not a loop a char
# Where a key's value is (KeyTree._refs): HELD in memory, or a spool's slot and
# the value's index in that spool, in one 64-bit integer.
HELD = -1
SLOT_SHIFT = 40  # 2**40 values in one spool; 2**23 spools
INDEX_MASK = (1 << SLOT_SHIFT) - 1


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
    if CONTROL.search(text):
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

    Updates cost O(depth + affected keys) lookups, not O(all keys): a one-key
    change at 10,000 keys must cost about what it costs at 100. Values are
    bytes or spooled (``values``): compared by digest, read only when asked for.

    Kept compact, since it is the one structure with an entry per key: the
    paths in one sorted list, and where each one's value is in an array beside
    it (a spool's slot and the value's index in it, or HELD for a value in
    memory): about 80 bytes a key with its path, where maps of paths to value
    objects cost about 240. Lookups are binary searches (a microsecond or two
    at 50,000 keys); inserting a new key moves the array's tail, in C.
    """

    def __init__(self) -> None:
        self._paths: list[str] = []  # every valid key, sorted
        self._refs = array.array("q")  # where the value of each of _paths is (see _ref)
        self._held: dict[str, bytes] = {}  # the values held in memory (ref HELD)
        self.held = 0  # their bytes
        self._slots: list[Spool | None] = []  # the spools the values are in, by slot
        self._use: list[list[int]] = []  # by slot: [values, bytes] current in it
        self._last_slot = 0  # the slot a value was last taken into
        self._hidden: set[str] = set()  # keys not written: a shallower key is a file
        self.unreadable: set[str] = set()  # paths whose spooled value could not be read

    def _find(self, path: str) -> int:
        """The index of ``path`` in _paths, or -1."""
        index = bisect.bisect_left(self._paths, path)
        return index if index < len(self._paths) and self._paths[index] == path else -1

    def _value(self, index: int) -> Value:
        ref = self._refs[index]
        if ref == HELD:
            return self._held[self._paths[index]]
        spool = self._slots[ref >> SLOT_SHIFT]
        assert spool is not None  # a slot is freed only with its last value
        return Spooled(spool, ref & INDEX_MASK)

    def _ref(self, path: str, value: Value) -> int:
        """Take ``value`` in (counted where it is kept); the ref that says where it is."""
        if isinstance(value, bytes):
            self._held[path] = value
            self.held += len(value)
            return HELD
        spool = value.spool
        slot = self._last_slot  # a full read's values are all in one spool: look there first
        if slot >= len(self._slots) or self._slots[slot] is not spool:
            slot = next((i for i, s in enumerate(self._slots) if s is spool), -1)
        if slot < 0:
            slot = next((i for i, s in enumerate(self._slots) if s is None), len(self._slots))
            if slot == len(self._slots):
                self._slots.append(None)
                self._use.append([0, 0])
            self._slots[slot] = spool
        self._use[slot][0] += 1
        self._use[slot][1] += value.size
        self._last_slot = slot
        return slot << SLOT_SHIFT | value.index

    def _release(self, index: int) -> None:
        """Let go of the value at ``index`` (a spool no value is in any more is closed)."""
        ref = self._refs[index]
        if ref == HELD:
            self.held -= len(self._held.pop(self._paths[index]))
            return
        slot = ref >> SLOT_SHIFT
        spool = self._slots[slot]
        assert spool is not None
        use = self._use[slot]
        use[0] -= 1
        use[1] -= spool.span(ref & INDEX_MASK)[1]
        if not use[0]:
            self._slots[slot] = None

    def held_paths(self) -> list[str]:
        """The keys whose value is held in memory."""
        return list(self._held)

    def in_spools(
        self, spools: Collection[Spool], after: str, most: int
    ) -> tuple[list[str], str | None]:
        """The keys after ``after`` (in order; "" for the first) whose value is in one of
        ``spools``, looking at ``most`` keys at most; and the last key looked at (None
        once there are no more). Resumed by name, not place: keys put or deleted
        meanwhile never make it skip one."""
        slots = {i for i, s in enumerate(self._slots) if s is not None and s in spools}
        start = bisect.bisect_right(self._paths, after) if after else 0
        end = min(start + most, len(self._paths))
        found = [
            self._paths[i]
            for i in range(start, end)
            if self._refs[i] != HELD and self._refs[i] >> SLOT_SHIFT in slots
        ]
        return found, (self._paths[end - 1] if end < len(self._paths) else None)

    def move(self, spool: Spool, paths: Iterable[str], spools: Collection[Spool]) -> None:
        """Move the values of ``paths`` to ``spool`` in one write, each one that is still
        held in memory or in one of ``spools`` (a key replaced or deleted since it was
        listed is left as it is now); one that cannot be read back stays where it is,
        noted ``unreadable``. Raises OSError: then none of them moved."""
        slots = {i for i, s in enumerate(self._slots) if s is not None and s in spools}
        page = []  # (index in _paths, path, value): no key comes or goes until the end
        for path in paths:
            index = self._find(path)
            if index < 0:
                continue
            ref = self._refs[index]
            if ref != HELD and ref >> SLOT_SHIFT not in slots:
                continue
            try:
                page.append((index, path, as_bytes(self._value(index))))
            except SpoolError:
                self.unreadable.add(path)
        run = spool.add([value for _index, _path, value in page])
        for i, (index, path, _value) in enumerate(page):
            self._release(index)
            self._refs[index] = self._ref(path, Spooled(spool, run.first + i))

    def spool_use(self) -> dict[Spool, int]:
        """The spools the values are in, with the bytes of the values current in each."""
        return {s: use[1] for s, use in zip(self._slots, self._use, strict=True) if s is not None}

    @property
    def values(self) -> Mapping[str, Value]:
        """Every valid key's value, by path (written or not)."""
        return _Values(self, hidden=False)

    @property
    def files(self) -> ValueView:
        """The visible keys' values, by path (spooled ones read when asked for)."""
        return ValueView(_Values(self, hidden=True), self.unreadable)

    def differs(self, other: KeyTree) -> set[str]:
        """The file paths whose content or presence differs between two trees."""
        old, new = _Values(self, hidden=True), _Values(other, hidden=True)
        if not old:
            return set(new)
        return {p for p in old.keys() | new.keys() if not same(old.get(p), new.get(p))}

    def shadowing_key(self, path: str) -> str | None:
        """The shallower key that hides ``path``, if any."""
        for ancestor in ancestors(path):
            if self._find(ancestor) >= 0:
                return ancestor
        return None

    def _descendants(self, path: str) -> list[str]:
        # "/" sorts just before "0", so every "path/..." key sits in one run.
        start = bisect.bisect_left(self._paths, path + "/")
        end = bisect.bisect_left(self._paths, path + "0")
        return self._paths[start:end]

    def put(self, path: str, value: Value) -> set[str]:
        """Set a key; return the file paths whose content or presence changed."""
        index = bisect.bisect_left(self._paths, path)
        if index < len(self._paths) and self._paths[index] == path:
            if same(self._value(index), value):
                return set()  # and the value kept as it is (spooled, perhaps)
            self._release(index)
            self._refs[index] = self._ref(path, value)
            return set() if path in self._hidden else {path}
        self._paths.insert(index, path)
        self._refs.insert(index, self._ref(path, value))
        if self.shadowing_key(path) is not None:
            self._hidden.add(path)
            return set()
        changed = {path}
        for descendant in self._descendants(path):
            if descendant not in self._hidden:
                self._hidden.add(descendant)
                changed.add(descendant)
        return changed

    def delete(self, path: str) -> set[str]:
        """Remove a key; return the file paths whose content or presence changed."""
        index = self._find(path)
        if index < 0:
            return set()
        self._release(index)
        del self._paths[index]
        del self._refs[index]
        if path in self._hidden:
            self._hidden.discard(path)
            return set()
        changed = {path}
        for descendant in self._descendants(path):
            if descendant in self._hidden and self.shadowing_key(descendant) is None:
                self._hidden.discard(descendant)
                changed.add(descendant)
        return changed

    def hidden(self) -> list[tuple[str, str]]:
        """(key path, shadowing key path) for every key not written because of a clash."""
        return [
            (path, shadow) for path in sorted(self._hidden) if (shadow := self.shadowing_key(path))
        ]


class _Values(Mapping[str, Value]):
    """A key tree's values by path: every key's, or only the visible ones' (``hidden``:
    leave the hidden keys out). A view: it changes with the tree."""

    def __init__(self, tree: KeyTree, hidden: bool) -> None:
        self._tree = tree
        self._skip = tree._hidden if hidden else frozenset()

    def __getitem__(self, path: str) -> Value:
        index = self._tree._find(path)
        if index < 0 or path in self._skip:
            raise KeyError(path)
        return self._tree._value(index)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path not in self._skip and self._tree._find(path) >= 0

    def __iter__(self) -> Iterator[str]:
        if not self._skip:
            return iter(self._tree._paths)
        return (p for p in self._tree._paths if p not in self._skip)

    def __len__(self) -> int:
        return len(self._tree._paths) - len(self._skip)
