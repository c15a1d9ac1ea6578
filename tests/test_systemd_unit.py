"""The systemd unit shipped in systemd/: its command line is one the dispenser accepts, and
systemd itself finds nothing wrong with it (systemd-analyze verify)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etcd_config_dispenser.cli import parse_args

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "etcd-config-dispenser.service"


def exec_start() -> list[str]:
    text = UNIT.read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return shlex.split(line)  # systemd's quoting rules agree with the shell's for these words


def test_the_units_command_line_parses() -> None:
    program, *args = exec_start()
    assert program.endswith("/bin/etcd-config-dispenser")
    options = parse_args(args, {})
    assert options.on_change == "systemctl try-reload-or-restart nginx"
    assert options.check == "nginx -t -q"
    assert not options.command  # a sidecar: nginx is its own service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("etcd-config-dispenser")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/etcd-config-dispenser/bin/etcd-config-dispenser",
                                             str(script)))  # fmt: skip
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "etcd-config-dispenser.service" not in done.stderr, done.stderr
