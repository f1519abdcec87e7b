"""Launcher benchmarks (real processes): failure -> recovery, and cold start. Ours vs torchrun, same script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks._harness import (
    REPO_ROOT,
    Unavailable,
    bench_env,
    free_port,
    kill_pids,
    module_available,
    python,
    ratio,
    run_side,
    spawn,
    stop_group,
    summarize,
    tail,
)

WORKER = str(REPO_ROOT / "benchmarks" / "scripts" / "marker_worker.py")
LAUNCHERS = {"ours": "elastic_impl.run", "upstream": "torch.distributed.run"}


def _read_markers(marker_dir: Path) -> list[dict]:
    markers = []
    for path in marker_dir.glob("*.json"):
        try:
            markers.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being renamed into place; picked up on the next poll
    return markers


def _launcher_cmd(side: str) -> list[str]:
    module = LAUNCHERS[side]
    reason = module_available(module)
    if reason:
        raise Unavailable(reason)
    return [python(), "-m", module]


def _wait_for(predicate, procs, deadline: float, what: str, logs: list[Path]):
    while True:
        value = predicate()
        if value:
            return value
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise Unavailable(f"launcher exited rc={proc.returncode} before {what}: {tail(log, 2)}")
        if time.time() > deadline:
            raise Unavailable(f"timed out waiting for {what}: {tail(logs[0], 2)}")
        time.sleep(0.02)


def recovery_trial(side: str, workdir: Path, nodes: int = 2, timeout: float = 90.0) -> float:
    """`nodes` agents x 2 workers (c10d on loopback; 1 node = --standalone); SIGKILL the highest-ranked worker;
    seconds until every worker of the new round runs."""
    world = 2 * nodes
    cmd = _launcher_cmd(side)
    marker_dir = Path(tempfile.mkdtemp(prefix=f"recovery-{side}-", dir=workdir))
    port = free_port()
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    env = bench_env({"BENCH_MARKER_DIR": str(marker_dir), "BENCH_WORKER_LIFETIME": str(timeout + 30)})
    agents, logs = [], []
    try:
        for node in range(nodes):
            log = marker_dir / f"agent{node}.log"
            topology = ["--standalone"] if nodes == 1 else [
                "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", run_id]
            agent_cmd = cmd + topology + [
                "--nproc-per-node", "2", "--max-restarts", "3", "--monitor-interval", "0.1", WORKER]
            agents.append(spawn(agent_cmd, env, log))
            logs.append(log)
        deadline = time.time() + timeout

        def first_round():
            markers = _read_markers(marker_dir)
            return markers if len({m["rank"] for m in markers}) >= world else None

        first = _wait_for(first_round, agents, deadline, f"{world} workers of the first round", logs)
        time.sleep(0.5)  # let both agents settle into their monitor loops
        victim = max(first, key=lambda m: m["rank"])
        t_kill = time.time()
        os.kill(victim["pid"], signal.SIGKILL)

        def second_round():
            fresh = {}
            for m in _read_markers(marker_dir):
                if m["t"] > t_kill and m["pid"] != victim["pid"]:
                    fresh.setdefault(m["rank"], m["t"])
            return fresh if len(fresh) >= world else None

        fresh = _wait_for(second_round, agents, deadline, f"{world} workers of the round after the kill", logs)
        return max(fresh.values()) - t_kill
    finally:
        for agent in agents:
            stop_group(agent, grace=5.0)
        kill_pids(m["pid"] for m in _read_markers(marker_dir))


def cold_start_trial(side: str, workdir: Path, timeout: float = 60.0) -> float:
    """`--standalone --nproc-per-node 2 script`: seconds from launch to the first worker running."""
    cmd = _launcher_cmd(side)
    marker_dir = Path(tempfile.mkdtemp(prefix=f"cold-{side}-", dir=workdir))
    env = bench_env({"BENCH_MARKER_DIR": str(marker_dir), "BENCH_WORKER_LIFETIME": "0"})
    log = marker_dir / "launcher.log"
    t0 = time.time()
    proc = spawn(cmd + ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", WORKER], env, log)
    try:
        markers = _wait_for(lambda: _read_markers(marker_dir), [proc], t0 + timeout, "the first worker", [log])
        first = min(m["t"] for m in markers) - t0
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"launcher did not exit within {timeout}s after its workers finished") from None
        if proc.returncode != 0:
            raise Unavailable(f"launcher exited rc={proc.returncode}: {tail(log, 2)}")
        return first
    finally:
        stop_group(proc, grace=2.0)
        kill_pids(m["pid"] for m in _read_markers(marker_dir))


def _compare(trial, repeats: int, workdir: Path) -> dict:
    """Interleave the two sides so that load drift on the shared machine hits both alike."""
    samples = {"ours": [], "upstream": []}
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for side in ("upstream", "ours"):
            if side in failed:
                continue
            outcome = run_side(lambda s=side: {"value": trial(s, workdir)})
            if "unavailable" in outcome:
                failed[side] = outcome["unavailable"]
            else:
                samples[side].append(outcome["value"])
    result = {}
    for side in ("ours", "upstream"):
        # One failed trial voids a side: a partly-failing launcher must not look fast.
        result[side] = {"unavailable": failed[side]} if side in failed else summarize(samples[side])
    result["ratio"] = ratio(result["ours"], result["upstream"])
    return result


def run_recovery(quick: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        repeats = 1 if quick else 5
        multi = _compare(recovery_trial, repeats, workdir)
        # The standalone case is a side measurement (the case is 2 x 2): 3 trials keep the run short.
        single = _compare(lambda side, wd: recovery_trial(side, wd, nodes=1), 1 if quick else 3, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "description": "2 agents x 2 workers, c10d on loopback (and 1 x 2 --standalone), monitor interval 0.1 s, "
                       "max-restarts 3: SIGKILL one worker -> every worker of the next round running (s)",
        "unit": "s", "target": "ours <= 0.5x torchrun",
        "cases": {"2x2 kill worker": multi, "1x2 standalone kill worker": single},
    }


def run_cold_start(quick: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    try:
        result = _compare(cold_start_trial, 1 if quick else 5, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "description": "--standalone --nproc-per-node 2: launch -> first worker running (s)",
        "unit": "s", "target": None,
        "cases": {"standalone 2 workers": result},
    }
