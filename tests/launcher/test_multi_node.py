"""Multi-agent jobs on loopback (c10d rendezvous, real TCPStore): restarts, failures, membership changes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.launcher.conftest import (
    TRAIN,
    free_port,
    marker_pids,
    needs_runtime,
    new_markers,
    read_markers,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_runtime]


def _agent_args(port: int, nnodes: str, max_restarts: int = 0, run_id: str = "job", extra_conf: str = "") -> list[str]:
    # A 10 s failure-detection window: short enough for the peer-loss test, long enough that a node starved of CPU
    # on a loaded 2-core machine is not evicted by mistake (which restarts the group again and again).
    conf = "join_timeout=60,last_call_timeout=1,close_timeout=10,heartbeat=2,missed_heartbeats=5"
    if extra_conf:
        conf += "," + extra_conf
    return [
        "--nnodes", nnodes,
        "--nproc-per-node", "2",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", run_id,
        "--rdzv-conf", conf,
        "--max-restarts", str(max_restarts),
        "--monitor-interval", "0.1",
        "--shutdown-grace", "3",
    ]


def test_killed_worker_restarts_both_groups(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    port = free_port()
    env = dict(
        MARKER_DIR=markers, TRAIN_FAIL_RANK="3", TRAIN_FAIL_ATTEMPT="0", TRAIN_FAIL_MODE="kill",
        TRAIN_ALLREDUCE="1", TRAIN_MIN_WORLD_SIZE="4",
    )
    agents = [launcher.start([*_agent_args(port, "1:2", max_restarts=2), TRAIN], name=f"a{i}", **env) for i in range(2)]
    for agent in agents:
        rc = launcher.wait(agent, 240)
        assert rc == 0, launcher.output(agent)[1][-4000:]
    done = [m for m in read_markers(markers) if m.get("done")]
    assert sorted(int(m["RANK"]) for m in done) == [0, 1, 2, 3]
    assert {m["WORLD_SIZE"] for m in done} == {"4"}
    assert all(m["allreduce"] == 4.0 for m in done)
    # the restarted attempt is visible to every worker of the job
    assert {m["TORCHELASTIC_RESTART_COUNT"] for m in done} == {"1"}


def test_exceeding_max_restarts_fails_job_with_root_cause(launcher, tmp_path):
    port = free_port()
    # the all-reduce couples the nodes: the healthy node's workers wait for rank 2, like real training would
    env = dict(TRAIN_FAIL_RANK="2", TRAIN_FAIL_MODE="raise", TRAIN_MIN_WORLD_SIZE="4", TRAIN_ALLREDUCE="1")
    agents = [launcher.start([*_agent_args(port, "1:2", max_restarts=1), TRAIN], name=f"a{i}", **env) for i in range(2)]
    codes = [launcher.wait(agent, 240) for agent in agents]
    errs = [launcher.output(agent)[1] for agent in agents]
    assert all(code != 0 for code in codes), (codes, [e[-2000:] for e in errs])
    # both nodes name rank 2's exception as the root cause: the healthy node learned it from its peer
    for e in errs:
        report = e[e.rfind("Root Cause"):]
        assert "InjectedFailure" in report and "rank" in report, e[-3000:]


def test_third_agent_is_admitted_by_membership_change(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    port = free_port()
    # workers idle until the group has 3 nodes (6 workers), then finish
    env = dict(MARKER_DIR=markers, TRAIN_MIN_WORLD_SIZE="6")
    agents = [launcher.start([*_agent_args(port, "1:3"), TRAIN], name=f"a{i}", **env) for i in range(2)]
    # (with --nnodes 1:3 one agent may first run a round of its own, at WORLD_SIZE 2, before the other arrives)
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "4"]) >= 4,
             120, "the first two nodes to form a group of 4 workers")
    agents.append(launcher.start([*_agent_args(port, "1:3"), TRAIN], name="a2", **env))
    for agent in agents:
        rc = launcher.wait(agent, 240)
        assert rc == 0, launcher.output(agent)[1][-4000:]
    done = [m for m in read_markers(markers) if m.get("done")]
    assert sorted(int(m["RANK"]) for m in done) == list(range(6))
    assert {m["GROUP_WORLD_SIZE"] for m in done} == {"3"}
    # a membership change is not a failure: the restart counter did not move
    assert {m["TORCHELASTIC_RESTART_COUNT"] for m in done} == {"0"}


def _wait_until_listening(port: int, timeout: float = 120) -> None:
    """The first agent hosts the store: wait until its port accepts connections before starting the next one."""
    import socket

    def listening() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout, f"the first agent's store on port {port}")


def test_sigterm_makes_one_node_leave_and_survivors_reform(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    port = free_port()
    env = dict(MARKER_DIR=markers, TRAIN_STEPS="100000", TRAIN_STEP_SECONDS="0.1")
    # agent 0 starts first so it hosts the store; agent 1 is the one that leaves
    host = launcher.start([*_agent_args(port, "1:2"), TRAIN], name="host", **env)
    _wait_until_listening(port)  # a fixed head start lost the race on a loaded machine: the leaver hosted the store
    leaver = launcher.start([*_agent_args(port, "1:2"), TRAIN], name="leaver", **env)
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "4"]) == 4, 120, "group of 4")
    before = marker_pids(markers)
    os.kill(leaver.pid, signal.SIGTERM)
    rc = launcher.wait(leaver, 60)
    assert rc == 128 + signal.SIGTERM, launcher.output(leaver)[1][-3000:]
    # the survivor re-forms alone (WORLD_SIZE 2) instead of staying at 4 or exiting
    wait_for(lambda: len(new_markers(markers, before, 2)) == 2, 60, "re-formed group of 2")
    assert host.poll() is None
    os.kill(host.pid, signal.SIGTERM)
    launcher.wait(host, 60)


def test_peer_loss_triggers_reformation_within_heartbeat_window(launcher, tmp_path):
    markers = tmp_path / "markers"
    launcher.marker_dirs.append(markers)
    port = free_port()
    env = dict(MARKER_DIR=markers, TRAIN_STEPS="100000", TRAIN_STEP_SECONDS="0.1")
    host = launcher.start([*_agent_args(port, "1:2"), TRAIN], name="host", **env)
    _wait_until_listening(port)  # a fixed head start lost the race on a loaded machine: the leaver hosted the store
    victim = launcher.start([*_agent_args(port, "1:2"), TRAIN], name="victim", **env)
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "4"]) == 4, 120, "group of 4")
    before = marker_pids(markers)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole node dies: agent (its workers are reaped by cleanup)
    victim.wait(10)
    killed_at = time.monotonic()
    wait_for(lambda: len(new_markers(markers, before, 2)) == 2, 60, "re-formed group of 2")
    # 10 s detection window plus restart time; far below upstream's "never"
    assert time.monotonic() - killed_at < 60
    os.kill(host.pid, signal.SIGTERM)
    launcher.wait(host, 60)
