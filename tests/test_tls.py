"""etcd over TLS with client certificates, made by openssl for each test run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DispenserProcess, EtcdServer, TlsFiles, make_tls, read_tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    server = EtcdServer(tls=tls, also_listen=["127.0.0.2"]).start()
    client = server.client()
    client.put("/certs/a", "over tls")
    client.close()
    try:
        yield server
    finally:
        server.cleanup()


def run_once(tmp_path: Path, server: EtcdServer, env: dict[str, str]) -> DispenserProcess:
    proc = DispenserProcess(
        ["--once", "--timeout=4", "--prefix=/certs", f"--target={tmp_path / 'config'}"],
        {"ETCD_ENDPOINTS": f"https://127.0.0.1:{server.client_port}", **env},
        tmp_path / "dispenser.log",
    )
    proc.wait(30)
    return proc


def client_env(tls: TlsFiles) -> dict[str, str]:
    return {"ETCD_CLIENT_CERT": str(tls.client_cert), "ETCD_CLIENT_KEY": str(tls.client_key)}


def test_server_ca_and_client_certificate_as_files(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    assert tls_etcd.tls is not None
    proc = run_once(tmp_path, tls_etcd, {"ETCD_SERVER_CA": str(tls_etcd.tls.ca),
                                         **client_env(tls_etcd.tls)})  # fmt: skip
    assert proc.proc.returncode == 0, proc.log()
    assert read_tree(tmp_path / "config") == {"a": b"over tls"}


def test_pem_in_the_variable_and_host_without_scheme(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    """PEM text itself in the variables; 'h:port' turns TLS on because a CA is given."""
    tls = tls_etcd.tls
    assert tls is not None
    proc = DispenserProcess(
        ["--once", "--prefix=/certs", f"--target={tmp_path / 'config'}"],
        {
            "ETCD_ENDPOINTS": tls_etcd.endpoint,
            "ETCD_SERVER_CA": tls.ca.read_text(),
            "ETCD_CLIENT_CERT": tls.client_cert.read_text(),
            "ETCD_CLIENT_KEY_FILE": str(tls.client_key),  # a file holding the PEM, trimmed
        },
        tmp_path / "dispenser.log",
    )
    assert proc.wait(30) == 0, proc.log()
    assert read_tree(tmp_path / "config") == {"a": b"over tls"}


def test_wrong_ca_is_a_clear_error(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    assert tls_etcd.tls is not None
    other = make_tls(tmp_path / "other", name="other")
    proc = run_once(tmp_path, tls_etcd, {"ETCD_SERVER_CA": str(other.ca),
                                         **client_env(tls_etcd.tls)})  # fmt: skip
    assert proc.proc.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in proc.log()
    assert "Traceback" not in proc.log()
    assert not (tmp_path / "config" / "a").exists()


def test_missing_client_certificate_is_refused(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    assert tls_etcd.tls is not None
    proc = run_once(tmp_path, tls_etcd, {"ETCD_SERVER_CA": str(tls_etcd.tls.ca)})
    assert proc.proc.returncode == 1
    assert "UNAVAILABLE" in proc.log() and "giving up" in proc.log()


def test_insecure_skip_verify_trusts_the_presented_certificate(
    tls_etcd: EtcdServer, tmp_path: Path
) -> None:
    assert tls_etcd.tls is not None
    proc = run_once(tmp_path, tls_etcd, {"ETCD_INSECURE_SKIP_VERIFY": "true",
                                         **client_env(tls_etcd.tls)})  # fmt: skip
    assert proc.proc.returncode == 0, proc.log()
    assert read_tree(tmp_path / "config") == {"a": b"over tls"}
    assert "is NOT verified" in proc.log()  # said loudly at start
    assert "WITHOUT verification" in proc.log()


def test_insecure_skip_verify_with_a_name_the_certificate_lacks(
    tls_etcd: EtcdServer, tmp_path: Path
) -> None:
    """Connecting by a name not in the certificate: hostname checks are skipped too."""
    assert tls_etcd.tls is not None
    proc = DispenserProcess(
        ["--once", "--prefix=/certs", f"--target={tmp_path / 'config'}"],
        {"ETCD_ENDPOINTS": f"https://127.0.0.2:{tls_etcd.client_port}",
         "ETCD_INSECURE_SKIP_VERIFY": "1", **client_env(tls_etcd.tls)},
        tmp_path / "dispenser.log",
    )  # fmt: skip
    assert proc.wait(30) == 0, proc.log()
    assert "WITHOUT verification" in proc.log()
    assert read_tree(tmp_path / "config") == {"a": b"over tls"}
