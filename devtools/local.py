"""Local real processes for tests, the demo and the benchmark: etcd, nginx, certificates.

One importable place (the repository root is on the path for pytest, and
``python -m scripts.X`` runs from it). Every process is started on free
loopback ports and stopped by its own process id.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import etcd3

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    signum: int = signal.SIGTERM,
    timeout: float = 10.0,
) -> int:
    """Send ``signum`` (if it still runs), wait; SIGKILL after ``timeout``. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def txn_put(client: etcd3.Etcd3Client, prefix: str, items: Mapping[str, bytes]) -> None:
    """Put several keys in one etcd transaction: one revision, one snapshot."""
    ops = [client.transactions.put(prefix + name, value) for name, value in items.items()]
    client.transaction(compare=[], success=ops, failure=[])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def busy_wait(condition: Callable[[], object], timeout: float = 10.0, step: float = 0.01) -> None:
    """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(step)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(workdir: Path, name: str = "test") -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl.

    The server certificate also allows clientAuth: etcd 3.4 uses it to call its
    own client URL for the JSON gateway.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", f"/CN={name}-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for who, usage, san in [
        ("server", "serverAuth,clientAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ]:
        (workdir / f"{who}.ext").write_text(
            f"{san}extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature\n"
        )
        run("req", "-new", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN={name}-{who}")  # fmt: skip
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{who}.ext",
            "-out", f"{who}.crt")  # fmt: skip
    names = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    return TlsFiles(*(workdir / n for n in names))


class EtcdServer:
    """One etcd member on free loopback ports with its own data dir; stopped by its pid."""

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        name: str = "t",
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        tls: TlsFiles | None = None,
        also_listen: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="etcd-test-"))
        self.client_port = free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.extra_args = list(extra_args)
        self.tls = tls
        self.also_listen = list(also_listen)  # more loopback addresses, same port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def start(self, wait: bool = True) -> EtcdServer:
        client_url = self.url
        tls_args = []
        if self.tls:
            tls_args = ["--cert-file", str(self.tls.server_cert), "--key-file",
                        str(self.tls.server_key), "--client-cert-auth",
                        "--trusted-ca-file", str(self.tls.ca)]  # fmt: skip
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.data_dir / "etcd.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                ETCD,
                "--data-dir", str(self.data_dir / "data"),
                "--name", self.name,
                "--listen-client-urls", ",".join([client_url] + [
                    client_url.replace("127.0.0.1", host) for host in self.also_listen]),
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", self.initial_cluster,
                *tls_args,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        if wait:
            busy_wait(self.healthy, timeout=20)
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {(self.data_dir / 'etcd.log').read_text()[-2000:]}")
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def client(self) -> etcd3.Etcd3Client:
        if self.tls:
            return etcd3.client(
                host="127.0.0.1", port=self.client_port, timeout=5, ca_cert=str(self.tls.ca),
                cert_key=str(self.tls.client_key), cert_cert=str(self.tls.client_cert),
            )  # fmt: skip
        return etcd3.client(host="127.0.0.1", port=self.client_port, timeout=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_cluster(size: int = 3) -> list[EtcdServer]:
    """A real etcd cluster of ``size`` members on loopback, started together."""
    peers = [free_port() for _ in range(size)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{port}" for i, port in enumerate(peers))
    members = [
        EtcdServer(name=f"m{i}", peer_port=port, initial_cluster=initial)
        for i, port in enumerate(peers)
    ]
    for member in members:
        member.start(wait=False)
    for member in members:
        busy_wait(member.healthy, timeout=30)
    return members


def make_cert(common_name: str, workdir: Path) -> tuple[bytes, bytes]:
    """A self-signed EC certificate and its key (PEM), made by openssl in milliseconds."""
    key, cert = workdir / f"{common_name}.key", workdir / f"{common_name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={common_name}", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# The names letsencrypt-with-etcd writes, flat under the prefix.
CERT_NAME, KEY_NAME = "example.com-fullchain.pem", "example.com-key.pem"


def write_nginx_conf(workdir: Path, port: int, target: Path) -> Path:
    """An unprivileged nginx serving TLS on 127.0.0.1:port with the dispensed certificate."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(f"""
worker_processes 1;
error_log {workdir}/error.log info;
pid {workdir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
{temp}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {target}/{CERT_NAME};
    ssl_certificate_key {target}/{KEY_NAME};
    location / {{ return 200 "hello from nginx\\n"; }}
  }}
}}
""")
    return conf


def nginx_command(workdir: Path, conf: Path) -> list[str]:
    return [NGINX, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]


def served_cert(port: int) -> str | None:
    """The certificate nginx presents now (PEM), or None if no handshake completes."""
    import ssl

    try:
        return ssl.get_server_certificate(("127.0.0.1", port), timeout=2)
    except OSError:
        return None


def same_cert(a: bytes | str | None, b: bytes | str | None) -> bool:
    def norm(pem: bytes | str | None) -> str:
        text = pem.decode() if isinstance(pem, bytes) else (pem or "")
        return "".join(text.split())

    return a is not None and b is not None and norm(a) == norm(b)
