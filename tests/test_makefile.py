"""The Makefile on a fresh machine: `make demo` installs only what the demo needs, and a
second run installs nothing. Checked with `make -n` (what make would run) on a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def would_run(tree: Path, goal: str) -> str:
    done = subprocess.run(
        ["make", "-n", goal], cwd=tree, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The Makefile and stand-ins for the sources, with a venv already installed."""
    shutil.copy(REPO / "Makefile", tmp_path)
    (tmp_path / "etcd_config_dispenser").mkdir()
    for name in ("etcd_config_dispenser/cli.py", "setup.cfg", "pyproject.toml", "README.md"):
        (tmp_path / name).write_text("")
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/python").write_text("")
    later = time.time() + 5
    for stamp in (".venv/.installed-run", ".venv/.installed-dev"):
        (tmp_path / stamp).write_text("")
        os.utime(tmp_path / stamp, (later, later))
    return tmp_path


def test_a_second_make_demo_installs_nothing(tree: Path) -> None:
    assert "pip install" not in would_run(tree, "demo")
    assert "pip install" not in would_run(tree, "test")


def test_a_changed_source_is_installed_again_without_the_dev_tools_for_the_demo(
    tree: Path,
) -> None:
    later = time.time() + 10
    os.utime(tree / "etcd_config_dispenser/cli.py", (later, later))
    demo = would_run(tree, "demo")
    assert "pip install -q ." in demo
    assert "[test" not in demo and "ruff" not in demo  # the demo needs no test or lint tools
    assert "pip install -q '.[test,lint,metrics]'" in would_run(tree, "test")


def test_a_removed_module_is_uninstalled_too(tree: Path) -> None:
    """The stamp is newer than every file left: only the directory's time tells."""
    (tree / "etcd_config_dispenser/old.py").write_text("")
    (tree / "etcd_config_dispenser/old.py").unlink()
    later = time.time() + 10
    os.utime(tree / "etcd_config_dispenser", (later, later))
    assert "pip install -q ." in would_run(tree, "demo")


def test_deps_installs_python3_venv_which_a_minimal_debian_lacks(tree: Path) -> None:
    deps = would_run(tree, "deps")
    assert "python3-venv" in deps and "import ensurepip" in deps


def test_the_demo_prints_no_colour_codes_into_a_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.demo import say

    say("rotating the certificate")
    assert capsys.readouterr().out == "\n== rotating the certificate\n"
