"""etcd source: one consistent read of the prefix, then its changes, revision by revision.

Built on the ``etcd3`` client's connection, authentication and generated gRPC
stubs. The watch stream is driven here rather than through ``etcd3``'s
Watcher so that (a) a cancelled or compacted watch is seen with etcd's own
reason, (b) another thread can cut a stuck stream (``interrupt``), and (c)
every failure keeps what etcd answered, which ``etcd3`` drops when it maps
gRPC errors onto its own exception classes.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import etcd3
import etcd3.etcdrpc as rpc
import grpc
from etcd3.etcdrpc import kv_pb2

from .config import Endpoint, EtcdConfig
from .events import Batch, Change, KeyValues
from .values import Value

log = logging.getLogger(__name__)

# Ask the server for a ping answer every 10 s and give up after 5 s more: a
# dead TCP connection is noticed in about 15 s instead of never. etcd refuses
# pings more often than every 5 s (--grpc-keepalive-min-time). With grpcio
# 1.8x the ping timeout that applies is http2.ping_timeout_ms (default 60 s).
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", -1),  # 1,000 values a page can pass 4 MiB
]
# etcd's WithRequireLeader: a member cut off from its cluster cancels the watch
# instead of keeping a stale one open.
REQUIRE_LEADER = (("hasleader", "true"),)
# A full read's pages: READ_PAGE keys first, then as many as make about
# READ_PAGE_BYTES of values, up to READ_PAGE_MOST. etcd 3.4 looks at every key
# from a page's start to the end of the prefix for each page (its index does not
# stop at the limit): 50,000 keys of 1 KiB in pages of 100 cost 2.6 s to read, of
# 250 1.4 s, of 1,000 0.9 s. But a page is in memory twice while it is read
# (protobuf, then Python objects) and the allocator keeps some of it: the peak at
# 10,000 keys was 47.4, 48.2, 48.9 and 49.9 MiB with pages of 100 and of 256 KiB,
# 512 KiB and 1 MiB. So 256 KiB: pages of big values stay small.
READ_PAGE = 100
READ_PAGE_MOST = 1000
READ_PAGE_BYTES = 256 * 1024
DELETE = kv_pb2.Event.DELETE


class EtcdUnavailable(Exception):
    """etcd could not be reached, or refused us. The message says what it answered."""


class Compacted(Exception):
    """The watch start revision was compacted away: read everything again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact_revision={compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class _Tls:
    root: bytes | None  # None: the system's CA bundle
    key: bytes | None
    chain: bytes | None


class _Client(etcd3.Etcd3Client):  # type: ignore[misc]
    """etcd3's client, taking PEM bytes instead of file names for TLS."""

    def _get_secure_creds(self, ca_cert: Any, cert_key: Any = None, cert_cert: Any = None) -> Any:
        tls: _Tls = ca_cert
        return grpc.ssl_channel_credentials(tls.root, tls.key, tls.chain)


def fetch_server_certificate(host: str, port: int, timeout: float) -> tuple[bytes, list[str]]:
    """The certificate a TLS server presents, unverified, and the names it is for.

    For ETCD_INSECURE_SKIP_VERIFY: gRPC cannot turn verification off, but it
    accepts any certificate as a trust anchor, so the server's own leaf is
    trusted on first use. A second handshake, verified against that leaf
    alone, reads its names (Python parses a certificate only when verified).
    """
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname = False
    plain.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout) as raw, plain.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    pem = ssl.DER_cert_to_PEM_cert(der)
    itself = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    itself.check_hostname = False
    itself.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    itself.load_verify_locations(cadata=pem)
    try:
        with socket.create_connection((host, port), timeout) as raw, itself.wrap_socket(raw) as tls:
            info: dict[str, Any] = dict(tls.getpeercert() or {})
    except ssl.SSLCertVerificationError as err:  # gRPC would refuse it the same way
        raise OSError(
            f"its certificate is unusable even with ETCD_INSECURE_SKIP_VERIFY "
            f"({err.verify_message}): gRPC always checks the validity dates"
        ) from None
    sans: list[tuple[str, str]] = list(info.get("subjectAltName", ()))
    subject: list[list[tuple[str, str]]] = [list(rdn) for rdn in info.get("subject", ())]
    names = [value for kind, value in sans if kind in ("DNS", "IP Address")]
    names += [value for rdn in subject for kind, value in rdn if kind == "commonName"]
    return pem.encode(), names


