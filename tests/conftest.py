"""Fixtures: one real etcd for the session, a fresh prefix and target per test."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# devtools/ (the local processes shared with the scripts) from the repository, but
# appended: the package itself must come from the installed copy, as users get it.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from helpers import DispenserProcess, EtcdServer


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd on free loopback ports; exactly this process is stopped afterwards."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[object]:
    client = etcd_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A prefix of this test's own, so tests sharing the server never see each other's keys."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return f"/test/{digest}/"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "config"


@pytest.fixture
def dispenser(
    etcd_server: EtcdServer, prefix: str, target: Path, tmp_path: Path
) -> Iterator[Callable[..., DispenserProcess]]:
    """Start the real dispenser against the test etcd; every one started is stopped."""
    started: list[DispenserProcess] = []

    def start(
        *args: str,
        command: Sequence[str] = (),
        env: dict[str, str] | None = None,
        use_defaults: bool = True,
    ) -> DispenserProcess:
        argv = [f"--prefix={prefix}", f"--target={target}", *args] if use_defaults else list(args)
        env = dict(env or {})
        if "ETCD_ENDPOINTS_FILE" not in env:
            env.setdefault("ETCD_ENDPOINTS", etcd_server.endpoint)
        proc = DispenserProcess(
            argv,
            env,
            tmp_path / f"dispenser-{len(started)}.log",
            command,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.cleanup()
