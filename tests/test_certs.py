"""Certificates: the gate's rules on plain data (certificates made here with cryptography),
then --verify-certs and the expiry metrics against a real etcd and a real nginx."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import (
    DispenserProcess,
    EtcdServer,
    busy_wait,
    free_port,
    http_get,
    make_cert,
    metric,
    metrics,
    nginx_command,
    same_cert,
    served_cert,
    txn_put,
    write_nginx_conf,
)

from etcd_config_dispenser import certs

Start = Callable[..., DispenserProcess]
NOW = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


Signer = tuple[str, ec.EllipticCurvePrivateKey]


def issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Signer | None = None,
    start: datetime.datetime = NOW - DAY,
    days: int = 30,
) -> x509.Certificate:
    issuer_name, signer = issuer if issuer else (name, key)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .sign(signer, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def pki() -> dict[str, bytes]:
    ca_key, leaf_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = issue("test CA", ca_key)
    leaf = issue("example.com", leaf_key, ("test CA", ca_key))
    return {
        "ca": pem(ca),
        "leaf": pem(leaf),
        "key": key_pem(leaf_key),
        "other key": key_pem(other_key),
        "expired": pem(issue("old", leaf_key, start=NOW - 40 * DAY, days=30)),
        "future": pem(issue("new", leaf_key, start=NOW + DAY)),
    }


@pytest.mark.parametrize(
    ("cert", "key", "reason"),
    [
        (["leaf", "ca"], "key", None),
        (["leaf"], "key", None),
        (["leaf", "ca"], None, None),  # no key beside it: dates and chain only
        (["leaf", "ca"], "other key", "the key does not match the certificate"),
        (["ca", "leaf"], "key", "chain out of order: certificate 1 is not issued by certificate 2"),
        (["expired"], "key", "expired on 2026-11-16"),
        (["future"], "key", "not valid before 2026-11-27"),
        (["leaf"], "garbage", "cannot parse the key"),
    ],
)
def test_the_gate_on_plain_data(
    pki: dict[str, bytes], cert: list[str], key: str | None, reason: str | None
) -> None:
    key_bytes = b"-----BEGIN PRIVATE KEY-----\nnot a key\n" if key == "garbage" else None
    found = certs.check(b"".join(pki[c] for c in cert), key_bytes or (pki[key] if key else None),
                        NOW)  # fmt: skip
    assert (found is None) if reason is None else (found is not None and reason in found), found


def test_pairs_follow_the_naming_rules() -> None:
    paths = ["a.com-fullchain.pem", "a.com-key.pem", "live/b/fullchain.pem", "live/b/cert.pem",
             "live/b/privkey.pem", "k8s/tls.crt", "k8s/tls.key", "db.crt", "db.key", "lone.pem",
             "notes.txt"]  # fmt: skip
    found = {(p.cert, p.key) for p in certs.pairs(paths)}
    assert ("a.com-fullchain.pem", "a.com-key.pem") in found
    assert ("live/b/fullchain.pem", "live/b/privkey.pem") in found
    assert ("live/b/cert.pem", "live/b/privkey.pem") in found
    assert ("k8s/tls.crt", "k8s/tls.key") in found
    assert ("db.crt", "db.key") in found
    assert ("lone.pem", None) in found
    assert not any(c == "notes.txt" for c, _ in found)


def test_bundles_without_a_key_encrypted_keys_and_mkcert_names(pki: dict[str, bytes]) -> None:
    """A CA bundle (unrelated roots) is no chain; an encrypted key (nginx's
    ssl_password_file) cannot be matched, so only the certificate is checked; mkcert
    names its key NAME-key.pem beside NAME.pem."""
    bundle = pki["ca"] + pki["expired"]  # not a chain, and one of them expired
    assert certs.refusals({"ca.pem": bundle}, {"ca.pem"}, NOW) == {}
    leaf_key = serialization.load_pem_private_key(pki["key"], None)
    encrypted = leaf_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pw"))  # fmt: skip
    assert certs.check(pki["leaf"], encrypted, NOW) is None
    assert certs.check(pki["expired"], encrypted, NOW) is not None
    files = {"example.com.pem": pki["leaf"], "example.com-key.pem": pki["other key"]}
    assert "example.com.pem + example.com-key.pem" in certs.refusals(files, {"example.com.pem"},
                                                                       NOW)  # fmt: skip


def test_only_pairs_a_change_touched_are_checked(pki: dict[str, bytes]) -> None:
    files = {"a-fullchain.pem": pki["leaf"], "a-key.pem": pki["other key"], "b.crt": pki["leaf"],
             "b.key": pki["key"]}  # fmt: skip
    assert certs.refusals(files, {"b.crt"}, NOW) == {}
    assert "a-fullchain.pem + a-key.pem" in certs.refusals(files, {"a-key.pem"}, NOW)


# -- against a real etcd and nginx ----------------------------------------------------


@pytest.mark.integration
def test_a_pair_with_the_wrong_key_never_goes_live_and_nginx_is_not_signalled(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    good, other, fixed = (make_cert(n, tmp_path) for n in ("good", "other", "fixed"))
    names = ("example.com-fullchain.pem", "example.com-key.pem")
    txn_put(etcd, prefix, dict(zip(names, good, strict=True)))  # type: ignore[arg-type]
    port, health = free_port(), free_port()
    workdir = tmp_path / "nginx"
    conf = write_nginx_conf(workdir, port, target)
    proc = dispenser("--verify-certs", f"--health-addr=127.0.0.1:{health}",
                     command=nginx_command(workdir, conf))  # fmt: skip
    busy_wait(lambda: same_cert(served_cert(port), good[0]), timeout=20)
    before = (target / "..data").readlink()
    txn_put(etcd, prefix, {names[0]: other[0]})  # type: ignore[arg-type]  # the old key stays
    busy_wait(lambda: "certificate refused" in proc.log(), timeout=20)
    assert "'example.com-fullchain.pem + example.com-key.pem': the key does not match" in (
        proc.log()
    )
    assert (target / "..data").readlink() == before  # never live, not even for a moment
    status, reason = http_get(health, "/healthz")
    assert status == 503 and reason.startswith("certificate refused: "), reason
    assert 'sync_failures_total{reason="certificate"} 1.0' in metrics(health)
    assert "SIGHUP" not in (workdir / "error.log").read_text()
    txn_put(etcd, prefix, dict(zip(names, fixed, strict=True)))  # type: ignore[arg-type]
    busy_wait(lambda: same_cert(served_cert(port), fixed[0]), timeout=20)
    assert http_get(health, "/healthz")[0] == 200


@pytest.mark.integration
def test_every_delivered_certificate_has_its_expiry_as_a_metric_and_a_warning(
    etcd: object, prefix: str, target: Path, tmp_path: Path, dispenser: Start
) -> None:
    cert, key = make_cert("soon", tmp_path)  # valid for 1 day
    txn_put(etcd, prefix, {"sub/tls.crt": cert, "sub/tls.key": key, "plain.txt": b"x"})  # type: ignore[arg-type]
    health = free_port()
    proc = dispenser(f"--health-addr=127.0.0.1:{health}")
    busy_wait(lambda: "expires in" in proc.log(), timeout=20)
    assert "certificate 'sub/tls.crt' expires in 1.0 days" in proc.log()
    expected = x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()
    sample = 'certificate_not_after_timestamp_seconds{path="sub/tls.crt"}'
    assert metric(metrics(health), sample) == expected
    etcd.delete(prefix + "sub/tls.crt")  # type: ignore[attr-defined]
    busy_wait(lambda: 'path="sub/tls.crt"' not in metrics(health), timeout=20)


def nginx_with_include(workdir: Path, port: int, target: Path) -> Path:
    """nginx whose configuration includes a file the dispenser delivers: a broken one
    makes the reload fail, and nginx goes on serving the old certificate."""
    conf = write_nginx_conf(workdir, port, target)
    text = conf.read_text().replace("http {", f"http {{\n  include {target}/extra.conf;", 1)
    conf.write_text(text)
    return conf


@pytest.mark.integration
@pytest.mark.parametrize("rollback", [False, True])
def test_verify_tls_sees_a_reload_that_did_not_take(
    etcd_server: EtcdServer, etcd: object, prefix: str, target: Path, tmp_path: Path,
    dispenser: Start, rollback: bool,
) -> None:  # fmt: skip
    first, second, third = (make_cert(n, tmp_path) for n in ("first", "second", "third"))
    names = ("example.com-fullchain.pem", "example.com-key.pem")

    def put(pair: tuple[bytes, bytes] | None, extra: bytes) -> int:
        files = {**(dict(zip(names, pair, strict=True)) if pair else {}), "extra.conf": extra}
        txn_put(etcd, prefix, files)  # type: ignore[arg-type]
        return int(etcd.get_response(prefix + "extra.conf").header.revision)  # type: ignore[attr-defined]

    served = put(first, b"# fine\n")
    port, health = free_port(), free_port()
    workdir = tmp_path / "nginx"
    conf = nginx_with_include(workdir, port, target)
    status_prefix = "/status" + prefix
    flags = [f"--verify-tls=127.0.0.1:{port},example.com", "--verify-tls-timeout=2",
             f"--health-addr=127.0.0.1:{health}", f"--status-prefix={status_prefix}"]  # fmt: skip
    flags += ["--rollback-on-failure"] if rollback else []
    proc = dispenser(*flags, command=nginx_command(workdir, conf))
    busy_wait(lambda: same_cert(served_cert(port), first[0]), timeout=20)
    served = int(metric(metrics(health), "revision"))
    broken = put(second, b"this is not nginx configuration;\n")  # the reload fails on it
    # A rollout pipeline asking at once must not hear "done" before the verification.
    waited = subprocess.run(
        [sys.executable, "-c", "from etcd_config_dispenser.ctl import main; main()", "wait",
         f"--status-prefix={status_prefix}", f"--revision={broken}", "--timeout=5"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "ETCD_ENDPOINTS": etcd_server.endpoint},
    )  # fmt: skip
    assert waited.returncode == 1, waited.stdout + waited.stderr
    busy_wait(lambda: "the reload did not take" in proc.log(), timeout=30)
    assert f"127.0.0.1:{port} (example.com) still serves 'CN=first' serial 0x" in proc.log()
    assert same_cert(served_cert(port), first[0])
    assert 'sync_failures_total{reason="reload"} 1.0' in metrics(health)
    status, reason = http_get(health, "/healthz")
    assert status == 503 and "the reload did not take" in reason, reason
    if rollback:  # the files match what is served again, and nginx reloaded them
        busy_wait(lambda: (target / names[0]).read_bytes() == first[0], timeout=20)
        assert (target / "extra.conf").read_bytes() == b"# fine\n"
        busy_wait(lambda: (workdir / "error.log").read_text().count("SIGHUP") == 2, timeout=20)
        assert metric(metrics(health), "revision") == served  # what is served, again
        put(third, b"# fixed\n")
        busy_wait(lambda: same_cert(served_cert(port), third[0]), timeout=20)
    else:  # on disk, not served; a fix elsewhere (the include alone) is verified too
        assert (target / names[0]).read_bytes() == second[0]
        put(None, b"# fixed\n")
        busy_wait(lambda: same_cert(served_cert(port), second[0]), timeout=20)
    busy_wait(lambda: "(example.com-fullchain.pem): the reload took" in proc.log(), timeout=20)
    busy_wait(lambda: http_get(health, "/healthz")[0] == 200, timeout=20)


@pytest.mark.integration
def test_a_certificate_not_valid_yet_goes_live_when_it_is_without_another_change(
    etcd: object, prefix: str, target: Path, dispenser: Start
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
    cert = pem(issue("soon.example", key, start=start))
    txn_put(etcd, prefix, {"tls.crt": cert, "tls.key": key_pem(key)})  # type: ignore[arg-type]
    proc = dispenser("--verify-certs")
    busy_wait(lambda: "not valid before" in proc.log(), timeout=20)
    assert not (target / "..data").exists()
    busy_wait(lambda: (target / "tls.crt").exists(), timeout=20)  # no etcd change since
    assert (target / "tls.crt").read_bytes() == cert


def test_a_key_cryptography_cannot_handle_is_a_refusal_not_a_crash(
    pki: dict[str, bytes], tmp_path: Path
) -> None:
    """Whoever writes to etcd must not be able to stop delivery (and the child with it)."""
    made = subprocess.run(["openssl", "ecparam", "-name", "secp112r1", "-genkey", "-noout",
                           "-out", str(tmp_path / "k.pem")], capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip("this openssl cannot make a secp112r1 key")
    files = {"a.crt": pki["leaf"], "a.key": (tmp_path / "k.pem").read_bytes()}
    found = certs.refusals(files, {"a.key"}, NOW)
    assert found["a.crt + a.key"].startswith("cannot check it: "), found
