"""Benchmark worker: records when it started (one JSON marker file per process), then idles.

Deliberately does not import torch, so the measured time is the launcher's, not the worker's imports.
Env: BENCH_MARKER_DIR (required), BENCH_WORKER_LIFETIME seconds to stay up (0 = exit at once; default 120).
The worker exits by itself when its parent (the agent) is gone, so a killed agent never leaves it behind.
"""

import json
import os
import time

started = time.time()
marker_dir = os.environ["BENCH_MARKER_DIR"]
record = {
    "t": started,
    "pid": os.getpid(),
    "rank": int(os.environ.get("RANK", "-1")),
    "group_rank": int(os.environ.get("GROUP_RANK", "-1")),
    "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "-1")),
    "world_size": int(os.environ.get("WORLD_SIZE", "-1")),
}
tmp = os.path.join(marker_dir, f".{os.getpid()}.tmp")
with open(tmp, "w") as f:
    json.dump(record, f)
os.rename(tmp, os.path.join(marker_dir, f"{os.getpid()}.json"))
print(f"worker-started rank={record['rank']}", flush=True)

lifetime = float(os.environ.get("BENCH_WORKER_LIFETIME", "120"))
parent = os.getppid()
deadline = started + lifetime
while time.time() < deadline and os.getppid() == parent:
    time.sleep(0.05)
