"""Row 18: a worker double-forks a setsid daemon; the agent alone is SIGKILLed. Who is alive 5 s later, and when did each die."""

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
d = tempfile.mkdtemp(prefix="row18_")
open(d + "/w.py", "w").write(_DAEMONIZING_WORKER)
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
env = dict(os.environ, DAEMON_PID_FILE=d + "/daemon.pid", PID_DIR=d, WORKER_SLEEP="600", PYTHONPATH=REPO)
agent = subprocess.Popen(
    cmd + ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", d + "/w.py"],
    stdout=open(d + "/out", "w"),
    stderr=open(d + "/err", "w"),
    env=env,
    start_new_session=True,
    cwd="/tmp",
)
files = [d + "/worker0", d + "/worker1", d + "/daemon.pid"]
while not all(os.path.exists(f) and open(f).read() for f in files):
    time.sleep(0.05)
pids = {name: int(open(f).read()) for name, f in zip(["worker0", "worker1", "daemon"], files, strict=True)}
agent.kill()
t0 = time.monotonic()
agent.wait()
died = {}
while time.monotonic() - t0 < 5 and len(died) < 3:
    for n, p in pids.items():
        if n not in died and not is_alive(p):
            died[n] = round(time.monotonic() - t0, 3)
    time.sleep(0.005)
alive = [n for n in pids if n not in died]
for p in pids.values():
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
print(json.dumps({"tool": tool, "died_after_s": died, "alive_after_5s": alive}))
