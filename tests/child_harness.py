"""Runs the child supervisor alone (no etcd), as the dispenser does after the first sync.

Usage: python child_harness.py KILL_TIMEOUT -- CMD...
Exits with the supervisor's code.
"""

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
    sys.exit(supervisor.supervise(threading.Event()))
