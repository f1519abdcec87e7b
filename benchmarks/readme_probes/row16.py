"""Row 16 under a launcher: 2 nodes x 2 workers, c10d; rank 2 writes ERROR_FILE_CONTENT to its error file, exits 1."""

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tests.launcher.test_hostile_faults import _WORKER  # noqa: E402 -- importable once REPO is on sys.path

tool, content = sys.argv[1], sys.argv[2]
d = tempfile.mkdtemp(prefix="row16_")
os.makedirs(d + "/markers")
open(d + "/worker.py", "w").write(_WORKER)
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
env = dict(
    os.environ,
    MARKER_DIR=d + "/markers",
    FAIL_RANKS="2",
    FAIL_DELAY="2",
    OK_SLEEP="8",
    ERROR_FILE_CONTENT=content,
    PYTHONPATH=REPO,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
)
procs = []
t0 = time.monotonic()
for i in range(2):
    args = [
        "--nnodes",
        "2:2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "hostile",
        "--rdzv-conf",
        "join_timeout=60,last_call_timeout=1,close_timeout=10",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        "--log-dir",
        f"{d}/logs{i}",
        "--redirects",
        "3",
        d + "/worker.py",
    ]
    procs.append(
        subprocess.Popen(
            cmd + args, stdout=open(f"{d}/a{i}.out", "w"), stderr=open(f"{d}/a{i}.err", "w"), env=env, cwd="/tmp"
        )
    )
codes = []
for p in procs:
    try:
        codes.append(p.wait(float(os.environ.get("WAIT", "120"))))
    except subprocess.TimeoutExpired:
        p.kill()
        codes.append("timeout")
attempts = sorted({json.load(open(p))["attempt"] for p in glob.glob(d + "/markers/attempt*_rank2_*.json")})
errs = [open(f"{d}/a{i}.err").read() for i in range(2)]
print(
    json.dumps(
        {
            "tool": tool,
            "content": content,
            "codes": codes,
            "rank2_attempts": attempts,
            "secs": round(time.monotonic() - t0, 1),
            "exceptions": [
                sorted(
                    {
                        line.split(":")[0].strip()
                        for line in e.splitlines()
                        if line.strip().endswith("Error") or "Error:" in line and not line.startswith(" ")
                    }
                )[:4]
                for e in errs
            ],
        }
    )
)
