"""Row 19: membership restart (a node joins a running 1:2 job) under a launcher: what is left of the first start's files."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tests.launcher.test_hostile_faults import _TRACING_WORKER  # noqa: E402 -- importable once REPO is on sys.path

tool = sys.argv[1]
d = tempfile.mkdtemp(prefix="row19_")
os.makedirs(d + "/markers")
open(d + "/w.py", "w").write(_TRACING_WORKER)
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
env = dict(os.environ, MARKER_DIR=d + "/markers", RELEASE_FILE=d + "/release", PYTHONPATH=REPO)


def start(name):
    args = [
        "--nnodes",
        "1:2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "membership",
        "--rdzv-conf",
        "join_timeout=60,last_call_timeout=1,close_timeout=10",
        "--monitor-interval",
        "0.1",
        "--log-dir",
        f"{d}/logs_{name}",
        "--redirects",
        "3",
        d + "/w.py",
    ]
    return subprocess.Popen(
        cmd + args,
        stdout=open(f"{d}/{name}.out", "w"),
        stderr=open(f"{d}/{name}.err", "w"),
        env=env,
        cwd="/tmp",
        start_new_session=True,
    )


def markers():
    return [json.load(open(p)) for p in glob.glob(d + "/markers/*.json")]


def wait(pred, t):
    end = time.monotonic() + t
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


host = start("host")
assert wait(lambda: len(markers()) == 2, 60)
joiner = start("joiner")
ok = wait(lambda: sum(m["WORLD_SIZE"] == "4" for m in markers()) == 4, 60)
open(d + "/release", "w").close()
codes = []
for p in (host, joiner):
    try:
        codes.append(p.wait(60))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        codes.append("timeout")
host_starts = [m for m in markers() if "/logs_host/" in m["folder"]]
kept = {}
for m in host_starts:
    f = m["folder"]

    def has(name, text, f=f):
        try:
            return text in open(os.path.join(f, name)).read()
        except OSError:
            return False

    kept[m["tag"]] = {
        "stdout": has("stdout.log", f"stdout of {m['tag']}"),
        "stderr": has("stderr.log", f"stderr of {m['tag']}"),
        "own.txt": has("own.txt", m["tag"]),
        "error.json": has("error.json", m["tag"]),
        "folder": f.split("logs_host/")[1],
    }
print(json.dumps({"tool": tool, "reformed_at_4": ok, "codes": codes, "host_starts": kept}, indent=1))
