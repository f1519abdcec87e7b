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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
        store_host=scenario.store.hosted_by_node,
        store_members=scenario.store.members,
        network=scenario.network,
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


@dataclass
class LiveProgress:
    """Where a live run is, for progress output: handed to ``run_scenario(progress=...)`` about twice a second."""

    phase: str  # starting | waiting for workers | faults | recovering | closing
    elapsed: float  # seconds since run_scenario began
    nodes_up: int  # agents running now (pre-started spares not counted)
    nodes: int  # agents started so far
    faults_fired: int
    faults: int  # faults in the schedule
    network: str | None = None  # netns | proxy once the cluster started (None before)

    def line(self) -> str:
        return (f"live {self.phase:<19} {self.elapsed:7.1f} s  nodes up {self.nodes_up}/{self.nodes}  "
                f"faults fired {self.faults_fired}/{self.faults}  network {self.network or '?'}")


class _Reporter:
    """Calls ``progress`` with a :class:`LiveProgress` every ``interval`` seconds from a thread, until closed."""

    def __init__(self, progress: Callable[[LiveProgress], None] | None, cluster: Cluster, faults: int,
                 interval: float = 0.5) -> None:
        self.progress, self.cluster, self.faults, self.interval = progress, cluster, faults, interval
        self.phase = "starting"
        self.fired = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the thread and phase changes both report: one line at a time
        self._thread = threading.Thread(target=self._loop, name="sim-progress", daemon=True)
        if progress is not None:
            self._thread.start()

    def snapshot(self) -> LiveProgress:
        up, started = self.cluster.node_counts()
        return LiveProgress(self.phase, time.monotonic() - self._t0, up, started, self.fired, self.faults,
                            self.cluster.network_mode)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._report()

    def _report(self) -> None:
        try:
            with self._lock:
                self.progress(self.snapshot())
        except Exception as e:  # progress output must never break the run
            logger.warning("progress: %s", e)

    def set(self, phase: str) -> None:
        self.phase = phase
        if self.progress is not None:
            self._report()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _run_schedule(cluster: Cluster, scenario, limit: float, reporter: _Reporter) -> None:
    cluster.start(nodes=scenario.nodes, spares=sum(1 for f in scenario.faults if f.fault == "add_node"))
    launched = time.monotonic()
    reporter.set("waiting for workers")
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
    reporter.set("faults")
    while queue:
        at, _, action, item = heapq.heappop(queue)
        # Never past the time limit: a heal (or a fault counted from job_running) due after it is abandoned there.
        delay = min(t0 + at, t0 + limit + 0.01) - time.monotonic()
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
        reporter.fired += 1
        if healable is not None and item.duration:
            heapq.heappush(queue, (max(at, time.monotonic() - t0) + item.duration, next(seq), "heal", healable))
    cluster.heal()
    reporter.set("recovering")
    remaining = limit - (time.monotonic() - t0)
    cluster.wait(timeout=max(_MIN_WAIT, remaining))


def run_scenario(scenario, out_dir: str | Path | None = None, *, cluster: Cluster | None = None,
                 progress: Callable[[LiveProgress], None] | None = None) -> History:
    """Run ``scenario`` (a Scenario or a path) live under ``out_dir`` (default: a new temp dir); return the history
    (also written to ``out_dir/history.jsonl``). Always cleans up every process it started. ``progress`` is called
    with a :class:`LiveProgress` at each phase change and about twice a second."""
    if isinstance(scenario, (str, Path)):
        from simulator.scenario import load_scenario

        scenario = load_scenario(scenario)
    if scenario.mode != "live":
        raise LiveError(f"scenario {scenario.name!r} has mode={scenario.mode!r}; run_scenario runs mode=live only")
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="elastic-sim-live-"))
    cluster = cluster or cluster_for(scenario, out_dir)
    limit = float(scenario.time_limit)
    reporter = _Reporter(progress, cluster, len(scenario.faults))
    try:
        with cluster:
            _run_schedule(cluster, scenario, limit, reporter)
            reporter.set("closing")
    finally:
        reporter.close()
    return cluster.history
