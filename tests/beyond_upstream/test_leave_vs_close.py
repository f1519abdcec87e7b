"""Issue 8.2: SIGTERM to one agent means "this node leaves" (the others re-form); only the job's end closes.

Upstream torchrun's survivor, after its peer was SIGTERMed, keeps running at the old WORLD_SIZE (the leaver does
not leave the rendezvous state, and the survivor never re-checks the participants).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.beyond_upstream.conftest import (
    TRAIN,
    agent_args,
    marker_pids,
    needs_runtime,
    new_markers,
    our_rdzv_state,
    read_markers,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_runtime]


def _pair(launcher, store, tool, markers, stop_file, run_id):
    conf = "heartbeat=2,missed_heartbeats=5" if tool == "elastic-run" else "keep_alive_interval=2,keep_alive_max_attempt=5"
    env = dict(MARKER_DIR=markers, TRAIN_STOP_FILE=stop_file)
    agents = [
        launcher.start([*agent_args(store.port, "1:2", run_id=run_id, conf=conf, tool=tool), TRAIN],
                       tool=tool, name=f"{tool}-{i}", **env)
        for i in range(2)
    ]
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "4"]) == 4, 180, "group of 4")
    return agents


def test_sigterm_leaves_survivor_reforms_and_job_end_closes(launcher, tmp_path, rdzv_store, measured):
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    stayer, leaver = _pair(launcher, rdzv_store, "elastic-run", markers, stop_file, "leave-ours")
    before = marker_pids(markers)
    sent = time.time()
    leaver.send_signal(signal.SIGTERM)
    assert launcher.wait(leaver, 60) == 128 + signal.SIGTERM, launcher.output(leaver)[1][-3000:]
    reformed = wait_for(
        lambda: len(new_markers(markers, before, 2)) == 2 and time.time(),
        120, "the stayer's workers re-formed at WORLD_SIZE 2",
    )
    measured("leave.ours.reformed_after", reformed - sent)
    state = our_rdzv_state(rdzv_store, "leave-ours")
    assert not state.closed, "the leaver closed the rendezvous for everyone"
    assert len(state.participants) == 1
    assert stayer.poll() is None
    stop_file.write_text("done")  # the job ends: the stayer's workers finish
    assert launcher.wait(stayer, 120) == 0, launcher.output(stayer)[1][-3000:]
    assert our_rdzv_state(rdzv_store, "leave-ours").closed, "the job ended but the rendezvous is still open"


def test_torchrun_reference_sigterm_peer(launcher, tmp_path, rdzv_store, measured):
    """Upstream, same scenario (side-by-side figure)."""
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    stayer, leaver = _pair(launcher, rdzv_store, "torchrun", markers, stop_file, "leave-torchrun")
    before = marker_pids(markers)
    sent = time.time()
    leaver.send_signal(signal.SIGTERM)
    launcher.wait(leaver, 60)
    observe = 20
    reformed_at = None
    while time.time() < sent + observe:
        if len(new_markers(markers, before, 2)) == 2:
            reformed_at = time.time()
            break
        time.sleep(0.2)
    assert stayer.poll() is None, launcher.output(stayer)[1][-3000:]
    measured(
        "leave.torchrun.reformed_after",
        f"not within {observe}" if reformed_at is None else round(reformed_at - sent, 2),
        "s (still WORLD_SIZE=4)" if reformed_at is None else "s",
    )
    # (Ending the job here would leave upstream's stayer in its exit barrier for 300 s waiting for the leaver;
    # the fixture's cleanup kills it instead.)
