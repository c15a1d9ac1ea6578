"""Rollout status in etcd: two real dispensers report under --status-prefix, and
etcd-config-ctl wait returns only once both serve a revision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DispenserProcess, EtcdServer, busy_wait
from hypothesis import given, settings
from hypothesis import strategies as st

from etcd_config_dispenser.rollout import laggards
from etcd_config_dispenser.status import FilesDigest

Start = Callable[..., DispenserProcess]


def ctl(server: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from etcd_config_dispenser.ctl import main; main()", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "ETCD_ENDPOINTS": server.endpoint},
    )  # fmt: skip


def test_laggards_on_plain_data() -> None:
    a = {"instance": "a", "revision": 42, "verified": None}
    b = {"instance": "b", "revision": 41, "verified": None}
    c = {"instance": "c", "revision": 43, "verified": "the reload did not take: ..."}
    assert laggards([a], 42, 1) == []
    assert laggards([a, b], 42, 1) == ["b serves r41"]
    assert laggards([a, c], 42, 1) == ["c: the reload did not take: ..."]
    assert laggards([a], 42, 2) == ["1 live instances of at least 2"]
    # An instance that verifies counts once it has verified that revision (a reload
    # that fails is found seconds after the revision is served).
    d = {"instance": "d", "revision": 42, "verifies": True, "verified": "ok",
         "verified_revision": 41}  # fmt: skip
    assert laggards([d], 42, 1) == ["d has not verified r42 yet"]
    assert laggards([{**d, "verified_revision": 42}], 42, 1) == []


def test_a_revision_with_nothing_to_verify_counts_as_verified() -> None:
    """The first snapshot (the child starts with it) and a change that wrote no file
    leave --verify-tls nothing to look at: wait must not hang on them."""
    from etcd_config_dispenser.health import Stats

    stats = Stats(verifies=True)
    stats.served(5, "s5", files=3)  # the first snapshot
    assert stats.reload_checked == 5
    stats.served(6, "s6", files=3)  # a change: its verification is still to come
    assert stats.reload_checked == 5
    stats.served(7, "s6")  # no file changed
    assert stats.reload_checked == 7
    stats.reload_failed = "the reload did not take"
    stats.served(8, "s6")
    assert stats.reload_checked == 7  # a failure stands until a verification passes


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.dictionaries(st.sampled_from("abcdef"), st.one_of(st.none(),
       st.binary(max_size=3)), max_size=4), max_size=8))  # fmt: skip
def test_the_files_digest_is_the_same_however_it_was_reached(
    steps: list[dict[str, bytes | None]],
) -> None:
    digest, files = FilesDigest(), {}
    for step in steps:
        for path, value in step.items():
            if value is None:
                files.pop(path, None)
            else:
                files[path] = value
        written = [p for p, v in step.items() if v is not None]
        removed = [p for p, v in step.items() if v is None]
        digest.update(0, files, written, removed)
    fresh = FilesDigest()
    fresh.update(0, files, sorted(files), [])
    assert digest.hexdigest() == fresh.hexdigest()


@pytest.mark.integration
def test_wait_returns_once_every_instance_serves_the_revision(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path, dispenser: Start
) -> None:
    status = "/status" + prefix
    etcd.put(prefix + "a", b"1")  # type: ignore[attr-defined]
    first = dispenser(f"--status-prefix={status}", "--instance=web-1")
    second = DispenserProcess(
        [f"--prefix={prefix}", f"--target={tmp_path / 'second'}", f"--status-prefix={status}",
         "--instance=web-2"],
        {"ETCD_ENDPOINTS": etcd_server.endpoint}, tmp_path / "second.log",
    )  # fmt: skip
    try:
        etcd.put(prefix + "a", b"2")  # type: ignore[attr-defined]
        revision = etcd.get_response(prefix + "a").header.revision  # type: ignore[attr-defined]
        done = ctl(etcd_server, "wait", f"--status-prefix={status}", f"--revision={revision}",
                   "--min-instances=2", "--timeout=30")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"every live instance serves r{revision} or later\n"
        table = ctl(etcd_server, "status", f"--status-prefix={status}").stdout
        assert table.startswith("INSTANCE")
        rows = [line.split()[:2] for line in table.splitlines()[1:]]
        assert [name for name, _ in rows] == ["web-1", "web-2"]
        assert all(int(served[1:]) >= revision for _, served in rows), table  # N or later

        # web-2 frozen: the next revision is not served everywhere, and wait says who.
        os.kill(second.pid, signal.SIGSTOP)
        try:
            etcd.put(prefix + "a", b"3")  # type: ignore[attr-defined]
            later = etcd.get_response(prefix + "a").header.revision  # type: ignore[attr-defined]
            done = ctl(etcd_server, "wait", f"--status-prefix={status}", f"--revision={later}",
                       "--min-instances=2", "--timeout=3")  # fmt: skip
            assert done.returncode == 1
            assert f"not every instance serves r{later} after 3s: web-2 serves r" in done.stderr
            assert "web-1" not in done.stderr
        finally:
            os.kill(second.pid, signal.SIGCONT)
        done = ctl(etcd_server, "wait", f"--status-prefix={status}", f"--revision={later}",
                   "--min-instances=2", "--timeout=30")  # fmt: skip
        assert done.returncode == 0, done.stderr

        # An instance that dies disappears by itself (its lease runs out); a clean stop at once.
        second.stop(signal.SIGKILL)
        busy_wait(lambda: "web-2" not in ctl(etcd_server, "status", f"--status-prefix={status}")
                  .stdout, timeout=30)  # fmt: skip
        assert first.stop() == 0
        assert ctl(etcd_server, "status", f"--status-prefix={status}").stdout.strip() == (
            "INSTANCE  REVISION  SERVED AT (UTC)  VERIFIED  EARLIEST EXPIRY  HEALTHY"
        )
    finally:
        second.cleanup()
