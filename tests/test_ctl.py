"""etcd-config-ctl put: files into etcd in ONE transaction, byte for byte, against a real etcd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import EtcdServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etcd_config_dispenser.config import load
from etcd_config_dispenser.ctl import gaps, parse_items, put_exactly
from etcd_config_dispenser.source import EtcdSource

pytestmark = pytest.mark.integration

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def ctl(server: EtcdServer, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from etcd_config_dispenser.ctl import main; main()", *args],
        input=stdin.decode(), capture_output=True, text=True, timeout=30,
        env={**os.environ, "ETCD_ENDPOINTS": server.endpoint},
    )  # fmt: skip


def under(etcd: object, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every key under ``prefix``: its value and mod_revision."""
    return {
        meta.key.decode()[len(prefix) :]: (value, meta.mod_revision)
        for value, meta in etcd.get_prefix(prefix)  # type: ignore[attr-defined]
    }


def test_put_writes_every_file_exactly_in_one_revision(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "cert.pem").write_bytes(PEM)  # starts with "-----": etcdctl's trap
    (tmp_path / "key.pem").write_bytes(b"\x00binary\r\n\n\n")  # final newlines kept
    files = [f"cert.pem={tmp_path / 'cert.pem'}", f"live/key.pem={tmp_path / 'key.pem'}"]
    done = ctl(etcd_server, "put", f"--prefix={prefix}", *files, "stdin=-", stdin=b"from stdin\n")
    assert done.returncode == 0, done.stderr
    keys = under(etcd, prefix)
    assert {name: value for name, (value, _) in keys.items()} == {
        "cert.pem": PEM, "live/key.pem": b"\x00binary\r\n\n\n", "stdin": b"from stdin\n",
    }  # fmt: skip
    revisions = {revision for _, revision in keys.values()}
    assert len(revisions) == 1  # one transaction
    assert done.stdout == f"revision {revisions.pop()}: put 3\n"


def test_delete_others_leaves_exactly_these_names_and_nothing_beside_the_prefix(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path
) -> None:
    for name in ("old.pem", "dir/old", "cert.pem"):
        etcd.put(prefix + name, b"old")  # type: ignore[attr-defined]
    sibling = prefix.rstrip("/") + "-other/kept"  # shares the prefix's text, not its directory
    etcd.put(sibling, b"kept")  # type: ignore[attr-defined]
    (tmp_path / "c").write_bytes(PEM)
    done = ctl(etcd_server, "put", "-p", prefix, "--delete-others", f"cert.pem={tmp_path / 'c'}")
    assert done.returncode == 0, done.stderr
    keys = under(etcd, prefix)
    assert {name: value for name, (value, _) in keys.items()} == {"cert.pem": PEM}
    assert done.stdout == f"revision {keys['cert.pem'][1]}: put 1, deleted 2\n"
    assert etcd.get(sibling)[0] == b"kept"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command"),
        (["get"], "unknown command 'get'"),
        (["put", "a=F"], "--prefix is required"),
        (["put", "-p", "P"], "at least one NAME=FILE is required"),
        (["put", "-p", "P", "--bogus", "a=F"], "unknown option --bogus"),
        (["put", "-p", "P", "a"], "'a': expected NAME=FILE"),
        (["put", "-p", "P", "a=/nonexistent/file"], "/nonexistent/file: No such file"),
        (["put", "-p", "P", "../a=F"], "name '../a' has a '..' segment"),
        (["put", "-p", "P", "..data=F"], "name '..data' starts with '..'"),
        (["put", "-p", "P", "a//b=F"], "name 'a//b' has an empty segment"),
        (["put", "-p", "P", "a=F", "a=F"], "name 'a' is given twice"),
        (["put", "-p", "P", "a=F", "a/b=F"], "name 'a/b' is under 'a', which is a file too"),
        (["put", "-p", "P", "a=-", "b=-"], "'b=-': standard input is given twice"),
        (["put", "-p", "/", "--delete-others", "a=F"], "would delete every key of etcd"),
    ],
)
def test_bad_arguments_name_the_problem_exit_2_and_write_nothing(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path,
    args: list[str], message: str,
) -> None:  # fmt: skip
    (tmp_path / "F").write_bytes(b"x")
    args = [prefix if a == "P" else str(tmp_path / "F") if a == "F" else a for a in args]
    args = [a.replace("=F", f"={tmp_path / 'F'}") for a in args]
    done = ctl(etcd_server, *args)
    assert done.returncode == 2
    first = done.stderr.splitlines()[0]
    assert first.startswith("etcd-config-ctl: ") and message in first, done.stderr
    assert under(etcd, prefix) == {}


