#!/usr/bin/env python3
"""The demo behind `make demo`: nginx's TLS certificate rotated through etcd, no restart.

1. A local etcd on free loopback ports, with a certificate and its key under
   /certificates, both in one transaction (as letsencrypt-with-etcd writes them).
2. etcd-config-dispenser as nginx's entrypoint; nginx serves TLS on a free port.
3. A new certificate is written to etcd: nginx serves it within moments, with
   the same master PID (reloaded by SIGHUP, not restarted).
Everything it started is stopped, and its files removed, at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.local import (  # the tests' own real etcd and nginx set-up
    CERT_NAME,
    KEY_NAME,
    EtcdServer,
    busy_wait,
    free_port,
    make_cert,
    nginx_command,
    same_cert,
    served_cert,
    txn_put,
    write_nginx_conf,
)

PREFIX = "/certificates/"


def say(text: str) -> None:
    """A heading; bold only on a terminal, never escape codes in a log file."""
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {text}{plain}", flush=True)


def show_served(port: int) -> None:
    """What a client sees, asked the way an operator would: openssl s_client."""
    hello = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "example.com"],
        input=b"", capture_output=True, timeout=10,
    )  # fmt: skip
    details = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-serial"],
        input=hello.stdout, capture_output=True, timeout=10,
    )  # fmt: skip
    for line in details.stdout.decode().splitlines():
        print(f"   openssl s_client: {line}")


def put_pair(client: object, cert: bytes, key: bytes) -> None:
    """Certificate and key in one transaction, as letsencrypt-with-etcd writes them."""
    txn_put(client, PREFIX, {CERT_NAME: cert, KEY_NAME: key})  # type: ignore[arg-type]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="etcd-config-dispenser-demo-"))
    server = EtcdServer()
    dispenser: subprocess.Popen[bytes] | None = None
    try:
        say(f"starting etcd on {server.endpoint}")
        server.start()
        client = server.client()
        first, second = make_cert("demo-1", work), make_cert("demo-2", work)
        say(f"writing certificate CN=demo-1 and its key to etcd under {PREFIX}, one transaction")
        put_pair(client, *first)

        port = free_port()
        nginx_dir, target = work / "nginx", work / "config"
        conf = write_nginx_conf(nginx_dir, port, target)
        command = [
            "etcd-config-dispenser", f"--prefix={PREFIX}", f"--target={target}",
            "--signal=SIGHUP", "--", *nginx_command(nginx_dir, conf),
        ]  # fmt: skip
        say("running: " + " ".join(command[:4]) + " -- nginx ...")
        dispenser = subprocess.Popen(command, env={**os.environ, "ETCD_ENDPOINTS": server.endpoint})
        busy_wait(lambda: same_cert(served_cert(port), first[0]), timeout=30)
        pid = int((nginx_dir / "nginx.pid").read_text())
        say(f"nginx serves TLS on 127.0.0.1:{port}, master PID {pid}")
        show_served(port)

        say(f"the files nginx reads, in {target}")
        live = os.readlink(target / "..data")
        notes = {live: "  (live: every key at one revision)", "..pool": "  (empty files, ready)"}
        for entry in sorted(os.listdir(target)):
            path = target / entry
            link = f" -> {os.readlink(path)}" if path.is_symlink() else "/"
            note = notes.get(entry, "  (spare copy, reused by a change)" if entry[2:3].isdigit()
                             else "")  # fmt: skip
            print(f"   {entry}{link}{note}")

        time.sleep(1.0)  # a change in nginx's first second would wait for it to settle
        say("rotating: certificate CN=demo-2 and its key written to etcd, one transaction")
        started = time.monotonic()
        put_pair(client, *second)
        busy_wait(lambda: same_cert(served_cert(port), second[0]), timeout=30, step=0.001)
        elapsed = (time.monotonic() - started) * 1000
        # Old workers finish what they were doing; new connections go to new ones.
        busy_wait(lambda: all(same_cert(served_cert(port), second[0]) for _ in range(5)))
        new_pid = int((nginx_dir / "nginx.pid").read_text())
        say(f"nginx serves the new certificate {elapsed:.0f} ms later, master PID {new_pid}")
        show_served(port)
        verdict = "same PID: reloaded, not restarted" if new_pid == pid else "PID CHANGED"
        print(f"   {verdict}")

        say("stopping: SIGTERM goes to the dispenser, which forwards it to nginx")
        dispenser.terminate()
        code = dispenser.wait(30)
        dispenser = None
        print(f"   dispenser exited with nginx's code: {code}")
        return 0 if new_pid == pid and code == 0 else 1
    finally:
        if dispenser is not None and dispenser.poll() is None:
            dispenser.kill()
            dispenser.wait()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
