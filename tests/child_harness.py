"""Runs the child supervisor alone (no etcd), as the dispenser does after the first sync.

Usage: python child_harness.py KILL_TIMEOUT [hup-now] -- CMD...
Exits with the supervisor's code. With hup-now, sends SIGHUP as soon as the child
is spawned, as the sync loop would for a change right after the first snapshot.
"""

import signal
import sys
import threading

from etcd_config_dispenser.child import Supervisor, become_subreaper, block_signals

if __name__ == "__main__":
    kill_timeout = float(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    block_signals()
    become_subreaper()
    supervisor = Supervisor(command, {"PATH": "/usr/bin:/bin"}, kill_timeout)
    code = supervisor.spawn()
    if code is not None:
        sys.exit(code)
    if "hup-now" in sys.argv[: sys.argv.index("--")]:
        threading.Thread(target=supervisor.notify, args=(signal.SIGHUP,)).start()
    sys.exit(supervisor.supervise(threading.Event()))
