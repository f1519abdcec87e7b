"""Virtual-time mode: the real RendezvousStepper over the simulated store, simulated agents, the nemesis."""

import random

import pytest

from elastic_impl.rendezvous.dynamic_rendezvous import RendezvousState
from simulator import history as h
from simulator.checker import check
from simulator.scenario import scenario_from_dict
from simulator.virtual import NodeClock, SimStore, Simulation, VirtualClock, run_rendezvous_round, run_virtual

BASE = {
    "name": "virtual", "mode": "virtual", "nodes": 3, "workers_per_node": 2, "min_nodes": 2, "max_nodes": 4,
    "max_restarts": 2, "timeouts": {"join": 30, "last_call": 0.5, "heartbeat": 0.5, "close": 5, "monitor": 0.1},
    "job": {"steps": 6, "step_seconds": 0.5}, "store": {"latency": 0.005}, "time_limit": 120,
}


def scenario(**overrides):
    return scenario_from_dict({**BASE, **overrides})


def run_checked(s):
    result = run_virtual(s)
    checked = check(result.history, s)
    assert checked.ok, [str(v) for v in checked.violations]
    return result


# ------------------------------------------------------------------ store and clock


def test_store_compare_and_set_rejects_a_stale_token_and_broken_cas_accepts_it():
    clock = VirtualClock()
    for broken in (False, True):
        store = SimStore(clock, random.Random(0), broken_cas=broken)
        assert store.set_state("a", b"v1", None)[2] is True
        state, token, ok = store.set_state("b", b"v2", None)  # stale: b believes nothing is stored
        assert ok is broken
        assert (state, token) == ((b"v2", 2) if broken else (b"v1", 1))
        assert store.failed_cas == (0 if broken else 1)


def test_store_reads_are_stale_by_up_to_the_latency_and_partitions_raise():
    from elastic_impl.rendezvous.api import RendezvousConnectionError

    clock = VirtualClock()
    store = SimStore(clock, random.Random(1), latency=1.0)
    store.set_state("a", b"old", None)
    clock.now = 10.0
    store.set_state("a", b"new", 1)
    clock.now = 10.5
    seen = {store.get_state("b")[0] for _ in range(200)}
    assert seen == {b"old", b"new"}  # a read half a latency after the write may miss it
    clock.now = 11.0
    assert {store.get_state("b")[0] for _ in range(50)} == {b"new"}  # a full latency later it cannot
    store.partition("b")
    with pytest.raises(RendezvousConnectionError, match="node b|b is partitioned"):
        store.get_state("b")
    assert store.get_state("a")[0] == b"new"
    store.heal("b")
    assert store.get_state("b")[0] == b"new"


def test_a_silent_partition_blocks_the_first_call_for_the_call_timeout_and_fails_later_ones_at_once():
    from elastic_impl.rendezvous.api import RendezvousConnectionError

    clock = VirtualClock()
    store = SimStore(clock, random.Random(0), call_timeout=8.0, round_call_timeout=5.0)
    returned: list[tuple[str, float]] = []
    store.partition("b")
    clock.now = 2.0
    assert store.hold("b", lambda: returned.append(("first", clock.now)))
    clock.now = 3.0
    assert store.hold("b", lambda: returned.append(("second", clock.now)))  # queued behind the blocked call
    assert not store.hold("a", lambda: returned.append(("a", clock.now)))  # not cut: answers at once
    while clock.next_time() is not None:
        clock.run_next()
    assert returned == [("first", 10.0), ("second", 10.0)]  # both give up when the first call times out
    assert not store.hold("b", lambda: None)  # past the timeout: the next call fails at once...
    with pytest.raises(RendezvousConnectionError, match="no answer within 8 s"):
        store.get_state("b")
    # ... and the agent's own connection to the round's store has a window of its own (its detection window)
    assert store.hold("b", lambda: returned.append(("round store", clock.now)), connection="round")
    while clock.next_time() is not None:
        clock.run_next()
    assert returned[2:] == [("round store", 15.0)]  # its first call, made at 10 s, gives up after 5 s
    assert not store.hold("b", lambda: None, connection="round")
    store.heal("b")
    assert store.get_state("b") is None


