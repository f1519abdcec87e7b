"""elastic-run end to end on one node (real agent, real worker processes, c10d standalone rendezvous)."""

from __future__ import annotations

import pytest

from tests.launcher.conftest import TRAIN, needs_runtime, read_markers

pytestmark = needs_runtime

COMMON = ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1"]


def test_success_env_contract_and_allreduce(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    proc = launcher.start([*COMMON, TRAIN], MARKER_DIR=markers, TRAIN_ALLREDUCE="1")
    rc = launcher.wait(proc, 120)
    out, err = launcher.output(proc)
    assert rc == 0, err
    done = [m for m in read_markers(markers) if m.get("done")]
    assert sorted(int(m["RANK"]) for m in done) == [0, 1]
    for m in done:
        assert m["allreduce"] == 2.0
        assert (m["WORLD_SIZE"], m["LOCAL_WORLD_SIZE"], m["GROUP_RANK"], m["GROUP_WORLD_SIZE"]) == ("2", "2", "0", "1")
        assert m["LOCAL_RANK"] == m["RANK"] == m["ROLE_RANK"]
        assert (m["ROLE_NAME"], m["ROLE_WORLD_SIZE"]) == ("default", "2")
        assert (m["TORCHELASTIC_RESTART_COUNT"], m["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "0")
        assert m["OMP_NUM_THREADS"] == "1"
        assert m["TORCHELASTIC_ERROR_FILE"] and m["TORCHELASTIC_ERROR_FILE"].endswith("error.json")
        assert m["MASTER_ADDR"] and int(m["MASTER_PORT"]) > 0
        assert m["TORCHELASTIC_RUN_ID"]


def test_worker_failure_restarts_group_then_succeeds(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    proc = launcher.start(
        [*COMMON, "--max-restarts", "2", TRAIN],
        MARKER_DIR=markers,
        TRAIN_FAIL_RANK="1",
        TRAIN_FAIL_ATTEMPT="0",
        TRAIN_FAIL_MODE="exit",
        TRAIN_FAIL_AFTER_MARKERS="1",  # rank 1 fails only once rank 0 wrote its attempt-0 marker (load race)
        TRAIN_ALLREDUCE="1",  # rank 0 cannot finish attempt 0 without rank 1
    )
    rc = launcher.wait(proc, 120)
    _, err = launcher.output(proc)
    assert rc == 0, err
    attempts = {(int(m["RANK"]), m["TORCHELASTIC_RESTART_COUNT"]) for m in read_markers(markers)}
    assert attempts == {(0, "0"), (1, "0"), (0, "1"), (1, "1")}
    done = [m for m in read_markers(markers) if m.get("done")]
    assert {m["TORCHELASTIC_RESTART_COUNT"] for m in done} == {"1"}


@pytest.mark.parametrize("mode, expect", [("raise", "InjectedFailure"), ("kill", "SIGKILL")])
def test_exceeding_max_restarts_reports_root_cause(launcher, tmp_path, mode, expect):
    proc = launcher.start(
        [*COMMON, "--max-restarts", "1", TRAIN], TRAIN_FAIL_RANK="1", TRAIN_FAIL_MODE=mode
    )
    rc = launcher.wait(proc, 120)
    _, err = launcher.output(proc)
    assert rc == 1, err
    assert "Root Cause" in err or "root cause" in err.lower(), err
    assert "rank" in err and expect in err, err


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["cooperative", "ignores-sigterm"])
def test_sigterm_stops_workers_within_shutdown_grace(launcher, tmp_path, ignore_sigterm):
    import os
    import signal
    import time

    from tests.launcher.conftest import wait_for

    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    env = dict(MARKER_DIR=markers, TRAIN_STEPS="100000", TRAIN_STEP_SECONDS="0.1")
    if ignore_sigterm:
        env["TRAIN_IGNORE_SIGTERM"] = "1"
    proc = launcher.start([*COMMON, "--shutdown-grace", "2", TRAIN], **env)
    # train.py sets its SIGTERM disposition before it writes its marker: a marker means the worker is ready
    started = wait_for(lambda: len(read_markers(markers)) == 2 and read_markers(markers), 120, "2 workers")
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    rc = launcher.wait(proc, 60)
    elapsed = time.monotonic() - sent
    _, err = launcher.output(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err.strip().splitlines()[-1]
    pids = [m["pid"] for m in started]
    assert not any(_alive(pid) for pid in pids), "a worker outlived its agent"
    if ignore_sigterm:
        assert elapsed >= 2  # waited the grace before SIGKILL
    assert elapsed < 30  # never the 30 s default when 2 s was asked for
