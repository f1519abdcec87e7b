"""Issue 8.5: a worker's exit is noticed at once (pidfd/sentinel), not at the next monitor_interval tick; a node
whose workers succeeded does not sit out the exit barrier when the job already failed elsewhere.

Upstream's agent sleeps monitor_interval between checks, so with ``--monitor-interval 10`` and a worker that dies
1 s after it starts, torchrun notices ~9 s later. Its exit barrier waits up to 300 s for nodes that already failed.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.beyond_upstream.conftest import TRAIN, agent_args, needs_runtime, read_events, wait_for

pytestmark = [pytest.mark.slow, needs_runtime]

MONITOR_INTERVAL = 10.0


def _death_time(markers) -> float:
    with open(markers / "death_rank1.json") as f:
        return json.load(f)["at"]


@pytest.mark.parametrize("tool", ["elastic-run", "torchrun"])
def test_worker_death_noticed_without_waiting_for_the_monitor_interval(launcher, tmp_path, tool, measured):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    events = tmp_path / "events.jsonl"
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
            "--monitor-interval", str(MONITOR_INTERVAL), TRAIN]
    proc = launcher.start(args, tool=tool, name=tool, MARKER_DIR=markers, ELASTIC_IMPL_EVENTS_FILE=events,
                          TRAIN_FAIL_RANK="1", TRAIN_FAIL_MODE="kill", TRAIN_FAIL_DELAY="1",
                          TRAIN_STEPS="100000", TRAIN_STEP_SECONDS="0.1")
    rc = launcher.wait(proc, 180)
    exited = time.time()
    assert rc == 1, launcher.output(proc)[1][-3000:]
    died = _death_time(markers)
    measured(f"detect.{tool}.death_to_launcher_exit", exited - died)
    if tool == "elastic-run":
        failed = next(e for e in read_events(events) if e["name"] == "agent.worker_failed")
        noticed = failed["timestamp"] / 1000 - died
        measured("detect.ours.death_to_agent_noticed", noticed)
        # A polling loop notices ~monitor_interval - 1 s after the death; event-driven is far below half of it.
        assert noticed < MONITOR_INTERVAL / 2, f"noticed after {noticed:.2f}s with monitor_interval {MONITOR_INTERVAL}"


@pytest.mark.parametrize("tool", ["elastic-run", "torchrun"])
def test_exit_barrier_skipped_when_the_job_failed(launcher, tmp_path, rdzv_store, tool, measured):
    """Node A's workers finish at once; node B's rank fails 2 s later (max_restarts 0): A must not wait 300 s."""
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    conf = "heartbeat=2,missed_heartbeats=5" if tool == "elastic-run" else "keep_alive_interval=2,keep_alive_max_attempt=5"
    env = dict(MARKER_DIR=markers, TRAIN_FAIL_RANK="2", TRAIN_FAIL_MODE="exit", TRAIN_FAIL_DELAY="2")
    agents = [
        launcher.start([*agent_args(rdzv_store.port, "2", run_id=f"barrier-{tool}", conf=conf, tool=tool), TRAIN],
                       tool=tool, name=f"{tool}-{i}", **env)
        for i in range(2)
    ]
    # Start-up (two agents, four workers) takes long on a loaded machine: observe from the failure on.
    death_marker = markers / "death_rank2.json"
    wait_for(death_marker.exists, 240, "rank 2 to fail")
    with open(death_marker) as f:
        died = json.load(f)["at"]
    observe = 30
    while time.time() < died + observe and any(a.poll() is None for a in agents):
        time.sleep(0.1)
    ended = time.time()
    still_running = [a for a in agents if a.poll() is None]
    measured(
        f"exit_barrier.{tool}.last_node_exit_after_failure",
        f"not within {observe}" if still_running else round(ended - died, 2),
        "s (still in the exit barrier)" if still_running else "s",
    )
    if tool == "elastic-run":
        assert not still_running, [launcher.output(a)[1][-2000:] for a in still_running]