def test_a_call_blocked_on_a_silent_partition_returns_at_the_heal_and_a_refused_one_never_blocks():
    clock = VirtualClock()
    store = SimStore(clock, random.Random(0), call_timeout=8.0)
    returned: list[float] = []
    store.partition("b")
    assert store.hold("b", lambda: returned.append(clock.now))
    clock.now = 1.5
    store.heal("b")
    while clock.next_time() is not None:
        clock.run_next()
    assert returned == [1.5]  # once, at the heal, not again at the timeout
    store.partition("b", silent=False)  # connections closed: calls fail at once, nothing blocks
    assert not store.hold("b", lambda: None) and not store.hold("b", lambda: None, connection="round")


def test_node_clock_is_skewed_wall_time_and_refuses_to_block():
    clock = VirtualClock()
    node = NodeClock(clock, skew=2.0)
    clock.now = 5.0
    assert node.monotonic() == 5.0
    assert node.time() - NodeClock(clock).time() == pytest.approx(2.0)
    with pytest.raises(RuntimeError, match="cannot sleep"):
        node.sleep(1)


# ------------------------------------------------------------------ runs


def test_quiet_run_succeeds_through_the_real_state_machine():
    s = scenario()
    sim = Simulation(s)
    result = sim.run()
    checked = check(result.history, s)
    assert checked.ok, [str(v) for v in checked.violations]
    assert result.outcome == "succeeded" and result.stopped_by == "done"
    completes = result.history.filter(h.RDZV_COMPLETE)
    assert sorted(e.rank for e in completes) == [0, 1, 2] and {e.world_size for e in completes} == {3}
    # The store holds the real rendezvous state, written by the real stepper: decodable, closed at the end.
    state = RendezvousState.from_bytes(sim.store.current())
    assert state.closed and state.round == 0 and state.world_size == 3
    assert result.store["set_calls"] >= 3 and result.store["get_calls"] > result.store["set_calls"]
    # job: 6 steps of 0.5 s after the round formed
    succeeded = result.history.filter(h.JOB_SUCCEEDED)[0]
    assert 3.0 <= succeeded.t <= 3.0 + 1.0


def test_same_seed_same_history_other_seed_other_timing():
    s = scenario(faults=[{"at": 1.0, "fault": "kill_worker", "node": 1, "rank": 1}], seed=5)
    a = [e.to_dict() for e in run_virtual(s).history]
    b = [e.to_dict() for e in run_virtual(s).history]
    assert a == b
    c = [e.to_dict() for e in run_virtual(scenario(faults=s.to_dict()["faults"], seed=6)).history]
    assert c != a


def test_worker_failure_restarts_everyone_into_a_new_round_with_one_job_restart():
    result = run_checked(scenario(faults=[{"at": 1.5, "fault": "kill_worker", "node": 1, "rank": 0}]))
    hist = result.history
    failed = hist.filter(h.WORKER_FAILED)
    assert [(e.node, e.detail["local_rank"]) for e in failed] == [("node1", 0)]
    restarts = hist.filter(h.RESTART)
    assert {e.node: e.detail["reason"] for e in restarts} == {"node1": "worker_failed", "node0": "membership", "node2": "membership"}
    second = [e for e in hist.filter(h.WORKER_START) if e.round == 1]
    assert len(second) == 6 and {e.detail["restart_count"] for e in second} == {1}
    assert result.outcome == "succeeded"


def test_restarts_exhausted_fails_the_job_and_closes_the_run():
    faults = [{"at": 1.0 + i, "fault": "kill_worker", "node": 0, "rank": 0} for i in range(3)]
    result = run_checked(scenario(faults=faults, expect={"outcome": "failed"}))
    assert result.outcome == "failed"
    assert "max_restarts=2 is exhausted" in result.history.filter(h.JOB_FAILED)[0].detail["reason"]
    exits = {e.node: e.state for e in result.history.filter(h.AGENT_EXIT)}
    assert exits["node0"] == "FAILED" and set(exits) == {"node0", "node1", "node2"}


