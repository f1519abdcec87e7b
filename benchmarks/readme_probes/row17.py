"""Row 17 under torch: node 1's agent breaks at its first restart (a LogsSpecs plugin raises); what does node 0 do."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tests.launcher.test_hostile_faults import _CRASHING_NODE, _WORKER  # noqa: E402 -- importable once REPO is on sys.path

tool = sys.argv[1]
d = tempfile.mkdtemp(prefix="row17_")
os.makedirs(d + "/markers")
open(d + "/worker.py", "w").write(_WORKER)
node = _CRASHING_NODE
if tool == "torchrun":
    node = (
        node.replace("from elastic_impl.launcher.api import", "from torch.distributed.launcher.api import")
        .replace("from elastic_impl.multiprocessing import", "from torch.distributed.elastic.multiprocessing import")
        .replace(
            "from elastic_impl.multiprocessing.errors import",
            "from torch.distributed.elastic.multiprocessing.errors import",
        )
        .replace("shutdown_timeout=3,", "")
    )
open(d + "/node.py", "w").write(node)
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
env = dict(
    os.environ,
    MARKER_DIR=d + "/markers",
    FAIL_RANKS="2",
    FAIL_DELAY="2",
    OK_SLEEP="8",
    ERROR_FILE_CONTENT=json.dumps(
        {"message": {"message": "boom", "extraInfo": {"py_callstack": "boom", "timestamp": "0"}}}
    ),
    PYTHONPATH=REPO,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
)
procs = [
    subprocess.Popen(
        [sys.executable, d + "/node.py", str(port), d + "/worker.py", f"{d}/logs{i}", "1" if i == 1 else "0"],
        stdout=open(f"{d}/n{i}.out", "w"),
        stderr=open(f"{d}/n{i}.err", "w"),
        env=env,
        cwd="/tmp",
    )
    for i in range(2)
]
t0 = time.monotonic()
res = []
for i, p in enumerate(procs):
    try:
        rc = p.wait(float(os.environ.get("WAIT", "90")))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = "timeout"
    res.append(
        {
            "rc": rc,
            "at_s": round(time.monotonic() - t0, 1),
            "succeeded_line": "NODE SUCCEEDED" in open(f"{d}/n{i}.out").read(),
            "plugin_bug_named": "plugin bug" in open(f"{d}/n{i}.err").read(),
        }
    )
print(json.dumps({"tool": tool, "nodes": res}))
