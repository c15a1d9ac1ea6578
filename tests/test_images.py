"""The container images, run with podman against a real etcd on the host (`make image-test`
builds them first). Configured with -e only, as a user would: no rewritten entrypoint."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EtcdServer, busy_wait, free_port, make_cert, same_cert, served_cert, txn_put

pytestmark = pytest.mark.container

DISPENSER, NGINX_IMAGE = "localhost/etcd-config-dispenser", "localhost/etcd-config-dispenser-nginx"
PODMAN = ["podman", "--runtime", "runc"]


def run_flags() -> list[str]:
    """podman asks for more open files and processes than this kind of host allows:
    ask for what the test process may have (podman caps its own processes at 32768)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return ["--pull=never", "--network=host", f"--ulimit=nofile={nofile}:{nofile}",
            f"--ulimit=nproc={nproc}:{nproc}"]  # fmt: skip


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make image-test`")
    for image in (DISPENSER, NGINX_IMAGE):
        assert podman("image", "exists", image).returncode == 0, f"{image}: run `make image`"


class Container:
    """One container this test started, removed (by its name) at the end."""

    def __init__(self, name: str, image: str, *args: str, env: dict[str, str],
                 volumes: tuple[str, ...] = (), detach: bool = True) -> None:  # fmt: skip
        self.name = name
        flags = [f"--env={k}={v}" for k, v in env.items()] + [f"--volume={v}" for v in volumes]
        self.started = podman("run", *(["--detach"] if detach else []), f"--name={name}",
                              *run_flags(), *flags, image, *args, timeout=120)  # fmt: skip
        assert self.started.returncode == 0 or not detach, self.started.stderr

    def logs(self) -> str:
        done = podman("logs", self.name)
        return done.stdout + done.stderr

    def exec(self, *command: str) -> str:
        done = podman("exec", self.name, *command)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def exit_code(self) -> int:
        done = podman("inspect", "--format={{.State.ExitCode}}", self.name)
        return int(done.stdout.strip())

    def remove(self) -> None:
        podman("rm", "--force", "--time=2", self.name)


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    try:
        yield started
    finally:
        for container in started:
            container.remove()


def name(kind: str) -> str:
    return f"ecd-test-{kind}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def test_the_dispenser_image_once_writes_into_a_volume_and_exits_0(
    etcd_server: EtcdServer, tmp_path: Path, containers: list[Container]
) -> None:
    etcd_server.client().put("/images-once/app.conf", b"listen 80;\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {"ETCD_ENDPOINTS": etcd_server.endpoint, "DISPENSER_PREFIX": "/images-once",
           "DISPENSER_TARGET": "/out", "DISPENSER_ONCE": "true",
           "DISPENSER_TIMEOUT": "20"}  # fmt: skip
    box = Container(name("once"), DISPENSER, env=env, volumes=(f"{out}:/out",), detach=False)
    containers.append(box)
    assert box.started.returncode == 0, box.started.stderr
    assert (out / "app.conf").read_bytes() == b"listen 80;\n"


def test_nginx_image_serves_certificates_from_etcd_and_reloads_as_pid_1_child(
    etcd_server: EtcdServer, tmp_path: Path, containers: list[Container]
) -> None:
    client = etcd_server.client()
    certs = [make_cert(f"image-{i}", tmp_path) for i in range(3)]
    txn_put(client, "/images-nginx/", {"tls.crt": certs[0][0], "tls.key": certs[0][1]})
    port = free_port()
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "default").write_text(f"""server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate /etc/nginx/certs/tls.crt;
    ssl_certificate_key /etc/nginx/certs/tls.key;
    location / {{ return 200 "hello\\n"; }}
}}
""")
    env = {"ETCD_ENDPOINTS": etcd_server.endpoint, "DISPENSER_PREFIX": "/images-nginx"}
    box = Container(name("nginx"), NGINX_IMAGE, env=env,
                    volumes=(f"{sites}:/etc/nginx/sites-enabled:ro",))  # fmt: skip
    containers.append(box)
    busy_wait(lambda: same_cert(served_cert(port), certs[0][0]), timeout=60)
    assert "etcd-config-dispenser" in box.exec("cat", "/proc/1/cmdline")  # PID 1 is ours
    master = box.exec("cat", "/run/nginx.pid").strip()
    for cert, key in certs[1:]:
        txn_put(client, "/images-nginx/", {"tls.crt": cert, "tls.key": key})
        busy_wait(lambda: same_cert(served_cert(port), cert), timeout=30)  # noqa: B023
    assert box.exec("cat", "/run/nginx.pid").strip() == master  # reloaded, not restarted
    assert podman("kill", "--signal=HUP", box.name).returncode == 0
    busy_wait(lambda: "forwarding SIGHUP to child pid" in box.logs(), timeout=20)
    stopped = podman("stop", "--time=20", box.name)
    assert stopped.returncode == 0, stopped.stderr
    assert box.exit_code() == 0  # SIGQUIT forwarded, nginx's graceful stop, its code
    assert "forwarding SIGQUIT" in box.logs()


# The child leaves orphans behind: each (sleep &) subshell exits at once, its sleep is
# re-parented to PID 1 and exits 0.2 s later. PID 1 must reap them; the child's own exit
# code is whatever SIGTERM makes of it (7).
ORPHANS = (
    "trap 'exit 7' TERM; for i in 1 2 3 4 5; do (sleep 0.2 &); done; while :; do sleep 0.1; done"
)
# Zombies left to PID 1 (orphans it must reap); the child's own `sleep 0.1`, a zombie
# for a moment until the child's shell waits for it, is not PID 1's (seen under load).
ZOMBIES = """
import os
zombies = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:  # a process may end between the listing and the read (the child's sleeps do)
        state, ppid = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[:2]
    except OSError:
        continue
    zombies += state == "Z" and ppid == "1"
print(zombies)
"""


def test_pid_1_reaps_orphans_and_forwards_stop_with_the_childs_exit_code(
    etcd_server: EtcdServer, containers: list[Container]
) -> None:
    etcd_server.client().put("/images-reap/a", b"1")
    env = {"ETCD_ENDPOINTS": etcd_server.endpoint, "DISPENSER_PREFIX": "/images-reap",
           "DISPENSER_TARGET": "/tmp/config"}  # fmt: skip
    box = Container(name("reap"), DISPENSER, "sh", "-c", ORPHANS, env=env)
    containers.append(box)
    busy_wait(lambda: "started child pid" in box.logs(), timeout=60)
    time.sleep(1.0)  # the orphans have exited
    assert box.exec("python3", "-c", ZOMBIES).strip() == "0", box.logs()
    stopped = podman("stop", "--time=20", box.name)
    assert stopped.returncode == 0, stopped.stderr
    assert box.exit_code() == 7  # the child's code, through PID 1