def test_killed_agent_is_evicted_and_survivors_reform_within_the_detection_window():
    result = run_checked(scenario(faults=[{"at": 1.0, "fault": "kill_agent", "node": 2}]))
    hist = result.history
    later = [e for e in hist.filter(h.RDZV_COMPLETE) if e.t > 1.0]
    assert {e.node for e in later} == {"node0", "node1"} and {e.world_size for e in later} == {2}
    # evicted after heartbeat (0.5) x 3 missed beats, noticed at the next monitor tick
    assert max(e.t for e in later) - 1.0 < 0.5 * 3 + 1.0
    assert result.outcome == "succeeded"


def test_scale_up_and_graceful_leave():
    faults = [{"at": 1.0, "fault": "add_node", "node": 3}, {"at": 2.5, "fault": "remove_node", "node": 0}]
    result = run_checked(scenario(faults=faults))
    sizes = [(e.round, e.world_size) for e in result.history.filter(h.RDZV_COMPLETE, node="node1")]
    assert [ws for _, ws in sizes] == [3, 4, 3]
    ops = [e.detail["op"] for e in result.history.filter(h.OP)]
    assert ops == ["add_node", "remove_node"]
    assert {e.node: e.state for e in result.history.filter(h.AGENT_EXIT)}["node0"] == "LEFT"


def test_partition_longer_than_the_store_timeout_fails_only_that_node():
    faults = [{"at": 1.0, "fault": "kill_worker", "node": 0, "rank": 0},
              {"at": 1.0, "fault": "partition", "node": 0, "duration": 20, "args": {"mode": "drop"}}]
    result = run_checked(scenario(faults=faults))
    exits = {e.node: e for e in result.history.filter(h.AGENT_EXIT)}
    assert exits["node0"].state == "FAILED" and "partitioned" in exits["node0"].detail["reason"]
    assert exits["node0"].t < 21.0
    assert result.outcome == "succeeded"


def test_a_partition_mode_other_than_blackhole_or_drop_is_refused_naming_it():
    from simulator.scenario import ScenarioError

    bad = [{"at": 1.0, "fault": "partition", "node": 0, "duration": 1, "args": {"mode": "blackhol"}}]
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.args\.mode='blackhol': must be 'blackhole' or 'drop'$"):
        scenario(faults=bad)


def test_a_silently_partitioned_node_gives_up_within_its_bounds_not_at_the_heal():
    # As live: the failed node's agent asks the round's store whether a peer failed the job; that call (on the agent's
    # own connection) and the rendezvous calls are each bounded, so the node gives up on the store after the outage
    # window instead of hanging until the network heals (20 s later); the others finish without it.
    faults = [{"at": 1.0, "fault": "kill_worker", "node": 0, "rank": 0},
              {"at": 1.0, "fault": "partition", "node": 0, "duration": 20}]
    result = run_checked(scenario(faults=faults))
    (node0,) = result.history.filter(h.AGENT_EXIT, node="node0")
    assert node0.state == "FAILED" and "partitioned" in node0.detail["reason"], node0.detail
    assert 1.0 + 1.5 < node0.t < 10.0  # past a bounded call (1.5 s), far before the heal at 21 s
    assert result.outcome == "succeeded"


def test_a_join_rides_out_a_refused_store_for_the_store_liveness_bound_not_the_close_timeout():
    # node2 starts cut off (connections refused): its join retries for the heartbeat expiry (0.5 s x 3), the live
    # handler's default bound, then fails; the close timeout (5 s) plays no part.
    faults = [{"at": 0.0, "fault": "partition", "node": 2, "duration": 30, "args": {"mode": "drop"}}]
    result = run_virtual(scenario(faults=faults))
    start = result.history.filter(h.AGENT_START, node="node2")[0].t
    exit2 = result.history.filter(h.AGENT_EXIT, node="node2")[0]
    assert exit2.state == "FAILED" and "while node node2" in exit2.detail["reason"], exit2.detail
    assert 1.5 <= exit2.t - start < 1.5 + 0.5
    assert result.outcome == "succeeded"


def test_paused_agent_is_evicted_then_rejoins_after_resume():
    faults = [{"at": 1.0, "fault": "pause_agent", "node": 1, "duration": 4}]
    result = run_checked(scenario(job={"steps": 20, "step_seconds": 0.5}, faults=faults))
    node1 = [e.round for e in result.history.filter(h.RDZV_COMPLETE, node="node1")]
    others = [e for e in result.history.filter(h.RDZV_COMPLETE, node="node0") if 1.0 < e.t < 5.0]
    assert others and others[0].world_size == 2  # re-formed without the paused node
    assert len(node1) >= 2  # and it came back
    assert result.outcome == "succeeded"


