"""Row 18, job end: a worker double-forks a setsid daemon and the job ends normally: is the daemon alive 1 s later."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from fault_injection.processes import is_alive  # noqa: E402 -- importable once REPO is on sys.path
from tests.launcher.test_hostile_faults import _DAEMONIZING_WORKER  # noqa: E402 -- importable once REPO is on sys.path

tool = sys.argv[1]
d = tempfile.mkdtemp(prefix="row18b_")
open(d + "/w.py", "w").write(_DAEMONIZING_WORKER)
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
env = dict(os.environ, DAEMON_PID_FILE=d + "/daemon.pid", PID_DIR=d, PYTHONPATH=REPO)
rc = subprocess.run(
    cmd + ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", d + "/w.py"],
    stdout=open(d + "/out", "w"),
    stderr=open(d + "/err", "w"),
    env=env,
    cwd="/tmp",
).returncode
daemon = int(open(d + "/daemon.pid").read())
time.sleep(1)
alive = is_alive(daemon)
try:
    os.kill(daemon, signal.SIGKILL)
except OSError:
    pass
print(json.dumps({"tool": tool, "rc": rc, "daemon_alive_1s_after_job_end": alive}))
