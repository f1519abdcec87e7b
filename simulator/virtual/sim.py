"""The virtual-time simulation: agents, the simulated store and the nemesis on one event queue."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elastic_impl.rendezvous.dynamic_rendezvous import RendezvousSettings, RendezvousTimeout
from elastic_impl.rendezvous.options import default_store_liveness_timeout

from .. import history as h
from ..faults import inject_virtual
from ..history import History
from ..scenario import Fault, Job, Scenario, StoreConfig, Timeouts
from .agent import RUNNING, SimAgent, node_name_of
from .clock import VirtualClock
from .store import SimStore

# Initial agents start within this many virtual seconds (process start-up spread), drawn from the seed.
START_SPREAD = 0.05


@dataclass
class _Round:
    number: int
    members: set[str]
    started: set[str] = field(default_factory=set)
    training: bool = False
    broken: bool = False
    begin: float = 0.0


@dataclass
class SimResult:
    history: History
    virtual_seconds: float
    wall_seconds: float
    events_processed: int
    store: dict[str, int]
    outcome: str | None
    stopped_by: str  # "done" | "time_limit" | "stop_when" | "idle"

    @property
    def events(self) -> int:
        """Simulation events processed (scheduled callbacks run)."""
        return self.events_processed


class Simulation:
    """One virtual run of ``scenario``. Deterministic: the same scenario (and seed) gives the same history."""

    def __init__(
        self,
        scenario: Scenario,
        record_participants: bool = True,
        progress: Callable[[float, float], None] | None = None,
        post_round_sync: bool = True,
    ) -> None:
        if scenario.mode != "virtual":
            raise ValueError(f"scenario {scenario.name!r} has mode={scenario.mode!r}; the virtual simulator needs mode: virtual")
        self.scenario = scenario
        self.record_participants = record_participants
        # Agents read the whole state once after each rendezvous (members, restart count) for the history's
        # participant lists; the real agent does not (see SimAgent._on_round), so the round benchmark turns it off.
        self.post_round_sync = post_round_sync
        self.progress = progress
        self.rng = random.Random(scenario.seed)
        self.clock = VirtualClock()
        cfg = scenario.store
        t = scenario.timeouts
        # As live with default options: a store call gets no answer for this long before the node gives it up, and a
        # join rides out a store that does not answer for as long.
        self.store_liveness_timeout = default_store_liveness_timeout(t.heartbeat, t.keep_alive_max_attempt)
        self.store = SimStore(self.clock, random.Random(scenario.seed + 1), cfg.latency, cfg.loss, cfg.broken_cas, cfg.keyed,
                              cfg.persistent, call_timeout=self.store_liveness_timeout,
                              round_call_timeout=t.heartbeat * t.keep_alive_max_attempt)
        self.settings = RendezvousSettings(
            run_id=f"sim-{scenario.seed}",
            min_nodes=scenario.min_nodes,
            max_nodes=scenario.max_nodes,
            timeout=RendezvousTimeout(join=t.join, last_call=t.last_call, close=t.close, heartbeat=t.heartbeat),
            keep_alive_interval=t.heartbeat,
            keep_alive_max_attempt=t.keep_alive_max_attempt,
        )
        self.history = History()
        self.agents: dict[int, SimAgent] = {}
        self.rounds: dict[int, _Round] = {}
        self.progress_steps = 0
        # Nodes that got a rank in some round.
        self.ranked: set[str] = set()
        self.outcome: str | None = None
        self._next_index = scenario.nodes
        self._tearing_down = False
        self._begun = False
        self._wall0 = time.perf_counter()
        self._next_report = 0.0

    # ------------------------------------------------------------------ job model

    def round_started(self, agent: SimAgent, number: int, participants) -> None:
        """``participants``: node names, or stepper node keys (``<name>_<pid>_<id>``) when names were not built."""
        rnd = self.rounds.get(number)
        if rnd is None:
            rnd = self.rounds[number] = _Round(number, {node_name_of(p) for p in participants})
        rnd.started.add(agent.name)
        self.ranked.add(agent.name)
        if not rnd.broken and not rnd.training and rnd.members <= rnd.started:
            # Every member's workers run: training resumes from the last checkpoint (one per step).
            rnd.training = True
            rnd.begin = self.clock.now
            remaining = self.scenario.job.steps - self.progress_steps
            self.clock.after(remaining * self.scenario.job.step_seconds, self._round_finished, rnd)

    def break_round(self, number: int | None) -> None:
        rnd = self.rounds.get(number) if number is not None else None
        if rnd is None or rnd.broken:
            return
        rnd.broken = True
        if rnd.training:
            done = int((self.clock.now - rnd.begin) / self.scenario.job.step_seconds + 1e-9)
            self.progress_steps = min(self.scenario.job.steps, self.progress_steps + done)

    def _round_finished(self, rnd: _Round) -> None:
        if rnd.broken:
            return
        self.progress_steps = self.scenario.job.steps
        for agent in self.agents.values():
            if agent.alive and agent.status == "running" and agent.round == rnd.number and agent.name in rnd.members:
                agent.succeeded = True  # the agent notices at its next monitor tick

    def job_succeeded(self) -> None:
        if self.outcome is None:
            self.outcome = "succeeded"
            self.history.record(self.clock.now, "job", h.JOB_SUCCEEDED, state="SUCCEEDED")

    def job_failed(self, reason: str) -> None:
        if self.outcome is None:
            self.outcome = "failed"
            self.history.record(self.clock.now, "job", h.JOB_FAILED, state="FAILED", detail={"reason": reason})

    def agent_exited(self, agent: SimAgent) -> None:
        if self._tearing_down:
            return  # stopped by the simulation's end, not by the job: no outcome (the checker calls that a hang)
        if self.outcome is None and not any(a.alive for a in self.agents.values()) and not self._nodes_still_coming():
            self.job_failed("every agent exited before the job succeeded")

    def _nodes_still_coming(self) -> bool:
        return any(f.fault == "add_node" and f.at > self.clock.now for f in self.scenario.faults)

    # ------------------------------------------------------------------ nemesis

    @property
    def next_node_index(self) -> int:
        """The index the next added node gets (node indices 0 .. this - 1 have been used)."""
        return self._next_index

    def add_node(self, index: int | None) -> bool:
        """Start one more agent (``index``: its node index; None: the next free one); False if it exists."""
        index = index if index is not None else self._next_index
        if index in self.agents:
            return False
        self._next_index = max(self._next_index, index + 1)
        self.history.record(self.clock.now, "client", h.OP, detail={"op": "add_node", "node": f"node{index}"})
        self._start_agent(index)
        return True

    def remove_node(self, index: int) -> bool:
        """SIGTERM node ``index``'s agent (it leaves the rendezvous); False if it is not running."""
        agent = self.agents.get(index)
        if agent is None or not agent.alive:
            return False
        self.history.record(self.clock.now, "client", h.OP, detail={"op": "remove_node", "node": agent.name})
        return agent.leave()

    def _apply(self, fault: Fault) -> None:
        """Inject a scheduled fault through its registry entry (simulator.faults) and record it."""
        detail: dict[str, Any] = fault.to_dict()
        detail.pop("at", None)
        if fault.node is not None:
            detail["target"] = f"node{fault.node}"
        fired, undo, duration = inject_virtual(self, fault)
        if not fired:
            detail["noop"] = True
        # Recorded after the action so the history shows the fault next to its first effects, at the same time.
        self.history.record(self.clock.now, "nemesis", h.FAULT_START, detail=detail)
        if fired and undo is not None and duration is not None:
            self.clock.after(duration, self._undo, undo, detail)

    def _undo(self, undo: Callable[[], None], detail: dict[str, Any]) -> None:
        undo()
        self.history.record(self.clock.now, "nemesis", h.FAULT_END, detail=detail)

    # ------------------------------------------------------------------ running

    def _start_agent(self, index: int) -> SimAgent:
        agent = SimAgent(self, index)
        self.agents[index] = agent
        agent.start()
        return agent

    def begin(self) -> None:
        """Schedule the initial agents and the scenario's faults (once; :meth:`run` calls it)."""
        if self._begun:
            return
        self._begun = True
        self._wall0 = time.perf_counter()
        for index in range(self.scenario.nodes):
            self.clock.schedule(self.rng.uniform(0.0, START_SPREAD), self._start_agent, index)
        for fault in self.scenario.faults:
            self.clock.schedule(fault.at, self._apply, fault)

    def advance(self, until: float | None = None, stop_when: Callable[[Simulation], bool] | None = None) -> str | None:
        """Run scheduled callbacks in time order. With ``until``: only those due before it, then the clock stands at
        ``until`` and None is returned, so a fault injected now runs before anything else due at that time -- as a
        scheduled fault does in :meth:`run` (the stateful fuzzer relies on this to write exact replays). Otherwise
        (or earlier) the reason the run stopped: "done" | "time_limit" | "stop_when" | "idle"."""
        self.begin()
        limit = self.scenario.time_limit
        while True:
            t = self.clock.next_time()
            if t is None:
                return "idle"
            if t > limit:
                self.clock.now = limit
                return "time_limit"
            if until is not None and t >= until:
                self.clock.now = max(self.clock.now, until)
                return None
            self.clock.run_next()
            if stop_when is not None and stop_when(self):
                return "stop_when"
            if self.outcome is not None and not any(a.alive for a in self.agents.values()):
                return "done"
            if self.progress is not None and self.clock.processed % 2048 == 0:
                wall = time.perf_counter()
                if wall >= self._next_report:
                    self._next_report = wall + 0.2
                    self.progress(self.clock.now, limit)

    def inject(self, fault: Fault) -> None:
        """Inject ``fault`` now (its ``at`` should be the clock's time: see :meth:`advance`)."""
        self._apply(fault)

    def result(self, stopped_by: str) -> SimResult:
        """End the run (unless ``stopped_by`` is "stop_when": the agents are left as they are) and report it."""
        if stopped_by != "stop_when":
            self._finish()
        return SimResult(
            history=self.history,
            virtual_seconds=self.clock.now,
            wall_seconds=time.perf_counter() - self._wall0,
            events_processed=self.clock.processed,
            store=self.store.counters(),
            outcome=self.outcome,
            stopped_by=stopped_by,
        )

    def run(self, stop_when: Callable[[Simulation], bool] | None = None) -> SimResult:
        self.begin()
        return self.result(self.advance(stop_when=stop_when))

    def _finish(self) -> None:
        self._tearing_down = True
        for agent in self.agents.values():
            if agent.alive:
                agent.tear_down()
        # Processes whose agent is gone but which still run would be orphans; the simulated runtime stops a node's
        # workers with its agent, and this check holds it to that.
        orphans = [
            f"{agent.name}/local_rank{lr}"
            for agent in self.agents.values()
            for lr, st in agent.workers.items()
            if not agent.alive and st == RUNNING
        ]
        self.history.record(self.clock.now, "cluster", h.ORPHAN_CHECK, detail={"orphans": orphans})