def describe(err: BaseException, endpoint: Endpoint | None = None) -> str:
    """What etcd or the network answered, in one line, without secrets."""
    where = f"{endpoint}: " if endpoint else ""
    if isinstance(err, grpc.RpcError):
        code = err.code()
        details = err.details()
        return f"{where}{code.name if code else 'UNKNOWN'}: {details}"
    return f"{where}{err}"


def next_page(keys: int, size: int) -> int:
    """The keys to ask for in the next page, after one of ``keys`` values of ``size`` bytes."""
    fit = READ_PAGE_BYTES * keys // max(size, 1)
    return max(READ_PAGE, min(READ_PAGE_MOST, fit))


def range_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdSource:
    """Reads and watches one prefix on the first endpoint that answers."""

    def __init__(self, config: EtcdConfig, prefix: bytes, timeout: float = 5.0) -> None:
        self.config = config
        self.prefix = prefix
        self.timeout = timeout
        self._index = 0
        self._client: _Client | None = None
        self._stream: Any = None
        self._interrupted = False  # interrupt() came while no stream was open
        self._reread = False  # everything is to be read again (see ask_reread)
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> Endpoint:
        return self.config.endpoints[self._index % len(self.config.endpoints)]

    def connect(self) -> None:
        """(Re)connect and authenticate; after a failure the next call tries the next endpoint."""
        self.close()
        endpoint = self.endpoint
        options = list(GRPC_OPTIONS)
        try:
            tls = self._tls(endpoint, options) if endpoint.tls else None
            self._client = _Client(
                host=endpoint.address,
                port=endpoint.port,
                ca_cert=tls,
                timeout=self.timeout,
                user=self.config.username,
                password=self.config.password,
                grpc_options=options,
            )
        except (grpc.RpcError, OSError) as err:
            self._index += 1
            raise EtcdUnavailable(describe(err, endpoint)) from None

    def _tls(self, endpoint: Endpoint, options: list[tuple[str, Any]]) -> _Tls:
        config = self.config
        if not config.insecure_skip_verify:
            return _Tls(config.server_ca, config.client_key, config.client_cert)
        root, names = fetch_server_certificate(endpoint.host, endpoint.port, self.timeout)
        log.warning(
            "ETCD_INSECURE_SKIP_VERIFY: trusting the certificate %s presents (for %s) "
            "WITHOUT verification",
            endpoint,
            ", ".join(names) or "no name",
        )
        if names and endpoint.host not in names:
            options.append(("grpc.ssl_target_name_override", names[0]))
        return _Tls(root, config.client_key, config.client_cert)

    def _fail(self, err: BaseException) -> EtcdUnavailable:
        """The error, and the next endpoint for the next try (not after our own cancel)."""
        endpoint = self.endpoint
        if not (isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.CANCELLED):
            self._index += 1
        return EtcdUnavailable(describe(err, endpoint))

    def read_all(
        self, keep: Callable[[list[bytes]], Sequence[Value]] = list
    ) -> tuple[int, KeyValues]:
        """Every key under the prefix and the one revision they are all at.

        Read in pages (see READ_PAGE), every page after the first pinned to
        the first one's revision, so the result is one consistent view while
        only one page is in memory twice (as protobuf and as Python objects).
        ``keep``: how a page's values are kept (``values.kept``: spooled).
        """
        client = self.connected_client()
        end = range_end(self.prefix)
        start, revision = self.prefix, 0
        items, limit = KeyValues(), READ_PAGE
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
            try:
                response = client.kvstub.Range(request, self.timeout, metadata=client.metadata)
            except grpc.RpcError as err:
                raise self._fail(err) from None
            revision = revision or int(response.header.revision)
            values = [kv.value for kv in response.kvs]
            limit = next_page(len(values), sum(map(len, values)))
            items.add([kv.key for kv in response.kvs], keep(values))
            del values  # as kept (spooled), not twice
            if not response.more or not response.kvs:
                return revision, items
            start = response.kvs[-1].key + b"\0"

    def probe(self, timeout: float) -> int:
        """A cheap read that proves the connection and the token still work; the revision.

        Safe to call from another thread while ``watch`` runs (gRPC channels
        are thread-safe); it does not move to another endpoint by itself.
        """
        client = self._client
        if client is None:
            raise EtcdUnavailable("not connected")
        request = rpc.RangeRequest(
            key=self.prefix, range_end=range_end(self.prefix), count_only=True
        )
        try:
            response = client.kvstub.Range(request, timeout, metadata=client.metadata)
        except (grpc.RpcError, ValueError) as err:  # ValueError: channel closed meanwhile
            raise EtcdUnavailable(describe(err, self.endpoint)) from None
        return int(response.header.revision)

    def watch(self, start_revision: int) -> Iterator[Batch]:
        """Yield the changes under the prefix from ``start_revision`` on, until an error.

        Every event of one transaction shares one revision and arrives in one
        watch response, so a Batch never splits a transaction.
        """
        client = self.connected_client()
        requests: queue.Queue[Any] = queue.Queue()
        create = rpc.WatchCreateRequest(
            key=self.prefix, range_end=range_end(self.prefix), start_revision=start_revision
        )
        requests.put(rpc.WatchRequest(create_request=create))
        stub = rpc.WatchStub(client.channel)
        metadata = tuple(client.metadata or ()) + REQUIRE_LEADER
        stream = stub.Watch(iter(requests.get, None), metadata=metadata)
        with self._lock:
            self._stream = stream
            if self._interrupted:  # asked to stop before the stream existed
                self._interrupted = False
                stream.cancel()
            elif self._reread:  # a full read is owed: this watch is no use
                stream.cancel()
        try:
            for response in stream:
                if response.compact_revision:
                    raise Compacted(response.compact_revision)
                if response.canceled:
                    raise EtcdUnavailable(
                        f"{self.endpoint}: watch cancelled by etcd: {response.cancel_reason}"
                    )
                if not response.events:
                    continue
                changes = [
                    Change(e.kv.key, None if e.type == DELETE else e.kv.value)
                    for e in response.events
                ]
                yield Batch(response.events[-1].kv.mod_revision, changes)
        except grpc.RpcError as err:
            raise self._fail(err) from None
        finally:
            with self._lock:
                if self._stream is stream:  # a newer watch may have registered already
                    self._stream = None
            requests.put(None)
            stream.cancel()
        raise EtcdUnavailable(f"{self.endpoint}: watch stream ended")

    def interrupt(self, move_on: bool = False, later: bool = True) -> None:
        """Cut the current watch stream, or (``later``) the next one if none is open.

        Safe from any thread. ``move_on``: the endpoint is unhealthy, the next
        connection goes to the next one.
        """
        with self._lock:
            if move_on:
                self._index += 1
            if self._stream is not None:
                self._stream.cancel()
            elif later:
                self._interrupted = True

    def ask_reread(self) -> None:
        """Everything is to be read again (safe from any thread): the watch is cut now,
        or as soon as one opens, until the session takes the request (``take_reread``)."""
        with self._lock:
            self._reread = True
            if self._stream is not None:
                self._stream.cancel()

    def take_reread(self) -> bool:
        """Whether everything was asked to be read again; the request is taken."""
        with self._lock:
            asked, self._reread = self._reread, False
        return asked

    def skip_endpoint(self) -> None:
        """The next connect() tries the next endpoint (this one failed a probe)."""
        self._index += 1

    def connected_client(self) -> _Client:
        """The client of the current connection (connecting first): its stubs and metadata."""
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
