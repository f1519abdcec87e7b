"""Every scenario of the library runs in live mode (real agents, store, faults) and passes the checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator import history as h
from simulator.checker import check
from simulator.live import run_scenario
from simulator.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[3] / "simulator" / "scenarios"
NAMES = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))

pytestmark = pytest.mark.slow


def _run(name: str, tmp_path):
    scenario = load_scenario(SCENARIOS / f"{name}.yaml")
    assert scenario.mode == "live"
    history = run_scenario(scenario, tmp_path / name)
    result = check(history, scenario)
    assert (tmp_path / name / "history.jsonl").is_file()
    return scenario, history, result


def _explain(history, result) -> str:
    lines = [str(v) for v in result.violations]
    lines += [str(e.to_dict())[:220] for e in history if e.event not in (h.WORKER_START, h.WORKER_EXIT)]
    return "\n".join(lines)


def _final_world_size(history) -> int:
    last = max(e.round for e in history.filter(h.RDZV_COMPLETE))
    sizes = {e.world_size for e in history.filter(h.RDZV_COMPLETE) if e.round == last}
    assert len(sizes) == 1, sizes
    return sizes.pop()


def test_library_has_every_issue_scenario():
    assert set(NAMES) >= {
        "worker_crash_loop", "agent_loss_and_rejoin", "scale_up_2_to_4", "scale_down",
        "store_partition_during_rendezvous", "store_restart", "straggler_heartbeats", "timer_expiry", "cascade",
        "clock_skew", "store_host_loss", "etcd_leader_loss", "etcd_freeze", "daemon_orphan",
        "netns_isolate_during_training", "netns_split_during_rendezvous", "netns_store_host_isolated",
    }


def _needs_netns(name: str) -> None:
    if load_scenario(SCENARIOS / f"{name}.yaml").network == "netns":
        from fault_injection.netns import unavailable_reason

        why = unavailable_reason()
        if why is not None:
            pytest.skip(f"needs network namespaces: {why}")


def _fault_window(history, fault: str) -> tuple[float, float]:
    start = next(e for e in history.filter(h.FAULT_START) if e.detail["fault"] == fault)
    end = next(e for e in history.filter(h.FAULT_END) if e.detail["fault"] == fault)
    return start.t, end.t


def _check_netns_scenario(name: str, history, result) -> None:
    """What each namespace scenario shows beyond the checker (see each scenario's description)."""
    network = next(e.detail for e in history.filter(h.OP) if e.detail.get("op") == "network")
    assert network["mode"] == "netns", network
    completes = history.filter(h.RDZV_COMPLETE)
    if name == "netns_isolate_during_training":
        cut, healed = _fault_window(history, "isolate_node")
        # node0 trains alone during the cut; node1, reaching nobody, completes no round until the heal
        alone = [e for e in completes if e.node == "node0" and e.world_size == 1 and cut < e.t < healed]
        assert alone and not [e for e in completes if e.node == "node1" and cut < e.t < healed], \
            _explain(history, result)
        # whether node0's hung all-reduce fails before the eviction varies from run to run (gloo timeout seen ~5.5 s
        # after the cut with a 2 s group timeout in one run, not within 8 s in another): reported, not asserted
        hung = [e for e in history.filter(h.WORKER_FAILED, "node0") if cut < e.t < healed]
        print(f"isolated node1: node0's collective failed: {f'{hung[0].t - cut:.1f} s after the cut' if hung else 'no'}"
              f"; node0 trained alone {alone[0].t - cut:.1f} s after the cut; world size 2 again "
              f"{min(e.t for e in completes if e.t > healed) - healed:.1f} s after the heal")
    if name == "netns_split_during_rendezvous":
        cut, healed = _fault_window(history, "split_cluster")
        during = [e for e in completes if cut < e.t < healed]
        assert {e.node for e in during} == {"node0", "node1"}, _explain(history, result)  # the store's side only
        assert {e.world_size for e in during} == {2}, _explain(history, result)
    if name == "netns_store_host_isolated":
        cut, healed = _fault_window(history, "isolate_node")
        assert not [e for e in completes if e.node == "node0" and e.t > cut], _explain(history, result)
        failed_over = [e for e in completes if e.node in ("node1", "node2") and cut < e.t < healed]
        assert {e.world_size for e in failed_over} == {2}, _explain(history, result)
        exit0 = history.filter(h.AGENT_EXIT, "node0")[0]
        assert exit0.t > healed and exit0.detail["error"].startswith("StoreHostDeposed"), exit0.detail
        assert history.filter(h.JOB_SUCCEEDED)[0].detail["deposed_nodes"] == ["node0"]
        print(f"store host node0 isolated: node1+node2 re-formed at 2 on the successor's store "
              f"{min(e.t for e in failed_over) - cut:.1f} s after the cut; node0 deposed {exit0.t - healed:.1f} s "
              "after the heal")


def _needs_etcd(name: str) -> None:
    if load_scenario(SCENARIOS / f"{name}.yaml").backend.startswith("etcd"):
        from elastic_impl.rendezvous.etcd_server import find_etcd_binary

        try:
            find_etcd_binary()
        except FileNotFoundError as e:
            pytest.skip(f"needs the etcd binary: {e}")


def _daemon_pids(out_dir) -> set[int]:
    """Pids of the daemons the workers double-forked (simulator/live/worker.py writes markers/daemon.<pid>)."""
    return {int(p.name.split(".", 1)[1]) for p in out_dir.glob("node*/markers/daemon.*")}


# Scenarios whose outcome depends on a race the runtime does not settle yet: run them by hand (elastic-sim run).
NOT_SETTLED: dict[str, str] = {}


@pytest.mark.parametrize("name", NAMES)
def test_scenario_runs_live_and_passes_the_checker(name, tmp_path):
    if name in NOT_SETTLED:
        pytest.skip(NOT_SETTLED[name])
    _needs_etcd(name)
    _needs_netns(name)
    scenario, history, result = _run(name, tmp_path)
    assert result.ok, _explain(history, result)
    if name.startswith("netns_"):
        _check_netns_scenario(name, history, result)
    # every scheduled fault fired (or, for add/remove, the op happened)
    fired = [e for e in history if e.event == h.FAULT_START or (e.event == h.OP and e.detail.get("op") in
                                                                ("add_node", "remove_node"))]
    assert len(fired) >= len([f for f in scenario.faults if f.fault != "heal"]), _explain(history, result)
    assert history.filter(h.ORPHAN_CHECK) and not history.filter(h.ORPHAN_CHECK)[-1].detail["orphans"]
    extra = scenario.expect.extra
    if "final_world_size" in extra:
        assert _final_world_size(history) == extra["final_world_size"], _explain(history, result)
    if "error_mentions" in extra:
        failed = history.filter(h.JOB_FAILED)[0]
        errors = failed.detail.get("errors") or {}
        assert errors and all(extra["error_mentions"] in msg for msg in errors.values()), failed.detail
    if name == "worker_crash_loop":
        failures = history.filter(h.WORKER_FAILED, "node1")
        assert len(failures) == scenario.max_restarts + 1
        assert all(e.detail["signal"] == "SIGKILL" for e in failures)
    if name == "timer_expiry":
        failed = history.filter(h.WORKER_FAILED, "node0")
        assert [e.detail["signal"] for e in failed] == ["SIGKILL"]  # reaped by the timer server
        assert failed[0].detail["local_rank"] == 1
    if name == "cascade":
        # node2, frozen past the heartbeat window and evicted, must come back once thawed (it used to sit in its old
        # round's exit barrier, or blame the store for its own freeze and close the run for everyone)
        thawed = next(e for e in history.filter(h.FAULT_END) if e.detail["fault"] == "pause_agent")
        assert [e for e in history.filter(h.RDZV_COMPLETE, "node2") if e.t > thawed.t], _explain(history, result)
    if name == "store_host_loss":
        # the store died with node0: a survivor took it over (both survivors name the successor)
        logs = "".join((tmp_path / name / f"node{i}" / "agent.err").read_text() for i in (1, 2))
        assert logs.count("now hosts the rendezvous store") >= 2, logs[-2000:]
    if name == "etcd_leader_loss":
        killed = next(e for e in history.filter(h.FAULT_START) if e.detail["fault"] == "kill_store_leader")
        assert killed.detail["member"], killed.detail  # a leader was found and killed
        rejoined = [e for e in history.filter(h.RDZV_COMPLETE) if e.t > killed.t]
        assert {e.node for e in rejoined} == {"node0", "node1"}, _explain(history, result)
    if name == "etcd_freeze":
        frozen = next(e for e in history.filter(h.FAULT_START) if e.detail["fault"] == "freeze_store")
        thawed = next(e for e in history.filter(h.FAULT_END) if e.detail["fault"] == "freeze_store")
        t = scenario.timeouts
        assert thawed.t - frozen.t > t.heartbeat * t.keep_alive_max_attempt  # frozen past the heartbeat expiry
        evictions = [e for e in history.filter(h.OP) if e.detail.get("op") == "rdzv.evict"]
        assert not evictions and not history.filter(h.RESTART), _explain(history, result)
    if name == "daemon_orphan":
        # every worker start (2 nodes x 2 attempts) double-forked a daemon, and none is left (orphan check above)
        assert len(_daemon_pids(tmp_path / name)) == len(history.filter(h.WORKER_START)) == 4
    if name == "agent_loss_and_rejoin":
        kill = next(e for e in history.filter(h.FAULT_START) if e.detail["fault"] == "kill_agent")
        reacted = next(e for e in history.filter(h.RESTART, "node0") if e.t > kill.t)
        t = scenario.timeouts
        assert reacted.t - kill.t <= t.heartbeat * (t.keep_alive_max_attempt + 2) + 2


def test_the_orphan_check_finds_a_daemon_the_runtime_missed(tmp_path):
    """The daemon_orphan scenario can fail: with its daemons started without the runtime's worker-group mark
    (ELASTIC_IMPL_WORKER_GROUP, which is how the agent finds a double-forked daemon outside its workers' trees and
    sessions), the runtime leaves them running and the orphan check reports exactly them."""
    from simulator.live.runner import cluster_for
    from simulator.live.worker import DAEMON_ENV

    scenario = load_scenario(SCENARIOS / "daemon_orphan.yaml")
    out = tmp_path / "unmarked"
    cluster = cluster_for(scenario, out).configure(env={DAEMON_ENV: "drop-group-mark"})
    history = run_scenario(scenario, out, cluster=cluster)
    result = check(history, scenario)
    assert result.violated == ["no_orphans"], _explain(history, result)
    # Only daemons are reported. Not always all 4: the agent also remembers its workers' trees at each poll, and a
    # poll that lands between the double fork and the intermediate's exit still catches that daemon.
    orphans = set(history.filter(h.ORPHAN_CHECK)[-1].detail["orphans"])
    daemons = _daemon_pids(out)
    assert len(daemons) == 4 and orphans and orphans <= daemons, (orphans, daemons)


def test_straggler_with_late_heartbeats_is_not_evicted(tmp_path):
    # The scenario's 5 s window holds on a quiet machine (0 evictions in every run), but in CI two live clusters
    # share 2 cores and a beat occasionally lands later than that. The claim tested here, on a window of 8 beats:
    # a starved, slow node's heartbeats keep landing (they used to queue behind the agent's polls and give up).
    from dataclasses import replace

    base = load_scenario(SCENARIOS / "straggler_heartbeats.yaml")
    scenario = replace(base, timeouts=replace(base.timeouts, keep_alive_max_attempt=8))
    history = run_scenario(scenario, tmp_path / "straggler_heartbeats")
    result = check(history, scenario)
    assert result.ok, _explain(history, result)
    evictions = [e for e in history.filter(h.OP) if e.detail.get("op") == "rdzv.evict"]
    assert not evictions and not history.filter(h.RESTART), _explain(history, result)


def test_a_node_with_a_skewed_clock_is_not_evicted(tmp_path):
    scenario, history, result = _run("clock_skew", tmp_path)
    assert result.ok, _explain(history, result)
    evictions = [e for e in history.filter(h.OP) if e.detail.get("op") == "rdzv.evict"]
    assert not evictions, f"{len(evictions)} evictions of a live node, first at t={evictions[0].t}"


# The same library against the real etcd server (etcd-v3: leases as heartbeats, transactions as compare-and-set).
# etcd keeps its data across a restart and its clients reconnect, so there the store restart is survivable.
ETCD_RUNS = {"agent_loss_and_rejoin": "succeeded", "cascade": "succeeded", "store_restart": "succeeded"}


@pytest.mark.parametrize("name", sorted(ETCD_RUNS))
def test_scenario_runs_live_on_etcd(name, tmp_path):
    from dataclasses import replace

    from elastic_impl.rendezvous.etcd_server import find_etcd_binary

    try:
        find_etcd_binary()
    except FileNotFoundError as e:
        pytest.skip(f"needs the etcd binary: {e}")

    base = load_scenario(SCENARIOS / f"{name}.yaml")
    scenario = replace(base, backend="etcd-v3", expect=replace(base.expect, outcome=ETCD_RUNS[name], extra={
        k: v for k, v in base.expect.extra.items() if k != "error_mentions"}))
    history = run_scenario(scenario, tmp_path / name)
    result = check(history, scenario)
    assert result.ok, _explain(history, result)
    assert history.filter(h.ORPHAN_CHECK) and not history.filter(h.ORPHAN_CHECK)[-1].detail["orphans"]
