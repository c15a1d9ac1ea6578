"""etcd-config-ctl: write files into etcd in ONE transaction, the dispenser's other half.

A certificate and its key must change together: written as two puts, a
reader may see the new certificate with the old key (nginx then fails to
reload). ``etcdctl txn`` can do it, but its quoting is a trap for PEM values
(a value starting with "-----" is read as a flag, and ``"$(cat f)"`` drops
the final newline). This command takes files, byte for byte.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NoReturn

import etcd3.etcdrpc as rpc
import grpc
from docopt import DocoptExit, docopt

from . import __version__, config
from .keys import InvalidKey, key_to_relpath, normalise_prefix
from .source import EtcdSource, EtcdUnavailable, describe, range_end

PROG = "etcd-config-ctl"
USAGE = f"""{PROG}: write files into etcd in one transaction, for etcd-config-dispenser.

Usage:
  {PROG} put --prefix=PREFIX [--delete-others] NAME=FILE...
  {PROG} (-h | --help | --version)

Puts the bytes of each FILE (exactly: a final newline is kept) at the key
PREFIX/NAME, all of them in ONE etcd transaction, so a reader sees all of
them change at once: never a new certificate with an old key. FILE "-" is
standard input. NAME follows the dispenser's key rules (a/b makes directory
a; no "..", no leading ".."). Prints the revision of the transaction.

Options:
  -p, --prefix=PREFIX   etcd prefix, as given to the dispenser.
  --delete-others       also delete every other key under PREFIX, in the same
                        transaction: afterwards it holds exactly these names.
  -h, --help            show this help.
  --version             show the version.

The etcd connection comes from the dispenser's environment variables
(ETCD_ENDPOINTS, ETCD_USERNAME, ETCD_PASSWORD, TLS; each with a _FILE form).
Exit status: 0 written, 1 etcd failed (nothing written), 2 bad arguments.
"""
ATTEMPTS = 5  # --delete-others: tries while other writers keep adding keys


class UsageError(ValueError):
    pass


def parse_items(words: list[str], prefix: bytes) -> dict[bytes, bytes]:
    """NAME=FILE words -> {key: bytes}, each name checked by the key rules, each file read."""
    items: dict[bytes, bytes] = {}
    for word in words:
        name, sep, path = word.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{word!r}: expected NAME=FILE")
        key = prefix + name.encode("utf-8", "surrogateescape")
        try:
            key_to_relpath(key, prefix)
        except InvalidKey as err:
            raise UsageError(f"name {name!r} {err}") from None
        if key in items:
            raise UsageError(f"name {name!r} is given twice")
        try:
            items[key] = sys.stdin.buffer.read() if path == "-" else _read(path)
        except OSError as err:
            raise UsageError(f"{path}: {err.strerror or err}") from None
    return items


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def put_exactly(
    source: EtcdSource, items: Mapping[bytes, bytes], delete_others: bool
) -> tuple[int, list[bytes]]:
    """Write ``items`` in one transaction; the revision and the keys deleted.

    With ``delete_others``, the keys under the prefix are listed at revision R
    and the transaction is guarded by "every key under the prefix was created
    at or before R" (one compare over the whole range): a key another writer
    created in between fails it, and it is tried again from a new listing.
    (A key changed or deleted in between needs no guard: it is overwritten or
    deleted all the same.)
    """
    client = source.connected_client()
    prefix, end = source.prefix, range_end(source.prefix)
    puts = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in items.items()]
    for _attempt in range(ATTEMPTS):
        compare, doomed = [], []
        if delete_others:
            listing = client.kvstub.Range(
                rpc.RangeRequest(key=prefix, range_end=end, keys_only=True),
                source.timeout,
                metadata=client.metadata,
            )
            seen = int(listing.header.revision)
            doomed = [kv.key for kv in listing.kvs if kv.key not in items]
            compare = [
                rpc.Compare(
                    key=prefix,
                    range_end=end,
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.LESS,
                    create_revision=seen + 1,
                )
            ]
        deletes = [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)) for k in doomed
        ]
        response = client.kvstub.Txn(
            rpc.TxnRequest(compare=compare, success=puts + deletes, failure=[]),
            source.timeout,
            metadata=client.metadata,
        )
        if response.succeeded:
            return int(response.header.revision), doomed
    raise EtcdUnavailable(f"keys kept being added under the prefix; tried {ATTEMPTS} times")


def _what_is_wrong(words: list[str]) -> str:
    """One line for a command line docopt refused (its own message names no flag)."""
    if not words or words[0] != "put":
        return f"unknown command {words[0]!r}: the command is put" if words else "no command"
    for word in words[1:]:
        flag = word.partition("=")[0]
        if flag.startswith("-") and flag not in ("-p", "--prefix", "--delete-others"):
            return f"unknown option {flag}"
    if not any(w.startswith(("-p", "--prefix")) for w in words):
        return "--prefix is required"
    return "at least one NAME=FILE is required"


def fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(USAGE, argv=words, version=__version__)
    except DocoptExit:
        fail(f"{_what_is_wrong(words)}\n{USAGE.split(chr(10) * 2)[1]}", 2)
    prefix = normalise_prefix(args["--prefix"])
    if prefix == b"/" and args["--prefix"] != "/":
        fail("--prefix: must not be empty", 2)
    try:
        items = parse_items(args["NAME=FILE"], prefix)
        etcd = config.load(os.environ)
    except (UsageError, config.ConfigError) as err:
        fail(str(err), 2)
    source = EtcdSource(etcd, prefix)
    try:
        revision, deleted = put_exactly(source, items, args["--delete-others"])
    except EtcdUnavailable as err:
        fail(f"nothing written: {err}", 1)
    except grpc.RpcError as err:
        fail(f"nothing written: {describe(err, source.endpoint)}", 1)
    finally:
        source.close()
    gone = f", deleted {len(deleted)}" if deleted else ""
    print(f"revision {revision}: put {len(items)}{gone}")
