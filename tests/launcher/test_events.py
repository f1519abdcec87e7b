"""The agent's structured events (what the simulator builds its history from), via ELASTIC_IMPL_EVENTS_FILE."""

from __future__ import annotations

import json

from tests.launcher.conftest import RUNTIME, TRAIN, requires

pytestmark = requires(*RUNTIME, "elastic_impl.events")

COMMON = ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", "--max-restarts", "1"]
BASE_KEYS = {"run_id", "node_id"}


def _agent_events(path) -> list[dict]:
    events = []
    with open(path) as f:
        for line in f:
            event = json.loads(line)
            if event["name"].startswith("agent."):
                events.append(event)
    return events


def test_restart_run_emits_lifecycle_events_in_order(launcher, tmp_path):
    events_file = tmp_path / "events.jsonl"
    proc = launcher.start(
        [*COMMON, TRAIN],
        ELASTIC_IMPL_EVENTS_FILE=events_file,
        TRAIN_FAIL_RANK="1",
        TRAIN_FAIL_ATTEMPT="0",
        TRAIN_FAIL_MODE="exit",
        TRAIN_ALLREDUCE="1",
    )
    assert launcher.wait(proc, 120) == 0, launcher.output(proc)[1][-3000:]
    events = _agent_events(events_file)
    names = [e["name"] for e in events]
    assert names == [
        "agent.rendezvous",
        "agent.workers_started",
        "agent.worker_failed",
        "agent.restart",
        "agent.workers_stopped",  # the old group is down (the benchmarks' recovery breakdown reads when)
        "agent.rendezvous",
        "agent.workers_started",
        "agent.exit",
    ], names
    by_name = {}
    for e in events:
        assert e["source"] in ("AGENT", "EventSource.AGENT")
        assert BASE_KEYS <= set(e["metadata"]), e
        by_name.setdefault(e["name"], []).append(e["metadata"])
    first, second = by_name["agent.rendezvous"]
    for md in (first, second):
        assert {"round", "group_rank", "group_world_size", "restart_count"} <= set(md)
        assert (md["group_rank"], md["group_world_size"]) == (0, 1)
    assert (first["restart_count"], second["restart_count"]) == (0, 1)
    started = by_name["agent.workers_started"][0]
    assert sorted(started["ranks"]) == [0, 1] and len(started["pids"]) == 2
    failed = by_name["agent.worker_failed"][0]
    assert (failed["rank"], failed["exitcode"], failed["signal"]) == (1, 3, None)
    assert by_name["agent.restart"][0]["restart_count"] == 1
    assert {"round", "restart_count"} <= set(by_name["agent.workers_stopped"][0])
    assert by_name["agent.exit"][0]["state"] == "SUCCEEDED"
