"""A small training script for elastic-run / torchrun, controllable through the environment (used by the tests).

    elastic-run --standalone --nproc-per-node 2 examples/train.py

Environment knobs (all optional):
  MARKER_DIR              write one JSON marker per rank per attempt: the launcher env this worker saw
  TRAIN_ALLREDUCE=1       join a gloo process group and all-reduce a tensor (checks sum == WORLD_SIZE)
  TRAIN_ALLREDUCE=every_step  join a gloo group once and all-reduce (checking sum == WORLD_SIZE) at every step, so a
                          peer cut off mid-training hangs the collective until TRAIN_COLLECTIVE_TIMEOUT seconds
                          (the group's timeout; default gloo's 30 min) make it fail
  TRAIN_STEPS / TRAIN_STEP_SECONDS   "train" this many steps of this many seconds (default 1 step, 0 s)
  TRAIN_MIN_WORLD_SIZE    keep running (idle) until the launcher gives a WORLD_SIZE at least this big
  TRAIN_STOP_FILE         after the steps, keep "training" until this file exists, then finish successfully
  TRAIN_FAIL_RANK         global rank that fails ... (or TRAIN_FAIL_LOCAL_RANK: this local rank, on this node only)
  TRAIN_FAIL_ATTEMPT      ... on this TORCHELASTIC_RESTART_COUNT (default: every attempt)
  TRAIN_FAIL_MODE         raise (exception, error file via @record) | exit (sys.exit(3)) | kill (SIGKILL itself)
  TRAIN_FAIL_DELAY        seconds to run before failing (default 0); the failing rank writes death_rank<R>.json
  TRAIN_FAIL_AFTER_MARKERS=1  the failing rank first waits (up to 60 s) until every rank wrote its marker for this
                          attempt, so what the test compares does not depend on which worker started first
                          (wall time just before it fails) into MARKER_DIR
  TRAIN_IGNORE_SIGTERM=1  ignore SIGTERM (a worker stuck in native code), so only SIGKILL stops it
  TRAIN_TRAP_SIGTERM=1    catch SIGTERM, note it in MARKER_DIR (sigterm_pid<PID>.json) and keep running (a worker
                          still writing its checkpoint), so the agent must wait its grace and then SIGKILL it
  TRAIN_GRANDCHILD=1      start a grandchild process in its own session (its pid goes into the marker as
                          grandchild_pid), which a process-group kill of the worker alone does not reach
  TRAIN_NO_RECORD=1       run main without @record (no error file: the report must come from stderr)
  TRAIN_HANG_RANK         this global rank hangs inside timer.expires(after=TRAIN_EXPIRES seconds, default 1);
                          the agent's timer server (TORCHELASTIC_ENABLE_FILE_TIMER=1) must reap it
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

try:  # prefer our implementation; the script also runs where only upstream torch is importable
    from elastic_impl import timer
    from elastic_impl.multiprocessing.errors import record
except ImportError:  # pragma: no cover - exercised only without elastic_impl on the path
    from torch.distributed.elastic import timer
    from torch.distributed.elastic.multiprocessing.errors import record

CONTRACT_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
)


class InjectedFailure(RuntimeError):
    """The failure this script was asked to produce."""


def _write_marker(marker_dir: str, rank: int, attempt: int, extra: dict) -> None:
    os.makedirs(marker_dir, exist_ok=True)
    payload = {name: os.environ.get(name) for name in CONTRACT_VARS}
    payload.update(extra)
    payload["pid"] = os.getpid()
    name = f"attempt{attempt}_rank{rank}_ws{os.environ.get('WORLD_SIZE')}_pid{os.getpid()}.json"
    tmp = os.path.join(marker_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, os.path.join(marker_dir, name))  # atomic: readers never see half a marker


def _allreduce(world_size: int) -> float:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        t = torch.ones(1)
        dist.all_reduce(t)
        if int(t.item()) != world_size:
            raise RuntimeError(f"all_reduce gave {t.item()}, expected {world_size}")
        return float(t.item())
    finally:
        dist.destroy_process_group()


def _allreduce_every_step(world_size: int, steps: int, step_seconds: float) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    timeout = float(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT", "1800"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        for _ in range(steps):
            t = torch.ones(1)
            dist.all_reduce(t)
            if int(t.item()) != world_size:
                raise RuntimeError(f"all_reduce gave {t.item()}, expected {world_size}")
            time.sleep(step_seconds)
        return steps
    finally:
        dist.destroy_process_group()


def _write_json(marker_dir: str | None, name: str, payload: dict) -> None:
    if not marker_dir:
        return
    os.makedirs(marker_dir, exist_ok=True)
    tmp = os.path.join(marker_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, os.path.join(marker_dir, name))


def _start_grandchild() -> int:
    import subprocess

    # Its own session: a signal to the worker's process group does not reach it. "train.py" in its argv lets
    # the tests' cleanup recognise it.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "train.py-grandchild"], start_new_session=True
    )
    return proc.pid


def _trap_sigterm(marker_dir: str | None) -> None:
    def on_sigterm(signum, frame):
        _write_json(marker_dir, f"sigterm_pid{os.getpid()}.json", {"pid": os.getpid(), "at": time.time()})

    signal.signal(signal.SIGTERM, on_sigterm)


def _maybe_hang(rank: int) -> None:
    hang_rank = os.environ.get("TRAIN_HANG_RANK")
    if hang_rank is None or int(hang_rank) != rank:
        return
    timer_file = os.environ.get("TORCHELASTIC_TIMER_FILE")
    if not timer_file:
        raise RuntimeError("TRAIN_HANG_RANK needs the agent's timer server (TORCHELASTIC_TIMER_FILE is not set)")
    timer.configure(timer.FileTimerClient(timer_file))
    with timer.expires(after=float(os.environ.get("TRAIN_EXPIRES", "1"))):
        time.sleep(600)  # a hung step: only the timer server ends it


def _maybe_fail(rank: int, attempt: int) -> None:
    fail_rank = os.environ.get("TRAIN_FAIL_RANK")
    fail_local_rank = os.environ.get("TRAIN_FAIL_LOCAL_RANK")
    if fail_local_rank is not None:
        if int(fail_local_rank) != int(os.environ["LOCAL_RANK"]):
            return
    elif fail_rank is None or int(fail_rank) != rank:
        return
    fail_attempt = os.environ.get("TRAIN_FAIL_ATTEMPT")
    if fail_attempt is not None and int(fail_attempt) != attempt:
        return
    mode = os.environ.get("TRAIN_FAIL_MODE", "raise")
    marker_dir = os.environ.get("MARKER_DIR")
    if marker_dir and os.environ.get("TRAIN_FAIL_AFTER_MARKERS") == "1":
        world_size = int(os.environ["WORLD_SIZE"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len([n for n in os.listdir(marker_dir) if n.startswith(f"attempt{attempt}_")]) >= world_size:
                break
            time.sleep(0.05)
    time.sleep(float(os.environ.get("TRAIN_FAIL_DELAY", "0")))
    _write_json(os.environ.get("MARKER_DIR"), f"death_rank{rank}.json", {"rank": rank, "at": time.time()})
    if mode == "exit":
        sys.exit(3)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"injected failure on rank {rank} attempt {attempt}")


def main() -> None:
    marker_dir = os.environ.get("MARKER_DIR")
    if os.environ.get("TRAIN_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("TRAIN_TRAP_SIGTERM") == "1":
        _trap_sigterm(marker_dir)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    extra: dict = {}
    if os.environ.get("TRAIN_GRANDCHILD") == "1":
        extra["grandchild_pid"] = _start_grandchild()
    if marker_dir:
        _write_marker(marker_dir, rank, attempt, extra)

    min_world = int(os.environ.get("TRAIN_MIN_WORLD_SIZE", "0"))
    while world_size < min_world:
        time.sleep(0.2)  # idle until the agent re-forms a bigger group and restarts us

    # Fail before the collective so the peers see a broken group, as with a real crash mid-training.
    _maybe_fail(rank, attempt)
    _maybe_hang(rank)

    if os.environ.get("TRAIN_ALLREDUCE") == "1":
        extra["allreduce"] = _allreduce(world_size)

    steps = int(os.environ.get("TRAIN_STEPS", "1"))
    step_seconds = float(os.environ.get("TRAIN_STEP_SECONDS", "0"))
    if os.environ.get("TRAIN_ALLREDUCE") == "every_step":
        extra["allreduce_steps"] = _allreduce_every_step(world_size, steps, step_seconds)
    else:
        for _ in range(steps):
            time.sleep(step_seconds)
    stop_file = os.environ.get("TRAIN_STOP_FILE")
    while stop_file and not os.path.exists(stop_file):
        time.sleep(0.1)

    if marker_dir:
        extra["done"] = True
        _write_marker(marker_dir, rank, attempt, extra)
    print(f"rank {rank}/{world_size} attempt {attempt} done", flush=True)


if __name__ == "__main__":
    if os.environ.get("TRAIN_NO_RECORD") == "1":
        main()
    else:
        record(main)()
