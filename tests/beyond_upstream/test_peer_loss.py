"""Issue 8.1: a node dies (agent SIGKILL) -> the survivor stops its workers and re-forms within the detection window.

Detection window = heartbeat x missed heartbeats (``--rdzv-conf heartbeat=S,missed_heartbeats=N``, the same as
torchrun's ``keep_alive_interval``/``keep_alive_max_attempt``). Upstream's survivor keeps running at the old
WORLD_SIZE: nothing makes its agent look at the participant list again (it only checks for waiting nodes).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.beyond_upstream.conftest import (
    TRAIN,
    agent_args,
    kill_node,
    marker_pids,
    needs_runtime,
    new_markers,
    read_events,
    read_markers,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_runtime]

# 6 s: short, but not so short that a CPU-starved agent on a loaded machine is evicted by mistake
HEARTBEAT = 2
MISSED = 3
WINDOW = HEARTBEAT * MISSED


def _start_pair(launcher, tmp_path, store, tool: str, markers):
    conf = (
        f"heartbeat={HEARTBEAT},missed_heartbeats={MISSED}"
        if tool == "elastic-run"
        else f"keep_alive_interval={HEARTBEAT},keep_alive_max_attempt={MISSED}"
    )
    env = dict(MARKER_DIR=markers, TRAIN_STEPS="100000", TRAIN_STEP_SECONDS="0.1")
    agents = []
    for name in ("survivor", "victim"):
        agents.append(
            launcher.start(
                [*agent_args(store.port, "1:2", run_id=f"peerloss-{tool}", conf=conf, tool=tool), TRAIN],
                tool=tool,
                name=f"{tool}-{name}",
                ELASTIC_IMPL_EVENTS_FILE=tmp_path / f"{tool}-{name}.events",
                **env,
            )
        )
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "4"]) == 4, 180, "group of 4")
    return agents


def test_survivor_reforms_within_the_detection_window(launcher, tmp_path, rdzv_store, measured):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    survivor, victim = _start_pair(launcher, tmp_path, rdzv_store, "elastic-run", markers)
    before = marker_pids(markers)
    killed_at = kill_node(victim)

    def survivor_noticed():
        events = read_events(tmp_path / "elastic-run-survivor.events")
        return next((e for e in events if e["name"] == "agent.membership_change"), None)

    event = wait_for(survivor_noticed, 3 * WINDOW + 60, "the survivor to notice the lost peer")
    detected = event["timestamp"] / 1000 - killed_at
    reformed = wait_for(
        lambda: len(new_markers(markers, before, 2)) == 2 and time.time(),
        120,
        "the survivor's workers re-formed at WORLD_SIZE 2",
    )
    measured("peer_loss.detection_window", float(WINDOW))
    measured("peer_loss.ours.detected_after", detected)
    measured("peer_loss.ours.reformed_after", reformed - killed_at)
    # Eviction needs the window plus at most one heartbeat; 3x leaves room for a loaded machine.
    assert detected <= 3 * WINDOW, f"lost peer noticed after {detected:.1f}s (window {WINDOW}s)"
    assert survivor.poll() is None
    os.kill(survivor.pid, signal.SIGTERM)
    assert launcher.wait(survivor, 60) == 128 + signal.SIGTERM


def test_torchrun_reference_survivor_stays_at_old_world_size(launcher, tmp_path, rdzv_store, measured):
    """The same scenario under upstream torchrun, for the side-by-side figure (not a property of our code)."""
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    survivor, victim = _start_pair(launcher, tmp_path, rdzv_store, "torchrun", markers)
    before = marker_pids(markers)
    killed_at = kill_node(victim)
    observe = 3 * WINDOW + 10
    deadline = killed_at + observe
    reformed_at = None
    while time.time() < deadline:
        if len(new_markers(markers, before, 2)) == 2:
            reformed_at = time.time()
            break
        time.sleep(0.2)
    assert survivor.poll() is None, launcher.output(survivor)[1][-3000:]
    if reformed_at is None:
        measured("peer_loss.torchrun.reformed_after", f"not within {observe}", "s (still WORLD_SIZE=4)")
    else:
        measured("peer_loss.torchrun.reformed_after", reformed_at - killed_at)
    os.killpg(survivor.pid, signal.SIGTERM)
    launcher.wait(survivor, 60)
