"""The live Cluster and its pytest fixture: fast checks (no agents) and one slow smoke run with real agents."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from fault_injection.processes import processes_with_env
from simulator import history as h
from simulator.live import Cluster, LiveError
from simulator.live.cluster import RUN_MARKER_ENV


def test_bad_settings_fail_with_one_line(tmp_path):
    with pytest.raises(LiveError, match=r"^invalid live backend 'zk'; allowed: c10d, etcd-v2, etcd-v3$"):
        Cluster(tmp_path, backend="zk")
    with pytest.raises(LiveError, match=r"^invalid workers_per_node 0; expected an integer >= 1$"):
        Cluster(tmp_path, workers_per_node=0)
    with pytest.raises(LiveError, match=r"does not exist \(pass train_script=\)$"):
        Cluster(tmp_path, train_script=str(tmp_path / "missing.py"))
    c = Cluster(tmp_path)
    with pytest.raises(LiveError, match=r"^unknown cluster option 'nodes_count'; allowed: workers_per_node, "):
        c.configure(nodes_count=3)
    with pytest.raises(LiveError, match=r"^no node 1; the cluster has no nodes \(start\(\) first\)$"):
        c.kill_worker(node=1)
    with pytest.raises(LiveError, match=r"^invalid nodes 0; expected an integer >= 1$"):
        c.start(nodes=0)
    with pytest.raises(LiveError, match=r"^invalid node bounds min_nodes=3 max_nodes=2; "):
        Cluster(tmp_path, min_nodes=3, max_nodes=2).start(nodes=2)
    with pytest.raises(LiveError, match=r"^unknown history event 'done'; allowed: agent_start, "):
        c.wait_for("done")
    c.close()  # never started: nothing to stop, nothing recorded
    assert len(c.history) == 0


def test_agent_events_become_history_records(tmp_path):
    # Feed the collector the JSON lines elastic_impl.events really writes (same serializer), as an agent would.
    from elastic_impl.events import Event, EventSource, NodeState, RdzvEvent
    from simulator.live.agents import Node

    c = Cluster(tmp_path, workers_per_node=2)
    c.recorder.t0 = t0 = time.time() - 0.5  # the rendezvous event (no timestamp) is stamped when read: ~0.5

    def ms(t: float) -> int:
        return int((t0 + t) * 1000)

    node = Node(0, tmp_path / "node0")
    node.dir.mkdir()
    c.nodes.append(node)
    lines = [
        RdzvEvent("rdzv.join", "run", "joined round 3", "h", 1, NodeState.RUNNING).serialize(),
        Event("agent.rendezvous", EventSource.AGENT, ms(1.5),
              {"round": 3, "group_rank": 1, "group_world_size": 2, "restart_count": 1}).serialize(),
        Event("agent.workers_started", EventSource.AGENT, ms(2.0),
              {"round": 3, "ranks": [2, 3], "pids": [11, 12], "restart_count": 1, "group_world_size": 2}).serialize(),
        Event("agent.worker_failed", EventSource.AGENT, ms(3.0),
              {"round": 3, "rank": 3, "local_rank": 1, "exitcode": -9, "signal": "SIGKILL"}).serialize(),
        Event("agent.restart", EventSource.AGENT, ms(3.1), {"restart_count": 2, "reason": "worker_failed"}).serialize(),
        Event("agent.membership_change", EventSource.AGENT, ms(4.0), {"reason": "1 node(s) waiting"}).serialize(),
    ]
    half = lines[-1][:10]
    node.events_file.write_text("\n".join(lines[:-1]) + "\n" + half)  # the last line is still being written
    c.refresh()
    assert [e.event for e in c.history] == [h.RDZV_JOIN, h.RDZV_COMPLETE, h.WORKER_START, h.WORKER_START,
                                             h.WORKER_FAILED, h.WORKER_EXIT, h.RESTART]
    with open(node.events_file, "a") as f:
        f.write(lines[-1][10:] + "\n")
    c.refresh()
    events = c.history.events
    complete = events[1]
    assert (round(complete.t, 2), complete.round, complete.rank, complete.world_size) == (1.5, 3, 1, 2)
    assert [(e.rank, e.world_size, e.detail["local_rank"]) for e in events[2:4]] == [(2, 4, 0), (3, 4, 1)]
    assert events[4].detail["signal"] == "SIGKILL" and events[4].rank == 3
    assert [e.detail["reason"] for e in events if e.event == h.RESTART] == ["worker_failed", "membership"]
    assert node.workers == {0: 11, 1: 12}
    # a finished worker's marker (examples/train.py writes it with done=true) is its successful exit
    node.marker_dir.mkdir()
    marker = node.marker_dir / "attempt1_rank2_ws4_pid11.json"
    marker.write_text(json.dumps({"RANK": "2", "WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": "1", "pid": 11,
                                  "done": True}))
    c.refresh()
    exits = [e for e in c.history if e.event == h.WORKER_EXIT and e.detail["exitcode"] == 0]
    assert [(e.rank, e.detail["pid"]) for e in exits] == [(2, 11)]


def test_events_of_a_skewed_node_are_put_back_on_real_time(tmp_path):
    from simulator.live.agents import Node

    node = Node(0, tmp_path)
    node.skews += [(1000.0, -8.0), (1020.0, 0.0)]  # 8 s behind between real times 1000 and 1020
    assert node.skew_at(999.0, now=999.1) == 0.0
    assert node.skew_at(1001.0 - 8.0, now=1001.1) == -8.0  # its clock read 993 at real time 1001
    assert node.skew_at(1019.0 - 8.0, now=1019.1) == -8.0
    assert node.skew_at(1021.0, now=1021.1) == 0.0


def test_plugin_registers_the_fixture_and_marker(request):
    assert any(line.startswith("cluster(") for line in request.config.getini("markers"))
    assert "cluster" in request.fixturenames or request.getfixturevalue("cluster_factory")


@pytest.mark.cluster(max_restarts=1, job={"steps": 2, "step_seconds": 0.2}, workers_per_node=2)
def test_marker_settings_reach_the_fixture(cluster):
    assert (cluster.max_restarts, cluster.workers_per_node) == (1, 2)
    assert cluster.job["steps"] == 2 and cluster.job["step_seconds"] == 0.2


@pytest.mark.slow
@pytest.mark.cluster(max_restarts=1, job={"steps": 4, "step_seconds": 0.5})
def test_cluster_fixture_kills_a_worker_and_the_job_recovers(cluster):
    cluster.start(nodes=2, workers=1)
    cluster.wait_for(h.WORKER_START, node=1, timeout=240)
    pid = cluster.kill_worker(node=1, rank=0)
    assert cluster.wait(timeout=240) == "succeeded"
    history = cluster.history
    failed = history.filter(h.WORKER_FAILED, "node1")
    assert failed and failed[0].detail["signal"] == "SIGKILL"
    assert any(e.detail.get("pid") == pid for e in history.filter(h.FAULT_START))
    assert history.filter(h.RESTART, "node1")[0].detail["reason"] == "worker_failed"


@pytest.mark.slow
def test_close_mid_job_stops_every_process_and_records_the_orphan_check(tmp_path):
    c = Cluster(tmp_path, job={"steps": 600, "step_seconds": 0.5})
    c.start(nodes=2)
    c.wait_for(h.WORKER_START, node=0, timeout=240)
    c.pause_agent(0)  # even a stopped agent is cleaned up
    history = c.close()
    assert processes_with_env(RUN_MARKER_ENV, c.token) == []
    assert all(not n.running() for n in c.nodes) and not c.store.is_running()
    check = history.filter(h.ORPHAN_CHECK)
    assert len(check) == 1 and check[0].detail["orphans"] == []
    assert history.filter(h.JOB_FAILED)  # stopped before the job could end
    assert (tmp_path / "history.jsonl").read_text().count("\n") == len(history)
    assert os.path.isfile(tmp_path / "node0" / "events.jsonl")


@pytest.mark.slow
def test_sigterm_makes_an_agent_leave_even_while_it_waits_on_a_slow_store(tmp_path):
    # Regression: SIGTERM used to be swallowed by broad `except Exception` around the agent's store reads (3 of 3
    # agents kept running with 0.3 s store latency) until the agent acted on signals only at safe points.
    c = Cluster(tmp_path, min_nodes=1, max_nodes=4, job={"steps": 400, "step_seconds": 0.5},
                timeouts={"keep_alive_max_attempt": 10})
    try:
        c.start(nodes=4)
        for i in range(4):
            c.wait_for(h.WORKER_START, node=i, timeout=300)
        for i in (1, 2, 3):
            c.delay(i, 0.3)  # every store read takes ~1 s: the agent's main thread is mostly inside one
        time.sleep(3)
        for i in (1, 2, 3):
            c.remove_node(i)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(c.node(i).running() for i in (1, 2, 3)):
            time.sleep(0.2)
        still_running = [f"node{i}" for i in (1, 2, 3) if c.node(i).running()]
        assert not still_running, f"{still_running} ignored SIGTERM for 20 s"
        codes = {f"node{i}": c.node(i).proc.returncode for i in (1, 2, 3)}
        if -signal.SIGABRT in codes.values():
            # only this exact symptom is excused; any other exit code fails the test
            pytest.xfail(f"runtime bug (reported): agents that left on SIGTERM then died of SIGABRT ('terminate called "
                         f"without an active exception': a store call still in flight at interpreter exit): {codes}")
        assert set(codes.values()) == {128 + signal.SIGTERM}, codes
    finally:
        c.close()
