"""The agent's worker timer server (TORCHELASTIC_ENABLE_FILE_TIMER=1, as upstream): a worker that overruns an
``expires`` block is SIGKILLed by the agent, and the report says so."""

from __future__ import annotations

import json
import time

import pytest

from tests.launcher.conftest import RUNTIME, TRAIN, requires

pytestmark = requires(*RUNTIME, "elastic_impl.timer")


def test_worker_overrunning_expires_is_killed_by_the_agents_timer_server(launcher, tmp_path):
    events_file = tmp_path / "events.jsonl"
    started = time.monotonic()
    proc = launcher.start(
        ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "--monitor-interval", "0.1",
         "--shutdown-grace", "2", TRAIN],
        TORCHELASTIC_ENABLE_FILE_TIMER="1",
        TORCHELASTIC_TIMER_FILE=tmp_path / "timer.fifo",
        ELASTIC_IMPL_EVENTS_FILE=events_file,
        TRAIN_HANG_RANK="1",  # hangs for 600 s inside expires(after=1)
        TRAIN_EXPIRES="1",
        TRAIN_STEPS="1000",
        TRAIN_STEP_SECONDS="0.1",
    )
    rc = launcher.wait(proc, 120)
    _, err = launcher.output(proc)
    assert rc == 1, err[-3000:]
    assert time.monotonic() - started < 100  # not the 600 s hang
    root = err[err.rfind("Root Cause"):]
    assert "rank      : 1" in root and "SIGKILL" in root and "timer reaper" in root, root
    with open(events_file) as f:
        names = [json.loads(line)["name"] for line in f if line.strip()]
    assert "agent.timer_expired" in names and "agent.worker_failed" in names, names
    assert not (tmp_path / "timer.fifo").exists()  # the agent removed the pipe it created


@pytest.mark.slow
def test_timer_file_is_not_given_to_workers_unless_enabled(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    proc = launcher.start(["--standalone", "--nproc-per-node", "1", TRAIN], MARKER_DIR=markers,
                          TRAIN_HANG_RANK="0")
    rc = launcher.wait(proc, 120)
    _, err = launcher.output(proc)
    assert rc == 1 and "TORCHELASTIC_TIMER_FILE is not set" in err, err[-3000:]