def test_store_restart_and_delay_and_clock_skew_are_survived():
    faults = [
        {"at": 1.0, "fault": "restart_store", "duration": 1.0},
        {"at": 2.5, "fault": "delay", "node": 1, "seconds": 0.2, "duration": 1.0},
        {"at": 3.0, "fault": "clock_skew", "node": 2, "seconds": 0.3, "duration": 2.0},
        {"at": 3.2, "fault": "kill_worker", "node": 2, "rank": 1},
    ]
    # Long enough to outlast the last fault (the restart re-forms without a last call now: a 3 s job ends first).
    result = run_checked(scenario(faults=faults, job={"steps": 12, "step_seconds": 0.5}))
    assert len(result.history.filter(h.FAULT_END)) == 3
    assert result.outcome == "succeeded"


def test_a_non_persistent_store_restart_fails_the_job_like_a_tcpstore_restart():
    """persistent: false models the live c10d store: empty after the restart, and no client ever reconnects."""
    faults = [{"at": 1.0, "fault": "restart_store", "duration": 0.5}]
    s = scenario(faults=faults, store={"latency": 0.005, "persistent": False}, job={"steps": 30, "step_seconds": 0.5},
                 expect={"outcome": "failed"})
    result = run_checked(s)
    assert result.outcome == "failed"
    exits = result.history.filter(h.AGENT_EXIT)
    assert len(exits) == 3 and all("do not reconnect" in (e.detail.get("reason") or "") for e in exits), exits
    assert max(e.t for e in exits) < 1.0 + 5 + 2  # bounded by the store timeout (close: 5 s), not the time limit
    persistent = run_checked(scenario(faults=faults, job={"steps": 30, "step_seconds": 0.5}))  # default: like etcd
    assert persistent.outcome == "succeeded"


def test_too_few_nodes_times_out_the_join():
    result = run_virtual(scenario(nodes=1, min_nodes=2, timeouts={**BASE["timeouts"], "join": 3}))
    exit_ = result.history.filter(h.AGENT_EXIT)[0]
    assert exit_.state == "FAILED" and "join timeout" in exit_.detail["reason"]
    assert result.outcome == "failed" and 3.0 <= exit_.t <= 5.0


def test_broken_cas_breaks_a_contended_rendezvous():
    """The TEST-ONLY store flag really breaks the protocol (the fuzz test relies on it)."""
    violated = set()
    for seed in range(6):
        s = scenario(nodes=4, store={"latency": 0.2, "broken_cas": True}, seed=seed)
        violated |= set(check(run_virtual(s).history, s).violated)
    assert violated & {"ranks_unique", "membership_agreement", "rounds_monotonic"}


def test_rendezvous_round_reports_cost():
    out = run_rendezvous_round(50, seed=3)
    assert out["completed"] and out["nodes"] == 50
    assert out["store_calls"] >= 50 and out["store_bytes"] > 0 and out["events"] > 50


def test_live_scenarios_are_refused():
    with pytest.raises(ValueError, match="mode: virtual"):
        Simulation(scenario_from_dict({"name": "l", "mode": "live"}))


@pytest.mark.slow
def test_thousand_node_rendezvous_with_faults():
    faults = [{"at": 0.02, "fault": "kill_agent", "node": 7}, {"at": 0.03, "fault": "partition", "node": 9, "duration": 0.5}]
    s = scenario_from_dict({
        "name": "1000", "nodes": 1000, "min_nodes": 900, "max_nodes": 1000, "workers_per_node": 1,
        "timeouts": {"join": 60, "last_call": 1, "heartbeat": 5, "close": 10, "monitor": 5},
        "job": {"steps": 1, "step_seconds": 1}, "store": {"latency": 0.0, "keyed": True}, "faults": faults,
    })
    sim = Simulation(s, record_participants=False)
    result = sim.run(stop_when=lambda s_: len(s_.ranked) >= 999)
    assert len(sim.ranked) >= 999
    ws = {e.world_size for e in result.history.filter(h.RDZV_COMPLETE)}
    assert ws and all(900 <= w <= 1000 for w in ws)
