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
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import etcd3.etcdrpc as rpc
import grpc
from docopt import DocoptExit, docopt

from . import __version__, config, rollout
from .cli import UsageError
from .keys import InvalidKey, KeyTree, key_to_relpath, normalise_prefix
from .source import EtcdSource, EtcdUnavailable, describe, range_end

PROG = "etcd-config-ctl"
USAGE = f"""{PROG}: write files into etcd in one transaction, for etcd-config-dispenser.

Usage:
  {PROG} put --prefix=PREFIX [--delete-others] NAME=FILE...
  {PROG} status --status-prefix=PREFIX
  {PROG} wait --status-prefix=PREFIX --revision=N [--min-instances=K]
                  [--timeout=SECS]
  {PROG} (-h | --help | --version)

Puts the bytes of each FILE (exactly: a final newline is kept) at the key
PREFIX/NAME, all of them in ONE etcd transaction, so a reader sees all of
them change at once: never a new certificate with an old key. FILE "-" is
standard input. NAME follows the dispenser's key rules (a/b makes directory
a; no "..", no leading ".."). Prints the revision of the transaction.

status: the instances of etcd-config-dispenser --status-prefix=PREFIX that
are alive, what each serves. wait: exit 0 once every live instance serves
revision N or later (and, if it verifies with --verify-tls, has verified
it and passed), with at least K of them; else, after the timeout, exit 1
naming those behind (3: etcd did not answer, retried until the timeout).
Publish, wait, and only then revoke the old certificate.

Options:
  -p, --prefix=PREFIX   etcd prefix, as given to the dispenser.
  --status-prefix=PREFIX
                        the dispensers' --status-prefix.
  --revision=N          the revision to wait for (put prints it).
  --min-instances=K     at least this many live instances [default: 1].
  --timeout=SECS        how long to wait [default: 60].
  --delete-others       also delete every other key under PREFIX, in the same
                        transaction: afterwards it holds exactly these names.
                        (2N+1 operations for N names: etcd's --max-txn-ops,
                        default 128, allows 63.)
  -h, --help            show this help.
  --version             show the version.

The etcd connection comes from the dispenser's environment variables
(ETCD_ENDPOINTS, ETCD_USERNAME, ETCD_PASSWORD, TLS; each with a _FILE form).
Exit status: 0 written; 1 etcd failed or refused, nothing written; 2 bad
arguments; 3 no answer to the transaction: it may or may not be written
(running the same command again is safe).
"""


def parse_items(words: list[str], prefix: bytes) -> dict[bytes, bytes]:
    """NAME=FILE words -> {key: bytes}, each name checked by the key rules, each file read."""
    items: dict[bytes, bytes] = {}
    stdin_used = False
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
        if path == "-" and stdin_used:
            raise UsageError(f"{word!r}: standard input is given twice")
        stdin_used = stdin_used or path == "-"
        try:
            items[key] = sys.stdin.buffer.read() if path == "-" else _read(path)
        except OSError as err:
            raise UsageError(f"{path}: {err.strerror or err}") from None
    tree = KeyTree()
    for key in items:
        tree.put(key_to_relpath(key, prefix), b"")
    for path, shadow in tree.hidden():  # the dispenser could write only one of them
        raise UsageError(f"name {path!r} is under {shadow!r}, which is a file too")
    return items


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


class Unknown(Exception):
    """The transaction was sent and no answer came: it may or may not have been applied."""


# gRPC codes with which etcd refused the request: certainly not applied.
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
HINTS = {  # etcd's limits, named in the message
    "too many operations in txn request": "etcd's --max-txn-ops, default 128",
    "request is too large": "etcd's --max-request-bytes, default 1.5 MiB",
    "received message larger than max": "etcd's --max-request-bytes, default 1.5 MiB",
}


def gaps(prefix: bytes, keys: Collection[bytes]) -> list[tuple[bytes, bytes]]:
    """The ranges under ``prefix`` that hold none of ``keys``: deleting them all deletes
    every other key, in the same transaction as the puts (etcd refuses a delete range
    that overlaps a put), with no listing and so no race with other writers."""
    ranges, start = [], prefix
    for key in sorted(keys):
        if start < key:
            ranges.append((start, key))
        start = key + b"\0"
    ranges.append((start, range_end(prefix)))
    return ranges


