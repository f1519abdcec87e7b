"""Run a scenario in live mode: start the cluster, apply the fault schedule (the nemesis), wait, check for orphans.

History time ``t = 0`` is when the agents are launched. A fault's ``at`` counts from when the job is RUNNING (every
initial node has started its workers; recorded as the op ``job_running``), because how long agents take to start
depends on the machine's load; ``args: {from: launch}`` counts from the launch instead. Faults that act on a worker
(``kill_worker``, ``expire_timer``) also wait (bounded) until the target node runs a worker the nemesis has not
already hit, so a slow restart delays the fault instead of making it miss. Faults with a ``duration`` are healed after
it; when the schedule is done every remaining fault is healed (the job must then complete: liveness).

Live-only fault options (in the scenario's ``args``): ``partition`` ``mode: blackhole|drop`` (default blackhole);
``pause_agent`` ``period``/``stop``: stop the agent ``stop`` s out of every ``period`` s (late heartbeats) instead
of one long pause.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from fault_injection import FaultError
from simulator import history as h
from simulator.faults import inject_live
from simulator.history import History
from simulator.live.cluster import Cluster, LiveError

__all__ = ["run_scenario", "cluster_for"]

logger = logging.getLogger(__name__)

# Budget for the job to end once the schedule is over, on top of the scenario's own work.
_MIN_WAIT = 30.0


def cluster_for(scenario, out_dir: str | Path) -> Cluster:
    """A :class:`Cluster` configured like ``scenario`` (not started)."""
    return Cluster(
        out_dir,
        workers_per_node=scenario.workers_per_node,
        min_nodes=scenario.min_nodes,
        max_nodes=scenario.max_nodes,
        max_restarts=scenario.max_restarts,
        backend=scenario.backend,
        timeouts=scenario.timeouts.to_dict(),
        job=scenario.job.to_dict(),
        run_id=f"sim-{_slug(scenario.name)}",
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] or "scenario"


def _wait_running(cluster: Cluster, scenario, deadline: float) -> None:
    """Wait until every initial node started workers (bounded); record ``job_running`` (or why not)."""
    while time.monotonic() < deadline:
        started = {e.node for e in cluster.history.filter(h.WORKER_START)}
        if all(f"node{i}" in started for i in range(scenario.nodes)):
            cluster.record("nemesis", h.OP, detail={"op": "job_running"})
            return
        if not any(n.running() for n in cluster.nodes):
            break
        time.sleep(0.1)
    cluster.record("nemesis", h.OP, detail={"op": "job_not_running", "reason": "not every node started workers"})


def run_scenario(scenario, out_dir: str | Path | None = None, *, cluster: Cluster | None = None) -> History:
    """Run ``scenario`` (a Scenario or a path) live under ``out_dir`` (default: a new temp dir); return the history
    (also written to ``out_dir/history.jsonl``). Always cleans up every process it started."""
    if isinstance(scenario, (str, Path)):
        from simulator.scenario import load_scenario

        scenario = load_scenario(scenario)
    if scenario.mode != "live":
        raise LiveError(f"scenario {scenario.name!r} has mode={scenario.mode!r}; run_scenario runs mode=live only")
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="elastic-sim-live-"))
    cluster = cluster or cluster_for(scenario, out_dir)
    limit = float(scenario.time_limit)
    with cluster:
        cluster.start(nodes=scenario.nodes, spares=sum(1 for f in scenario.faults if f.fault == "add_node"))
        launched = time.monotonic()
        if any((f.args or {}).get("from") != "launch" for f in scenario.faults):
            _wait_running(cluster, scenario, deadline=launched + min(limit, scenario.timeouts.join + 30))
        running = time.monotonic()
        t0 = launched
        seq = itertools.count()
        queue: list[tuple[float, int, str, Any]] = [
            (f.at + (0.0 if (f.args or {}).get("from") == "launch" else running - launched), next(seq), "inject", f)
            for f in scenario.faults
        ]
        heapq.heapify(queue)
        while queue:
            at, _, action, item = heapq.heappop(queue)
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - t0 > limit:
                cluster.record("nemesis", h.OP, detail={"op": "schedule_abandoned", "reason": "time_limit"})
                break
            if action == "heal":
                item.heal()
                continue
            budget = max(5.0, limit - (time.monotonic() - t0))
            try:
                healable = inject_live(cluster, item, budget)
            except (LiveError, FaultError) as e:
                logger.warning("fault %s not applied: %s", item.describe(), e)
                cluster.record("nemesis", h.OP, detail={"op": "fault_not_applied", "fault": item.fault,
                                                        "node": item.node, "error": str(e)})
                continue
            if healable is not None and item.duration:
                heapq.heappush(queue, (max(at, time.monotonic() - t0) + item.duration, next(seq), "heal", healable))
        cluster.heal()
        remaining = limit - (time.monotonic() - t0)
        cluster.wait(timeout=max(_MIN_WAIT, remaining))
    return cluster.history
