"""Issue 13: the c10d store host is not a single point of failure.

Two agents, ``--nnodes 1:2``, default settings; the agent hosting the rendezvous TCPStore is SIGKILLed. The
survivor, the successor both agreed on from the last completed round, hosts a new store on the port it announced
in advance, seeds it with the run's state (job-wide restart count included) and its workers come back at
WORLD_SIZE=1 (see elastic_impl/rendezvous/c10d_failover.py and docs/c10d_store_failover.md). Before, the survivor
failed with "store host is gone"; upstream torchrun's survivor fails the same way (its reference run is below).
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.beyond_upstream.conftest import (
    TRAIN,
    alive,
    kill_node,
    marker_pids,
    needs_runtime,
    new_markers,
    read_markers,
    wait_for,
)
from tests.launcher.conftest import free_port

pytestmark = [pytest.mark.slow, needs_runtime]

BOUND = 25.0


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pair_with_a_hosting_agent(launcher, tool, markers, stop_file, run_id, **env):
    port = free_port()
    args = [
        "--nnodes", "1:2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
        "--max-restarts", "3",
    ]
    env = dict(MARKER_DIR=markers, TRAIN_STOP_FILE=stop_file, **env)
    host = launcher.start([*args, TRAIN], tool=tool, name=f"{tool}-host", **env)
    wait_for(lambda: _listening(port), 120, "the first agent to host the store")
    other = launcher.start([*args, TRAIN], tool=tool, name=f"{tool}-other", **env)
    return host, other


def test_survivor_takes_over_the_store_and_reforms_with_the_restart_count(launcher, tmp_path, measured):
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    # rank 0 fails once first: the job-wide restart count is 1 before the store host dies
    host, survivor = _pair_with_a_hosting_agent(launcher, "elastic-run", markers, stop_file, "failover",
                                                TRAIN_FAIL_RANK="0", TRAIN_FAIL_ATTEMPT="0")
    wait_for(lambda: len([m for m in read_markers(markers)
                          if m["WORLD_SIZE"] == "2" and m["TORCHELASTIC_RESTART_COUNT"] == "1"]) == 2,
             180, "the group of 2 after one restart")
    before = marker_pids(markers)
    killed_at = kill_node(host)
    reformed = wait_for(lambda: new_markers(markers, before, 1), 60, "the survivor's workers at WORLD_SIZE=1")
    took = time.time() - killed_at
    measured("store_host_loss.ours.reformed_after", took)
    assert took <= BOUND, f"re-formed {took:.1f} s after the store host died (bound {BOUND} s)"
    assert reformed[0]["TORCHELASTIC_RESTART_COUNT"] == "1", reformed[0]
    stop_file.write_text("done")
    assert launcher.wait(survivor, 120) == 0, launcher.output(survivor)[1][-3000:]
    assert "now hosts the rendezvous store" in launcher.output(survivor)[1]


def test_torchrun_reference_store_host_loss(launcher, tmp_path, measured):
    """Upstream, same scenario (side-by-side figure)."""
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    host, survivor = _pair_with_a_hosting_agent(launcher, "torchrun", markers, stop_file, "failover-tr")
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "2"]) == 2, 180, "group of 2")
    before = marker_pids(markers)
    killed_at = kill_node(host)
    observe = 60.0
    reformed_at = None
    while time.time() < killed_at + observe and survivor.poll() is None:
        if new_markers(markers, before, 1):
            reformed_at = time.time()
            break
        time.sleep(0.2)
    if reformed_at is not None:
        measured("store_host_loss.torchrun.reformed_after", reformed_at - killed_at)
    else:
        outcome = f"exited {survivor.returncode}" if survivor.poll() is not None else "still at WORLD_SIZE=2"
        measured("store_host_loss.torchrun.reformed_after", f"not within {observe:g}", f"s ({outcome})")


def test_when_the_first_successor_died_with_the_host_the_next_one_takes_over(launcher, tmp_path, measured):
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    port = free_port()
    args = [
        "--nnodes", "1:3", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "failover3",
    ]
    env = dict(MARKER_DIR=markers, TRAIN_STOP_FILE=stop_file)
    host = launcher.start([*args, TRAIN], name="host", **env)
    wait_for(lambda: _listening(port), 120, "the first agent to host the store")
    others = [launcher.start([*args, TRAIN], name=f"other{i}", **env) for i in range(2)]
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "3"]) == 3, 180, "group of 3")
    # The succession order is the rank order of the non-host nodes: node keys "<addr>_<agent pid>_0", sorted.
    first, second = sorted(others, key=lambda p: f"_{p.pid}_0")
    before = marker_pids(markers)
    killed_at = time.time()
    for proc in (host, first):
        kill_node(proc)
    wait_for(lambda: new_markers(markers, before, 1), 90, "the last node's workers at WORLD_SIZE=1")
    measured("store_host_and_successor_loss.ours.reformed_after", time.time() - killed_at)
    stop_file.write_text("done")
    assert launcher.wait(second, 120) == 0, launcher.output(second)[1][-3000:]
    err = launcher.output(second)[1]
    assert "this node now hosts the rendezvous store" in err, err[-3000:]


def test_a_frozen_store_host_is_failed_over_and_stops_when_it_thaws(launcher, tmp_path, measured):
    """The hosting agent is SIGSTOPped (a hung host, or one cut off the network): nothing refuses, calls just get no
    answer; the survivor takes it for gone after the liveness timeout (default 15 s) and fails over. When the old
    host thaws it finds a successor serving on a reserved port (deposed) and stops, instead of training on alone."""
    import os
    import signal

    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    host, survivor = _pair_with_a_hosting_agent(launcher, "elastic-run", markers, stop_file, "failover-frozen")
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "2"]) == 2, 180, "group of 2")
    before = marker_pids(markers)
    frozen_at = time.time()
    os.kill(host.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: new_markers(markers, before, 1), 90, "the survivor's workers at WORLD_SIZE=1")
        took = time.time() - frozen_at
        measured("store_host_frozen.ours.reformed_after", took)
        assert took <= 15 + 15, f"re-formed {took:.1f} s after the store host froze (15 s detection window)"
    finally:
        os.kill(host.pid, signal.SIGCONT)
    thawed_at = time.time()
    code = launcher.wait(host, 60)
    measured("store_host_frozen.ours.deposed_host_stopped_after", time.time() - thawed_at)
    assert code != 0
    assert "Stopping this node" in launcher.output(host)[1], launcher.output(host)[1][-3000:]
    assert survivor.poll() is None, "the deposed host took the survivor down with it"
    assert len(new_markers(markers, before, 1)) == 1
    assert not [pid for pid in before if alive(pid)], "a worker of the first group (the deposed host's) still runs"
    stop_file.write_text("done")
    assert launcher.wait(survivor, 120) == 0, launcher.output(survivor)[1][-3000:]
