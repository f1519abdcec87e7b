"""Benchmark worker that does what a training script does first: import torch, join a gloo group, all-reduce.

Writes one JSON marker per process (BENCH_MARKER_DIR) with wall times: ``t_proc`` (the process was created, from
/proc, 10 ms resolution), ``t`` (first line of this script), ``t_imported`` (after ``import torch``), ``t_pg``
(after ``init_process_group``) and ``t_allreduce`` (after the first all-reduce returned). Then idles until
BENCH_WORKER_LIFETIME passes (0 = exit at once) or its agent is gone; it leaves the group cleanly on exit.
"""

import json
import os
import time

started = time.time()


def _process_created() -> float:
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    # btime in /proc/stat is whole seconds; the boot instant from uptime is good to its 10 ms ticks.
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


marker_dir = os.environ["BENCH_MARKER_DIR"]
record = {
    "t_proc": _process_created(),
    "t": started,
    "pid": os.getpid(),
    "rank": int(os.environ.get("RANK", "-1")),
    "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "-1")),
    "world_size": int(os.environ.get("WORLD_SIZE", "-1")),
}

import torch  # noqa: E402 - the import is what is being timed
import torch.distributed as dist  # noqa: E402

record["t_imported"] = time.time()
dist.init_process_group("gloo")
record["t_pg"] = time.time()
value = torch.ones(1)
dist.all_reduce(value)
record["t_allreduce"] = time.time()
record["sum"] = float(value.item())
tmp = os.path.join(marker_dir, f".{os.getpid()}.tmp")
with open(tmp, "w") as f:
    json.dump(record, f)
os.rename(tmp, os.path.join(marker_dir, f"{os.getpid()}.json"))
print(f"worker-allreduced rank={record['rank']} sum={record['sum']}", flush=True)

lifetime = float(os.environ.get("BENCH_WORKER_LIFETIME", "120"))
parent = os.getppid()
deadline = started + lifetime
while time.time() < deadline and os.getppid() == parent:
    time.sleep(0.05)
dist.destroy_process_group()
