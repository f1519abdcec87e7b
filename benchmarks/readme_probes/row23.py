"""Row 23 under a launcher: etcd SIGSTOPped 20 s mid-job, 2 nodes (--nnodes 1:2, 1 worker each): worker restarts?"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from fault_injection.store import EtcdStoreServer  # noqa: E402 -- importable once REPO is on sys.path
from tests.launcher.conftest import TRAIN, marker_pids, read_markers  # noqa: E402 -- importable once REPO is on sys.path

tool, backend = sys.argv[1], sys.argv[2]
d = tempfile.mkdtemp(prefix="row23_")
os.makedirs(d + "/markers")
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
server = EtcdStoreServer().start()
try:
    env = dict(os.environ, MARKER_DIR=d + "/markers", TRAIN_STOP_FILE=d + "/stop", PYTHONPATH=REPO)
    args = [
        "--nnodes",
        "1:2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        backend,
        "--rdzv-endpoint",
        server.endpoint,
        "--rdzv-id",
        f"stall-{backend}",
        "--max-restarts",
        "3",
        TRAIN,
    ]
    nodes = [
        subprocess.Popen(
            cmd + args,
            stdout=open(f"{d}/n{i}.out", "w"),
            stderr=open(f"{d}/n{i}.err", "w"),
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        for i in range(2)
    ]
    t0 = time.monotonic()
    while len([m for m in read_markers(d + "/markers") if m["WORLD_SIZE"] == "2"]) < 2:
        assert time.monotonic() - t0 < 120, "no group of 2"
        time.sleep(0.2)
    before = marker_pids(d + "/markers")
    os.kill(server.pid, signal.SIGSTOP)
    time.sleep(20)
    os.kill(server.pid, signal.SIGCONT)
    time.sleep(20)
    restarted = len(marker_pids(d + "/markers") - before)
    alive = [n.poll() is None for n in nodes]
    open(d + "/stop", "w").write("done")
    codes = []
    for n in nodes:
        try:
            codes.append(n.wait(120))
        except subprocess.TimeoutExpired:
            os.killpg(n.pid, signal.SIGKILL)
            codes.append("timeout")
    print(
        json.dumps(
            {
                "tool": tool,
                "backend": backend,
                "new_worker_starts_after_freeze": restarted,
                "alive_40s_after": alive,
                "codes": codes,
            }
        )
    )
finally:
    try:
        os.kill(server.pid, signal.SIGCONT)
    except Exception:
        pass
    server.close()
