"""Certificates in the snapshot: the gate (--verify-certs) and their expiry. Pure: bytes in,
findings out, parsed with ``cryptography``.

Pairs are found by name, in the same directory, by the conventions of the
tools that write certificates into etcd:

- letsencrypt-with-etcd: ``NAME-fullchain.pem`` or ``NAME-cert.pem`` with ``NAME-key.pem``;
- certbot (a lineage directory): ``fullchain.pem`` or ``cert.pem`` with ``privkey.pem``;
- Kubernetes TLS secrets: ``tls.crt`` with ``tls.key``;
- by extension: ``NAME.crt`` or ``NAME.pem`` with ``NAME.key``.

Only pairs are checked: a certificate file with no key beside it is a CA
bundle or a chain for others, not something served; a key with no
certificate is not looked at either.
"""

from __future__ import annotations

import datetime
import itertools
import posixpath
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

PEM_CERT = b"-----BEGIN CERTIFICATE-----"
FIXED = {"fullchain.pem": "privkey.pem", "cert.pem": "privkey.pem", "tls.crt": "tls.key"}
SUFFIXES = {
    "-fullchain.pem": ("-key.pem",),
    "-cert.pem": ("-key.pem",),
    ".crt": (".key",),
    ".pem": (".key", "-key.pem"),  # the second: mkcert's NAME.pem + NAME-key.pem
}


@dataclass(frozen=True)
class Pair:
    cert: str  # path relative to the target
    key: str | None  # None: a certificate with no key beside it


def key_names(name: str) -> tuple[str, ...]:
    """The names the key of a certificate file may have, by the rules above, in order;
    () if the name is not a certificate's. (``privkey.pem`` maps to ``privkey.key``,
    which is never there, and a key holds no certificate: checking it finds nothing.)"""
    if name in FIXED:
        return (FIXED[name],)
    for suffix, key_suffixes in SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return tuple(name[: -len(suffix)] + key_suffix for key_suffix in key_suffixes)
    return ()


def cert_names(key_name: str) -> tuple[str, ...]:
    """The certificate names a key file's name can belong to (key_names reversed)."""
    found = [cert for cert, key in FIXED.items() if key == key_name]
    for suffix, key_suffixes in SUFFIXES.items():
        for key_suffix in key_suffixes:
            if key_name.endswith(key_suffix) and len(key_name) > len(key_suffix):
                found.append(key_name[: -len(key_suffix)] + suffix)
    return tuple(found)


def pairs(paths: Collection[str], present: Collection[str] | None = None) -> Iterator[Pair]:
    """Every file of ``paths`` whose name says certificate, with its key if the key is
    among ``present`` (default: ``paths``). Only names are looked at; whether it holds a
    certificate is the gate's business."""
    present = set(paths if present is None else present)
    for path in sorted(paths):
        directory, name = posixpath.split(path)
        names = key_names(name)
        if names:
            keys = [k for k in (posixpath.join(directory, n) for n in names) if k in present]
            yield Pair(path, keys[0] if keys else None)


def check(cert_pem: bytes, key_pem: bytes | None, now: datetime.datetime) -> str | None:
    """Why this certificate (and key) must not be served, or None if it may.

    The leaf (first certificate) must be within its dates; each certificate
    must be issued, and signed, by the next one; the key must be the leaf's.
    Bytes that hold no PEM certificate are not a certificate: None."""
    if PEM_CERT not in cert_pem:
        return None
    # Imported here: it costs about 10 MiB and 0.05 s, paid only where certificates are.
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as err:
        return f"cannot parse the certificate: {err}"
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        return f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
    if now > leaf.not_valid_after_utc:
        return f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, InvalidSignature):
            return f"chain out of order: certificate {i + 1} is not issued by certificate {i + 2}"
        except TypeError as err:  # an algorithm cryptography will not verify (MD5...)
            return f"certificate {i + 1}'s signature cannot be checked: {err}"
    if key_pem is None:
        return None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted (nginx's ssl_password_file): its match cannot be checked
        return None
    except ValueError as err:
        return f"cannot parse the key: {str(err).splitlines()[0]}"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    if ours != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        return "the key does not match the certificate"
    return None


def refusals(
    files: Mapping[str, bytes], changed: Collection[str], now: datetime.datetime
) -> dict[str, str]:
    """--verify-certs: for each pair a change touched, why it is refused ("cert + key": why).

    Only pairs: a certificate file with no key beside it is a CA bundle or a
    chain for others (150 unrelated roots are no chain), not something served."""
    found = {}
    candidates = set()  # the certificates of the changed paths: O(changed), not O(files)
    for path in changed:
        directory, name = posixpath.split(path)
        names = (name, *cert_names(name))  # a.pem may be a certificate, a-key.pem a key
        candidates |= {p for p in (posixpath.join(directory, n) for n in names) if p in files}
    for pair in pairs(candidates, files):
        if pair.key is None:
            continue
        try:
            why = check(files[pair.cert], files[pair.key], now)
        except Exception as err:  # cryptography's UnsupportedAlgorithm and the like
            why = f"cannot check it: {err}"
        if why is not None:
            found[f"{pair.cert} + {pair.key}"] = why
    return found


def not_after(value: bytes) -> float | None:
    """The leaf's expiry (Unix time) of a PEM certificate file; None if it holds none."""
    if PEM_CERT not in value:
        return None
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(value)[0].not_valid_after_utc.timestamp()
    except Exception:  # whatever is in etcd must not stop delivery
        return None


def leaf_der(value: bytes) -> bytes | None:
    """The leaf certificate of a PEM certificate file, as DER; None if it holds none."""
    if PEM_CERT not in value:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return x509.load_pem_x509_certificates(value)[0].public_bytes(Encoding.DER)
    except Exception:  # whatever is in etcd must not stop delivery
        return None


def describe(der: bytes) -> str:
    """A served certificate for a log line: subject and serial."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except Exception:  # what a server sends must not stop delivery either
        return "a certificate that cannot be parsed"
    return f"{cert.subject.rfc4514_string()!r} serial {cert.serial_number:#x}"