def put_exactly(
    source: EtcdSource, items: Mapping[bytes, bytes], delete_others: bool
) -> tuple[int, int]:
    """Write ``items`` in one transaction; its revision and how many keys it deleted.

    The endpoints are tried in turn with a cheap read first; the transaction
    itself is sent once: if no answer comes, raise Unknown (never "nothing
    written" when it may have been).
    """
    for _endpoint in source.config.endpoints:
        try:
            source.connect()
            source.probe(source.timeout)
            break
        except EtcdUnavailable as err:
            failure = err
            source.skip_endpoint()
    else:
        raise failure
    client = source.connected_client()
    ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in items.items()]
    if delete_others:
        ops += [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=start, range_end=end))
            for start, end in gaps(source.prefix, items)
        ]
    request = rpc.TxnRequest(compare=[], success=ops, failure=[])
    try:
        response = client.kvstub.Txn(request, source.timeout, metadata=client.metadata)
    except grpc.RpcError as err:
        text = describe(err, source.endpoint)
        hint = next((h for words, h in HINTS.items() if words in text), None)
        text += f" ({hint}; {len(ops)} operations, {request.ByteSize()} bytes)" if hint else ""
        if err.code() in REFUSED:
            raise EtcdUnavailable(text) from None
        raise Unknown(text) from None
    deleted = sum(r.response_delete_range.deleted for r in response.responses)
    return int(response.header.revision), deleted


COMMANDS = {  # command -> (its options, the required ones)
    "put": (("-p", "--prefix", "--delete-others"), ("--prefix",)),
    "status": (("--status-prefix",), ("--status-prefix",)),
    "wait": (
        ("--status-prefix", "--revision", "--min-instances", "--timeout"),
        ("--status-prefix", "--revision"),
    ),
}


def _what_is_wrong(words: list[str]) -> str:
    """One line for a command line docopt refused (its own message names no flag)."""
    if not words or words[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        return f"unknown command {words[0]!r}: one of {known}" if words else "no command"
    allowed, required = COMMANDS[words[0]]
    for word in words[1:]:
        flag = word.partition("=")[0]
        if flag.startswith("-") and flag not in allowed:
            return f"unknown option {flag} for {words[0]}"
    for flag in required:
        short = "-p" if flag == "--prefix" else flag
        if not any(w.startswith((flag, short)) for w in words):
            return f"{flag} is required"
    return "at least one NAME=FILE is required"


def rollout_command(args: dict[str, Any]) -> None:
    """status and wait."""
    try:
        etcd = config.load(os.environ)
        revision = int(args["--revision"]) if args["wait"] else 0
        least, timeout = int(args["--min-instances"]), float(args["--timeout"])
    except config.ConfigError as err:
        fail(str(err), 2)
    except ValueError as err:
        fail(f"--revision, --min-instances, --timeout: {err}", 2)
    if (args["wait"] and revision < 1) or least < 1 or not timeout > 0:
        fail("--revision and --min-instances must be at least 1, --timeout more than 0", 2)
    source = EtcdSource(etcd, normalise_prefix(args["--status-prefix"]))
    try:
        if args["status"]:
            print(rollout.table(rollout.read(source)))
            return
        missing = rollout.wait(source, revision, least, timeout)
    except Exception as err:  # etcd3 maps gRPC errors to its own classes; Unreadable
        fail(f"cannot read the status keys: {err}", 3)
    finally:
        source.close()
    if missing:
        fail(f"not every instance serves r{revision} after {timeout:g}s: {'; '.join(missing)}", 1)
    print(f"every live instance serves r{revision} or later")


def fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(USAGE, argv=words, version=__version__)
    except DocoptExit:
        fail(f"{_what_is_wrong(words)}\n{USAGE.split(chr(10) * 2)[1]}", 2)
    if args["status"] or args["wait"]:
        rollout_command(args)
        return
    prefix = normalise_prefix(args["--prefix"])
    if prefix == b"/" and args["--delete-others"]:
        fail("--prefix=/ with --delete-others would delete every key of etcd: refused", 2)
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
    except Unknown as err:
        fail(f"no answer, so it may or may not be written (running it again is safe): {err}", 3)
    finally:
        source.close()
    gone = f", deleted {deleted}" if deleted else ""
    print(f"revision {revision}: put {len(items)}{gone}")
