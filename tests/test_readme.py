"""The README's quick start, run as written: a person pastes it into a shell on a fresh
machine (after its set-up block, which `.ci/run` stands for), and it works."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PORTS = (12379, 12380, 8443)  # the quick start's own, fixed so that it pastes as it is

pytestmark = pytest.mark.integration


def quick_start() -> str:
    """The second ```sh block of the "Quick start" section: the commands after set-up."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the quick start has a set-up block and a commands block"
    return str(blocks[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_quick_start_rotates_nginx_certificate_as_it_says(tmp_path: Path) -> None:
    busy = [port for port in PORTS if port_in_use(port)]
    if busy:
        pytest.skip(f"the quick start's ports are in use here: {busy}")
    shell = subprocess.Popen(
        ["bash", "-u"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # mktemp -d lands in tmp_path
    )  # fmt: skip
    try:
        out, err = shell.communicate(quick_start(), timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # the group this test started, all of it
        out, err = shell.communicate()
        raise AssertionError(f"the quick start hung:\n{out}\n{err}") from None
    subjects = re.findall(r"^subject=.*$", out, re.M)
    assert subjects == ["subject=CN = first.example", "subject=CN = second.example"], (out, err)
    assert len(re.findall(r"^revision \d+: put 2$", out, re.M)) == 2, out
    assert len(re.findall(r"started child pid \d+: nginx ", err)) == 1, err  # never restarted
    assert "r3: wrote 'cert.pem', 'key.pem'; removed nothing" in err, err
    assert "r3: sent SIGHUP to child pid" in err, err
    assert not any(port_in_use(port) for port in PORTS)  # it stops what it started
