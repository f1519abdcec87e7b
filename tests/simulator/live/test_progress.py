"""A live run says where it is while it runs: phase, elapsed time, nodes up and faults fired."""

from __future__ import annotations

import pytest

from simulator import history as h
from simulator.checker import check
from simulator.live import run_scenario
from simulator.scenario import scenario_from_dict

pytestmark = pytest.mark.slow


def test_live_progress_reports_phases_nodes_and_faults(tmp_path):
    scenario = scenario_from_dict({
        "name": "live progress", "mode": "live", "nodes": 2, "workers_per_node": 1, "max_restarts": 2,
        "timeouts": {"join": 60, "last_call": 1, "heartbeat": 1, "close": 10},
        "job": {"steps": 8, "step_seconds": 0.25}, "time_limit": 120,
        "faults": [{"at": 0.5, "fault": "kill_worker", "node": 1, "rank": 0}],
        "expect": {"outcome": "succeeded"},
    })
    seen = []
    history = run_scenario(scenario, tmp_path / "run", progress=seen.append)
    result = check(history, scenario)
    assert result.ok, [str(v) for v in result.violations]
    phases = list(dict.fromkeys(s.phase for s in seen))
    assert [p for p in phases if p != "starting"] == ["waiting for workers", "faults", "recovering", "closing"], phases
    assert max(s.nodes_up for s in seen) == 2 and all(s.nodes == 2 for s in seen if s.phase != "starting")
    assert seen[-1].faults_fired == 1 == len(history.filter(h.FAULT_START))
    assert all(b.elapsed >= a.elapsed for a, b in zip(seen, seen[1:], strict=False))
    assert "nodes up" in seen[-1].line() and "faults fired 1/1" in seen[-1].line()
