"""--verify-tls: proof that the reload took: the certificate the child serves is one of the
live snapshot's.

nginx keeps serving the old certificate when a reload fails (a bad include,
a key it cannot read) and only its error log says so. After the signal for
a change that touched a certificate, the dispenser handshakes with each
address given and compares the leaf certificate served, byte for byte, with
the leaves of the certificate files now live, retrying until a deadline
(the reload takes the child a moment). Trust is not the question here, so
the server's certificate is not verified; only compared.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import certs
from .values import readable

log = logging.getLogger(__name__)

RETRY_EVERY = 0.05  # seconds between handshakes while the reload is not seen yet


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    sni: str | None = None

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{where} ({self.sni})" if self.sni else where


def split_host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' (HOST may be empty, or [IPv6]) -> (host, port); raises ValueError.
    As --verify-tls and --health-addr both write it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_address(text: str) -> Address:
    """'HOST:PORT' or 'HOST:PORT,SNI'; raises ValueError."""
    where, _, sni = text.partition(",")
    try:
        host, port = split_host_port(where)
    except ValueError:
        host = ""
    if not host:
        raise ValueError(f"{text!r} is not HOST:PORT[,SNI]") from None
    try:
        sni.encode("idna")  # what ssl will do with it, at the first change otherwise
    except UnicodeError:
        raise ValueError(f"{text!r}: {sni!r} is not a host name") from None
    return Address(host, port, sni or None)


def served_leaf(address: Address, timeout: float) -> bytes | None:
    """The leaf certificate (DER) served at ``address``, or None if no handshake completes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # compared, not trusted
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        with sock, context.wrap_socket(sock, server_hostname=address.sni) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return None


def live_leaves(files: Mapping[str, bytes]) -> dict[bytes, str]:
    """Leaf certificate (DER) -> its path, for every certificate file of the snapshot."""
    found = {}
    for pair in certs.pairs(files):
        value = readable(files, pair.cert)
        der = certs.leaf_der(value) if value is not None else None
        if der is not None:
            found[der] = pair.cert
    return found


class TlsVerifier:
    """Waits until every address serves a certificate of the live snapshot."""

    def __init__(
        self,
        addresses: list[Address],
        timeout: float,
        fetch: Callable[[Address, float], bytes | None] = served_leaf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addresses = addresses
        self.timeout = timeout
        self.fetch = fetch
        self.clock = clock

    def verify(self, files: Mapping[str, bytes], revision: int) -> str | None:
        """None once every address serves a live certificate (logged); else why not."""
        leaves = live_leaves(files)
        deadline = self.clock() + self.timeout
        for address in self.addresses:
            while True:
                served = self.fetch(address, min(2.0, self.timeout))
                if served is not None and served in leaves:
                    log.info(
                        "r%d: %s serves %s (%s): the reload took",
                        revision,
                        address,
                        certs.describe(served),
                        leaves[served],
                    )
                    break
                if self.clock() >= deadline:
                    now = "no TLS handshake" if served is None else certs.describe(served)
                    return (
                        f"the reload did not take: {address} still serves {now}, not a "
                        f"certificate of r{revision}, {self.timeout:g}s after the signal"
                    )
                time.sleep(RETRY_EVERY)
        return None