def test_etcd_down_exits_1_saying_nothing_was_written(tmp_path: Path) -> None:
    server = EtcdServer()  # never started: nobody listens on its port
    (tmp_path / "F").write_bytes(b"x")
    done = ctl(server, "put", "-p", "/p", f"a={tmp_path / 'F'}")
    assert done.returncode == 1
    assert done.stderr.startswith("etcd-config-ctl: nothing written: ")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_any_bytes_arrive_exactly(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path, values: list[bytes]
) -> None:
    files = {}
    for i, value in enumerate(values):
        (tmp_path / f"f{i}").write_bytes(value)
        files[f"k{i}"] = str(tmp_path / f"f{i}")
    source = EtcdSource(load({"ETCD_ENDPOINTS": etcd_server.endpoint}), prefix.encode())
    items = parse_items([f"{k}={f}" for k, f in files.items()], prefix.encode())
    try:
        put_exactly(source, items, delete_others=True)
    finally:
        source.close()
    keys = under(etcd, prefix)
    assert {k: v for k, (v, _) in keys.items()} == {f"k{i}": v for i, v in enumerate(values)}


def test_delete_others_never_keeps_a_key_added_while_it_listed(
    etcd_server: EtcdServer, etcd: object, prefix: str
) -> None:
    """Another writer adds keys all along; after each put, no key older than the
    transaction may remain besides ours (deleting what a listing found would miss a
    key added between the listing and the transaction)."""
    stop = threading.Event()

    def add_keys() -> None:
        client = etcd_server.client()
        n = 0
        while not stop.is_set():
            client.put(f"{prefix}intruder{n}", b"x")
            n += 1
            stop.wait(0.002)  # about as fast as a put-and-list: a race, not a flood
        client.close()

    writer = threading.Thread(target=add_keys)
    writer.start()
    source = EtcdSource(load({"ETCD_ENDPOINTS": etcd_server.endpoint}), prefix.encode())
    try:
        for _ in range(30):
            revision, _deleted = put_exactly(source, {prefix.encode() + b"mine": b"1"}, True)
            for _value, meta in etcd.get_prefix(prefix):  # type: ignore[attr-defined]
                if meta.key != prefix.encode() + b"mine":
                    assert meta.create_revision > revision, meta.key
    finally:
        stop.set()
        writer.join()
        source.close()


def test_the_next_endpoint_is_tried_when_one_does_not_answer(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "F").write_bytes(b"x")
    dead = EtcdServer()  # never started
    done = subprocess.run(
        [sys.executable, "-c", "from etcd_config_dispenser.ctl import main; main()",
         "put", "-p", prefix, f"a={tmp_path / 'F'}"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "ETCD_ENDPOINTS": f"{dead.endpoint},{etcd_server.endpoint}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert under(etcd, prefix)["a"][0] == b"x"


def test_etcd_limits_are_named_and_nothing_is_written(
    etcd_server: EtcdServer, etcd: object, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "F").write_bytes(b"x")
    names = [f"n{i}={tmp_path / 'F'}" for i in range(70)]  # 141 operations with the gaps
    done = ctl(etcd_server, "put", "-p", prefix, "--delete-others", *names)
    assert done.returncode == 1
    assert "too many operations" in done.stderr and "--max-txn-ops, default 128" in done.stderr
    (tmp_path / "big").write_bytes(b"x" * 2_000_000)
    done = ctl(etcd_server, "put", "-p", prefix, f"big={tmp_path / 'big'}")
    assert done.returncode == 1 and "--max-request-bytes" in done.stderr, done.stderr
    assert under(etcd, prefix) == {}


@settings(max_examples=300, deadline=None)
@given(
    names=st.sets(st.binary(min_size=1, max_size=3), min_size=1, max_size=6),
    others=st.sets(st.binary(min_size=1, max_size=3), max_size=10),
)
def test_the_gaps_cover_every_other_key_under_the_prefix_and_nothing_else(
    names: set[bytes], others: set[bytes]
) -> None:
    prefix = b"/p/"
    keys = {prefix + n for n in names}
    present = {prefix + o for o in others} | {b"/p", b"/p0", b"/q/x", b"/p/"[:-1] + b"\xff"}

    def deleted(key: bytes) -> bool:
        return any(start <= key < end for start, end in gaps(prefix, keys))

    assert {k for k in present | keys if not deleted(k)} == keys | {
        k for k in present if not k.startswith(prefix)
    }
