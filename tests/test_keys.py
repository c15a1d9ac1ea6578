"""Key -> path rules: a table after Kubernetes' validatePath, a clash table, a property."""

from __future__ import annotations

import contextlib
import os
import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etcd_config_dispenser.keys import (
    MAX_DEPTH,
    MAX_NAME,
    MAX_PATH,
    InvalidKey,
    KeyTree,
    key_to_relpath,
    normalise_prefix,
)

P = b"/certs/"

VALID = [
    ("plain", b"/certs/cert.pem", "cert.pem"),
    ("nested", b"/certs/a/b/c.txt", "a/b/c.txt"),
    ("dotfile", b"/certs/.dotfile", ".dotfile"),
    ("dot dot inside a name", b"/certs/a..b", "a..b"),
    ("deeper dot-dot-name", b"/certs/a/..b", "a/..b"),
    ("utf-8", "/certs/zertifikat-ä.pem".encode(), "zertifikat-ä.pem"),
    ("longest segment", b"/certs/" + b"a" * MAX_NAME, "a" * MAX_NAME),
    ("spaces", b"/certs/my cert.pem", "my cert.pem"),
    ("deepest", b"/certs/" + b"d/" * (MAX_DEPTH - 1) + b"f", "d/" * (MAX_DEPTH - 1) + "f"),
]

INVALID = [
    ("empty", b"/certs/", "is empty"),
    ("absolute", b"/certs//etc/passwd", "absolute"),
    ("trailing slash", b"/certs/a/", "ends in '/'"),
    ("empty segment", b"/certs/a//b", "empty segment"),
    ("dot", b"/certs/./a", "'.' segment"),
    ("dot dot", b"/certs/..", "'..' segment"),
    ("escape", b"/certs/a/../../etc/passwd", "'..' segment"),
    ("reserved data", b"/certs/..data", "reserved"),
    ("reserved sneaky", b"/certs/..sneaky.txt", "reserved"),
    ("nul", b"/certs/a\0b", "NUL"),
    ("newline", b"/certs/evil\nname", "control character"),
    ("tab", b"/certs/a\tb", "control character"),
    ("escape sequence", b"/certs/a\x1b[31m", "control character"),
    ("delete", b"/certs/a\x7f", "control character"),
    ("C1 control", "/certs/a\u0085b".encode(), "control character"),
    ("bad utf-8", b"/certs/\xff\xfe", "UTF-8"),
    ("long segment", b"/certs/" + b"a" * (MAX_NAME + 1), "longer than 255"),
    ("long path", b"/certs/" + b"a/" * (MAX_PATH // 2) + b"a", "longer than 4096"),
    ("other prefix", b"/other/a", "not under the prefix"),
    ("too deep", b"/certs/" + b"d/" * MAX_DEPTH + b"f", "directories deep"),
    ("1,000 segments within PATH_MAX", b"/certs/" + b"a/" * 999 + b"a", "directories deep"),
]


@pytest.mark.parametrize("key, path", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_keys_map_to_paths(key: bytes, path: str) -> None:
    assert key_to_relpath(key, P) == path


@pytest.mark.parametrize("key, reason", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_keys_are_refused_with_the_rule(key: bytes, reason: str) -> None:
    with pytest.raises(InvalidKey, match=reason):
        key_to_relpath(key, P)


def test_max_path_is_lowered_by_the_caller() -> None:
    key = P + b"a" * 100
    assert key_to_relpath(key, P, max_path=100) == "a" * 100
    with pytest.raises(InvalidKey, match="longer than 99"):
        key_to_relpath(key, P, max_path=99)


@pytest.mark.parametrize(
    "given_prefix, normalised",
    [("/certs", b"/certs/"), ("/certs/", b"/certs/"), ("/certs//", b"/certs/"), ("/", b"/")],
)
def test_prefix_is_normalised_to_one_slash(given_prefix: str, normalised: bytes) -> None:
    assert normalise_prefix(given_prefix) == normalised


@given(st.binary(max_size=300))
def test_no_key_ever_maps_outside_the_target(rel: bytes) -> None:
    try:
        path = key_to_relpath(P + rel, P)
    except InvalidKey:
        return
    target = "/target"
    joined = posixpath.normpath(posixpath.join(target, path))
    assert joined.startswith(target + "/")
    assert joined == posixpath.join(target, path)  # nothing for normpath to undo
    assert not path.split("/")[0].startswith("..")
    assert "\0" not in path


@given(
    st.lists(
        st.text(alphabet="ab./", min_size=1, max_size=6).map(lambda s: s.encode()),
        max_size=8,
        unique=True,
    )
)
def test_two_keys_never_name_the_same_file(rels: list[bytes]) -> None:
    paths = []
    for rel in rels:
        with contextlib.suppress(InvalidKey):
            paths.append(key_to_relpath(P + rel, P))
    assert len(paths) == len(set(paths))


def test_shallower_key_wins_a_file_dir_clash() -> None:
    tree = KeyTree()
    assert tree.put("a/b", b"deep") == {"a/b"}
    assert tree.put("a/c", b"deep2") == {"a/c"}
    # "a" arrives: it becomes the file, "a/b" and "a/c" leave the disk.
    assert tree.put("a", b"file") == {"a", "a/b", "a/c"}
    assert tree.files == {"a": b"file"}
    assert tree.shadowing_key("a/b") == "a"
    assert sorted(tree.hidden()) == [("a/b", "a"), ("a/c", "a")]
    # A deeper key under a file is kept, not written.
    assert tree.put("a/d", b"x") == set()
    # "a" goes: everything under it appears again.
    assert tree.delete("a") == {"a", "a/b", "a/c", "a/d"}
    assert tree.files == {"a/b": b"deep", "a/c": b"deep2", "a/d": b"x"}


def test_clash_result_does_not_depend_on_order() -> None:
    keys = {"a": b"1", "a/b": b"2", "a/b/c": b"3", "ab": b"4", "a0": b"5"}
    first, second = KeyTree(), KeyTree()
    for path in keys:
        first.put(path, keys[path])
    for path in reversed(list(keys)):
        second.put(path, keys[path])
    assert first.files == second.files == {"a": b"1", "ab": b"4", "a0": b"5"}


def test_nested_shadow_survives_removal_of_the_outer_key() -> None:
    tree = KeyTree()
    for path in ("a", "a/b", "a/b/c"):
        tree.put(path, path.encode())
    assert tree.delete("a") == {"a", "a/b"}  # a/b/c stays hidden behind a/b
    assert tree.files == {"a/b": b"a/b"}


def test_unchanged_value_is_no_change() -> None:
    tree = KeyTree()
    tree.put("x", b"1")
    assert tree.put("x", b"1") == set()
    assert tree.put("x", b"2") == {"x"}
    assert tree.delete("missing") == set()


def test_empty_value_is_a_file() -> None:
    tree = KeyTree()
    assert tree.put("empty", b"") == {"empty"}
    assert tree.files == {"empty": b""}
    assert tree.delete("empty") == {"empty"}


def test_key_tree_matches_a_full_recompute_after_random_edits() -> None:
    """The incremental clash rule equals the definition, applied from scratch."""
    import random

    rng = random.Random(7)
    names = ["a", "a/b", "a/b/c", "a/c", "b", "b/a", "ab", "a0", "a/b0"]
    tree = KeyTree()
    for _ in range(2000):
        path = rng.choice(names)
        if rng.random() < 0.6:
            tree.put(path, os.urandom(2))
        else:
            tree.delete(path)
        expected = {
            p: v for p, v in tree.values.items() if not any(q in tree.values for q in _ancestors(p))
        }
        assert tree.files == expected


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
