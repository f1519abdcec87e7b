"""Issue 8.6: max_restarts is the JOB's budget, kept in the rendezvous state.

A node that leaves and comes back (a new agent process, same run id) starts from the job's restart count: its
workers see the same TORCHELASTIC_RESTART_COUNT as everyone else's, and its first failure is charged against what
is left of the job's budget. Upstream counts per agent process: the rejoined node's workers see 0 and it would get
a full fresh budget.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.beyond_upstream.conftest import (
    TRAIN,
    agent_args,
    needs_runtime,
    our_rdzv_state,
    read_markers,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_runtime]

CONF = {"elastic-run": "heartbeat=2,missed_heartbeats=5", "torchrun": "keep_alive_interval=2,keep_alive_max_attempt=5"}


def _new_group(markers, before: set, size: int = 4) -> list[dict]:
    """Markers of workers started after ``before`` (pids) in a group of ``size`` workers, once all are there."""
    new = [m for m in read_markers(markers) if m["pid"] not in before and m["WORLD_SIZE"] == str(size)]
    return new if len(new) >= size else []


def _scenario(launcher, tmp_path, store, tool, run_id, rejoin_env, measured):
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    # A failing rank fails only once all ranks of its attempt wrote their markers: otherwise a rank stopped before
    # writing one makes a group look incomplete and two attempts blur into one "group" (CI lost both races).
    common = dict(MARKER_DIR=markers, TRAIN_STOP_FILE=stop_file, TRAIN_FAIL_AFTER_MARKERS="1")
    args = [*agent_args(store.port, "1:2", run_id=run_id, max_restarts=1, conf=CONF[tool], tool=tool), TRAIN]
    # attempt 0: global rank 3 exits -> one restart, counted once for the job
    first = [launcher.start(args, tool=tool, name=f"{tool}-{i}", TRAIN_FAIL_RANK="3", TRAIN_FAIL_ATTEMPT="0",
                            **common) for i in range(2)]
    attempt0 = wait_for(lambda: _new_group(markers, set()), 240, "the first group of 4")
    restarted = wait_for(lambda: _new_group(markers, {m["pid"] for m in attempt0}), 240, "the restarted group of 4")
    counts = sorted(m["TORCHELASTIC_RESTART_COUNT"] for m in restarted)
    measured(f"budget.{tool}.restart_counts_after_one_failure", ",".join(counts), "(one per worker)")
    # one node leaves (SIGTERM) and a new agent process takes its place
    leaver = first[1]
    leaver.send_signal(signal.SIGTERM)
    launcher.wait(leaver, 60)
    before = {m["pid"] for m in read_markers(markers)}
    rejoined = launcher.start(args, tool=tool, name=f"{tool}-rejoined", **common, **rejoin_env)
    return first[0], rejoined, markers, stop_file, before, counts


def test_rejoined_node_shares_the_jobs_restart_count_and_budget(launcher, tmp_path, rdzv_store, measured):
    # the rejoined node's local rank 0 fails on the job's restart count 1: the budget (1) is spent -> job fails
    stayer, rejoined, markers, stop_file, before, first_counts = _scenario(
        launcher, tmp_path, rdzv_store, "elastic-run", "budget-ours",
        # (after 5 s: its peer rank must write its marker first; TRAIN_FAIL_AFTER_MARKERS cannot tell this group's
        # attempt-1 markers from the stopped group's before the rejoin)
        dict(TRAIN_FAIL_LOCAL_RANK="0", TRAIN_FAIL_ATTEMPT="1", TRAIN_FAIL_MODE="exit", TRAIN_FAIL_DELAY="5"), measured,
    )
    assert first_counts == ["1"] * 4, first_counts  # the same on both nodes, though only one node's worker failed
    new = wait_for(lambda: _new_group(markers, before), 240, "the re-formed group of 4 with the rejoined node")
    counts = sorted(m["TORCHELASTIC_RESTART_COUNT"] for m in new)
    measured("budget.elastic-run.restart_counts_with_rejoined_node", ",".join(counts), "(one per worker)")
    assert counts == ["1"] * 4, new
    codes = [launcher.wait(stayer, 180), launcher.wait(rejoined, 180)]
    assert all(c != 0 for c in codes), (codes, launcher.output(rejoined)[1][-3000:])
    err = launcher.output(rejoined)[1]
    assert "restart budget spent" in err or "Root Cause" in err, err[-3000:]
    state = our_rdzv_state(rdzv_store, "budget-ours")
    assert state.restart_count == 2 and state.closed, state


def test_torchrun_reference_rejoined_node_restart_count(launcher, tmp_path, rdzv_store, measured):
    stayer, rejoined, markers, stop_file, before, _ = _scenario(
        launcher, tmp_path, rdzv_store, "torchrun", "budget-torchrun", {}, measured
    )
    # Upstream's stayer notices the newcomer (a waiting node) and re-rendezvouses; whether a group of 4 forms at
    # all is part of the observation (bounded; the fixture's cleanup kills whatever is left).
    observe = 90
    deadline = time.monotonic() + observe
    new = []
    while time.monotonic() < deadline and not new and (stayer.poll() is None or rejoined.poll() is None):
        new = _new_group(markers, before)
        time.sleep(0.2)
    if new:
        counts = ",".join(sorted(m["TORCHELASTIC_RESTART_COUNT"] for m in new))
        measured("budget.torchrun.restart_counts_with_rejoined_node", counts, "(one per worker)")
    else:
        last_error = (launcher.output(stayer)[1].strip().splitlines() or [""])[-1]
        measured("budget.torchrun.restart_counts_with_rejoined_node",
                 f"no group re-formed within {observe} s; stayer rc={stayer.poll()}: {last_error[:160]}", "")