def run_virtual(scenario: Scenario, progress: Callable[[float, float], None] | None = None) -> SimResult:
    """Run a virtual-mode scenario to its end (job outcome with every agent gone, or ``time_limit``)."""
    return Simulation(scenario, progress=progress).run()


def rendezvous_scenario(nodes: int, seed: int = 0, latency: float = 0.001, faults: list[Fault] | None = None,
                        broken_cas: bool = False, keyed: bool = False) -> Scenario:
    """A scenario of ``nodes`` agents forming one round (min = max = nodes), for scale runs."""
    return Scenario(
        name=f"rendezvous of {nodes} nodes",
        mode="virtual",
        nodes=nodes,
        workers_per_node=1,
        min_nodes=nodes,
        max_nodes=nodes,
        max_restarts=3,
        timeouts=Timeouts(join=600.0, last_call=5.0, heartbeat=5.0, close=30.0, monitor=1.0),
        job=Job(steps=1, step_seconds=1.0),
        seed=seed,
        store=StoreConfig(latency=latency, loss=0.0, broken_cas=broken_cas, keyed=keyed),
        faults=list(faults or []),
    ).validate()


def run_rendezvous_round(nodes: int, seed: int = 0, latency: float = 0.001,
                         wall_limit: float | None = None, keyed: bool = False,
                         post_round_sync: bool = False) -> dict[str, Any]:
    """Run until every one of ``nodes`` agents has a rank in the first round; report cost and store traffic.

    By default only the rendezvous is measured; ``post_round_sync=True`` adds the agent's whole-state read after
    it (members, restart count), which costs every node one read of the O(N)-sized state.

    ``wall_limit`` (seconds of real time) gives up early: ``completed`` is then False and ``ranked`` says how far
    it got.
    """
    scenario = rendezvous_scenario(nodes, seed, latency, keyed=keyed)
    sim = Simulation(scenario, record_participants=False, post_round_sync=post_round_sync)
    deadline = time.perf_counter() + wall_limit if wall_limit is not None else None

    def stop(s: Simulation) -> bool:
        if len(s.ranked) >= nodes:
            return True
        return deadline is not None and s.clock.processed % 64 == 0 and time.perf_counter() > deadline

    result = sim.run(stop_when=stop)
    store = result.store
    total_bytes = store["bytes_read"] + store["bytes_written"]
    return {
        "nodes": nodes,
        "completed": len(sim.ranked) >= nodes,
        "ranked": len(sim.ranked),
        "events": result.events_processed,
        "wall_s": result.wall_seconds,
        "events_per_s": result.events_processed / result.wall_seconds if result.wall_seconds else None,
        "virtual_s": result.virtual_seconds,
        "store_calls": store["get_calls"] + store["set_calls"] + store["version_calls"] + store["key_calls"],
        "store_bytes": total_bytes,
        "store_bytes_per_node": total_bytes / nodes,
        "key_calls": store["key_calls"],
        "failed_cas": store["failed_cas"],
        "final_state_bytes": len(sim.store.current() or b""),
    }
