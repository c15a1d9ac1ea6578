"""The top-level links (``NAME -> ..data/NAME``) against a model, in a temp dir as the target.

TopLinks keeps no count per name and no set of every name it reconciles (memory
at 50,000 keys): these tests hold it to what the links on disk must be after
any sequence of changes, resets, names planted by someone else, and failures.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etcd_config_dispenser import links as links_module
from etcd_config_dispenser.layout import top_link_text
from etcd_config_dispenser.links import TopLinks

PATHS = ["a", "b", "ab", "c/x", "c/y", "d/e/f", "d/g"]  # no file/directory clash
TOPS = sorted({p.partition("/")[0] for p in PATHS})


def tops(live: set[str]) -> set[str]:
    return {p.partition("/")[0] for p in live}


@contextlib.contextmanager
def failing_once(call: str) -> Iterator[None]:
    """The first ``os.<call>`` made by TopLinks fails (EIO); later ones work."""
    real = getattr(os, call)
    state = {"failed": False}

    def flaky(*args: object, **kwargs: object) -> object:
        if not state["failed"]:
            state["failed"] = True
            raise OSError(errno.EIO, "I/O error")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(links_module.os, call, flaky)
        yield


def on_disk(target: Path) -> dict[str, str]:
    """Every name in the target: 'link' (ours), or 'theirs' (anything else)."""
    found = {}
    for name in os.listdir(target):
        path = target / name
        ours = path.is_symlink() and os.readlink(path) == top_link_text(name)
        found[name] = "link" if ours else "theirs"
    return found


step = st.one_of(
    st.tuples(st.just("update"), st.dictionaries(st.sampled_from(PATHS), st.booleans())),
    st.tuples(st.just("reset"), st.sets(st.sampled_from(PATHS))),
    st.tuples(st.just("plant"), st.sampled_from(TOPS)),
    st.tuples(st.just("fail symlink"), st.none()),
    st.tuples(st.just("fail unlink"), st.none()),
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(step, max_size=25))
@example(  # a failed link, then a reset to the same files: the reset mends it
    steps=[("fail symlink", None), ("update", {"a": True}), ("reset", {"a"})]
)
@example(  # a failed removal: the next change, elsewhere, removes it
    steps=[
        ("update", {"c/x": True}),
        ("fail unlink", None),
        ("update", {"c/x": False}),
        ("update", {"b": True}),
    ]
)
def test_links_are_those_of_the_names_with_files_after_any_steps(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, object]]
) -> None:
    """After each step that did not fail: one link of ours per top-level name with files
    (unless someone else's object has that name: never replaced, never removed), and no
    link of ours for a name without files. A step that failed is mended by the next."""
    target = tmp_path_factory.mktemp("target")
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        links, live, theirs = TopLinks(), set[str](), set[str]()
        fail: str | None = None
        for action, arg in steps:
            if action.startswith("fail"):
                fail = action.split()[1]
                continue
            if action == "plant":
                assert isinstance(arg, str)
                if arg not in on_disk(target):
                    (target / arg).write_bytes(b"someone's")
                    theirs.add(arg)
                continue
            context = failing_once(fail) if fail else contextlib.nullcontext()
            with context:
                if action == "update":
                    assert isinstance(arg, dict)
                    links.update(fd, arg, "test")
                    live = (live | {p for p, there in arg.items() if there}) - {
                        p for p, there in arg.items() if not there
                    }
                else:
                    assert isinstance(arg, set)
                    links.reset(fd, set(arg), "test")
                    live = set(arg)
            failed, fail = links._dirty, None
            assert links.live_paths == live
            if failed:
                continue
            expected = {name: "link" for name in tops(live) - theirs}
            expected |= {name: "theirs" for name in theirs}
            assert on_disk(target) == expected
    finally:
        os.close(fd)


def test_a_name_someone_else_holds_is_warned_about_once_per_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory with many files under a top-level name that is someone else's: one
    warning for the name, not one per file."""
    (tmp_path / "c").write_bytes(b"someone's")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with caplog.at_level(logging.WARNING):
            TopLinks().reset(fd, {f"c/{i}" for i in range(50)} | {"a"}, "r1")
    finally:
        os.close(fd)
    assert [r.getMessage() for r in caplog.records] == [
        "'c' in the target is not ours: its key is not shown"
    ]
    assert on_disk(tmp_path) == {"a": "link", "c": "theirs"}
