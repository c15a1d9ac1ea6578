"""For the tests: the dispenser as a process, the oracles, and the local processes of devtools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from devtools.local import (  # noqa: F401 - the tests import them from here
    CERT_NAME,
    ETCD,
    KEY_NAME,
    NGINX,
    EtcdServer,
    TlsFiles,
    busy_wait,
    free_port,
    make_cert,
    make_tls,
    nginx_command,
    same_cert,
    served_cert,
    start_cluster,
    stop_process,
    txn_put,
    write_nginx_conf,
)
from etcd_config_dispenser.keys import KeyTree
from etcd_config_dispenser.snapshot import SnapshotWriter


def writer_with(target: Path, files: int, **kwargs: object) -> tuple[SnapshotWriter, KeyTree]:
    """A writer over ``target`` with ``files`` files (k0000, k0001, ...) live and settled,
    and no housekeeping run yet (no spare made)."""
    writer = SnapshotWriter(target, **kwargs)  # type: ignore[arg-type]
    writer.recover()
    tree = KeyTree()
    for i in range(files):
        tree.put(f"k{i:04d}", b"v")
    writer.publish(tree.files, set(tree.files), 1)
    writer.settle()
    return writer, tree


class Clock:
    """A monotonic clock that moves only when a test moves it (``now``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """What a writer waiting for a spare calls: time passes, none is spent."""
        self.now += max(0.0, seconds)


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the health server; (0, why) if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


def metric(text: str, name: str) -> float:
    """One sample of the dispenser's /metrics text, by the name after the prefix."""
    for line in text.splitlines():
        if line.startswith(f"etcd_config_dispenser_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name} in:\n{text}")


def metrics(port: int) -> str:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return text


def read_tree(target: Path) -> dict[str, bytes]:
    """What a user sees: every file reached through the top-level links, by relative path.

    The one oracle of the snapshot tests (after Kubernetes' checkVolumeContents).
    """
    tree: dict[str, bytes] = {}
    for entry in sorted(os.listdir(target)):
        if entry.startswith(".."):
            continue
        top = target / entry
        if top.is_dir():
            for root, _dirs, files in os.walk(top):
                for name in files:
                    path = Path(root) / name
                    tree[str(path.relative_to(target))] = path.read_bytes()
        else:
            tree[entry] = top.read_bytes()
    return tree


def tree_is(target: Path, expected: dict[str, bytes]) -> bool:
    """For polling: does the user see ``expected``? A name that vanished while
    being read (a link removed by a flip in between) just means: not yet."""
    try:
        return (target / "..data").exists() and read_tree(target) == expected
    except FileNotFoundError:
        return False


def wait_tree(
    target: Path, expected: dict[str, bytes], proc: DispenserProcess, timeout: float = 10
) -> None:
    """Until the user sees ``expected``; fail at once, with the log, if the dispenser exits."""

    def matches() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"dispenser exited {proc.proc.returncode}:\n{proc.log()}")
        return tree_is(target, expected)

    try:
        busy_wait(matches, timeout=timeout)
    except AssertionError:
        current = read_tree(target) if (target / "..data").exists() else None
        raise AssertionError(f"tree {current} != {expected}\n{proc.log()}") from None


# A child that records its pid once at start (restarts are counted), its
# environment (in OUT.env) and a line per SIGHUP (signals are counted).
RECORDER = """
import json, os, signal, sys, time
out = sys.argv[1]
json.dump(dict(os.environ), open(out + ".env", "w"))
signal.signal(signal.SIGHUP, lambda s, f: open(out, "a").write("HUP\\n"))
with open(out, "a") as f:
    f.write(f"start {os.getpid()}\\n")
while True:
    time.sleep(1)
"""


def dir_files(root: Path) -> dict[str, bytes]:
    """Every file under one snapshot directory, by relative path."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def snapshot_dirs(target: Path) -> list[str]:
    """Every ".." entry but the live link and the pool of empty files: snapshots and debris."""
    return sorted(
        n for n in os.listdir(target) if n.startswith("..") and n not in ("..data", "..pool")
    )


class DispenserProcess:
    """The installed dispenser, run as a real process with its log in a file."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        command: Sequence[str] = (),
    ) -> None:
        self.log_path = log_path
        argv = [sys.executable, "-m", "etcd_config_dispenser", *args]
        if command:
            argv += ["--", *command]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """For teardown: SIGTERM (the dispenser stops its child), SIGKILL if it hangs."""
        stop_process(self.proc, timeout=15)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``signum`` and expect an exit within ``timeout``; its exit code."""
        code = stop_process(self.proc, signum, timeout)
        if code == -signal.SIGKILL and signum != signal.SIGKILL:
            raise AssertionError(f"dispenser did not exit on {signum}:\n{self.log()}")
        return code
