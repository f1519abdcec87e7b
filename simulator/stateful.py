"""Stateful fuzzing: a hypothesis ``RuleBasedStateMachine`` over one virtual simulation of the real steppers.

Where :mod:`simulator.fuzz` draws a whole fault schedule up front, the machine here acts on a running simulation one
step at a time: virtual time passes (rendezvous, keep-alive and monitor timers expire), a node joins, dies, freezes
or leaves, the store stalls (partition, delay, restart), a worker fails, a watchdog timer expires, a clock jumps.
Every fault rule comes from the fault registry (:mod:`simulator.faults`), drawn by the same rule as the generators.
After every step the safety invariants (:data:`STEP_INVARIANTS`) are checked on the history so far; when hypothesis
ends a run, the simulation runs to its end and every invariant is checked.

Each fault is injected at the clock's current time, before anything else due then (``Simulation.advance``), which is
exactly where a scheduled fault runs. So the faults of a run, with their times, make a scenario whose replay
(``elastic-sim replay``) is the same run: :func:`explore` writes the shrunk failing run so, and checks that its replay
has the same history digest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, initialize, invariant, rule

from .checker import INVARIANTS, CheckResult, check
from .faults import REGISTRY, draw_fault
from .fuzz import _HypothesisDraw, import_independent_search, search_settings
from .generator import fuzz_base, with_faults
from .scenario import Fault, Scenario
from .virtual import run_virtual
from .virtual.sim import Simulation

# Invariants about how the run ends (an outcome, the final world size): checked once it has ended.
END_INVARIANTS = ("liveness", "expectations")
# The rest hold of every prefix of a correct history (failure_handled judges only failures whose bound has passed):
# checked after every step.
STEP_INVARIANTS = [name for name in INVARIANTS if name not in END_INVARIANTS]
# Node indices a fault may name (those past the nodes started so far wrap onto them).
_NODE_SLOTS = 6
# Virtual time one ``wait`` rule may pass: 0.01 .. 3 s.
_WAIT_STEPS = (1, 300)


@dataclass
class StatefulResult:
    examples: int
    wall_seconds: float
    failing: Scenario | None = None
    check: CheckResult | None = None
    written: Path | None = None
    digest: str | None = None  # the failing run's history digest (its replay must match)
    replay_digest: str | None = None

    @property
    def ok(self) -> bool:
        return self.failing is None


def _fault_of(kind: str, base: Scenario) -> st.SearchStrategy[Fault]:
    @st.composite
    def one(draw) -> Fault:
        return draw_fault(_HypothesisDraw(draw), (kind,), _NODE_SLOTS, base.workers_per_node, 0.0)

    return one()


def machine_for(base: Scenario, record: dict) -> type[RuleBasedStateMachine]:
    """A state machine class over simulations of ``base`` (its faults are ignored); each finished run is stored in
    ``record["last"]`` as (scenario, check result, history digest)."""

    class VirtualCluster(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sim: Simulation | None = None
            self.faults: list[Fault] = []
            self.stopped: str | None = None
            self.failed_step = False

        @initialize(seed=st.integers(0, 2**16))
        def start(self, seed: int) -> None:
            self.scenario = replace(base, seed=seed, faults=[])
            self.sim = Simulation(self.scenario)
            self.sim.begin()

        @rule(centiseconds=st.integers(*_WAIT_STEPS))
        def wait(self, centiseconds: int) -> None:
            """Virtual time passes: timers (join, last call, heartbeats, monitor ticks, fault durations) expire."""
            if self.stopped is None:
                self.stopped = self.sim.advance(until=round(self.sim.clock.now + centiseconds / 100, 2))

        def _inject(self, fault: Fault) -> None:
            if self.stopped is not None:
                return  # the run is over: nothing left to act on
            known = self.sim.next_node_index
            node = fault.node % known if fault.node is not None and fault.fault != "add_node" else None
            fault = replace(fault, at=self.sim.clock.now, node=node)
            if fault.fault == "add_node":
                fault = replace(fault, node=known)
            self.faults.append(fault)
            self.sim.inject(fault)

        @invariant()
        def safety_holds(self) -> None:
            if self.sim is None:
                return
            found = check(self.sim.history, self.scenario, only=STEP_INVARIANTS)
            if not found.ok:
                self.failed_step = True
                raise AssertionError(str(found.violations[0]))

        def teardown(self) -> None:
            if self.sim is None:
                return
            stopped = self.stopped or self.sim.advance()
            history = self.sim.result(stopped).history
            scenario = with_faults(self.scenario, self.faults)
            found = check(history, scenario)
            record["last"] = (scenario, found, history.digest())
            if not found.ok:
                record["failing"] = record["last"]
                if not self.failed_step:
                    raise AssertionError(str(found.violations[0]))

    # One rule per registered fault kind: node joins (add_node), dies (kill_agent), freezes (pause_agent), leaves
    # (remove_node), the store stalls (partition, delay, restart_store), a worker fails (kill_worker), a timer
    # expires (expire_timer), a clock jumps (clock_skew), heal.
    for name in REGISTRY:
        if REGISTRY[name].virtual is None:
            continue

        def inject(self, fault: Fault) -> None:
            self._inject(fault)

        inject.__name__ = f"fault_{name}"
        setattr(VirtualCluster, inject.__name__, rule(fault=_fault_of(name, base))(inject))
    return VirtualCluster


def explore(seed: int, examples: int, base: Scenario | None = None, out_dir: str | Path | None = None,
            steps: int = 30) -> StatefulResult:
    """Run the state machine on up to ``examples`` runs of up to ``steps`` steps (hypothesis seed ``seed``). On a
    violation hypothesis shrinks the run; the minimal one is returned as a scenario (``expect.violations`` set),
    written to ``out_dir`` when given, and replayed once to compare history digests."""
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = base or fuzz_base()
    record: dict = {}
    machine = machine_for(base, record)
    test = get_state_machine_test(machine, settings=search_settings(examples, stateful_step_count=steps))
    hypothesis_seed(seed)(test)
    wall0 = time.perf_counter()
    try:
        with import_independent_search():
            test()
    except AssertionError:
        pass
    result = StatefulResult(examples=examples, wall_seconds=time.perf_counter() - wall0)
    if "failing" not in record:
        return result
    scenario, found, digest = record["failing"]
    shrunk = replace(
        scenario,
        name=f"stateful finding (hypothesis seed {seed})",
        description=f"shrunk by simulator.stateful; breaks: {', '.join(found.violated)}",
        expect=replace(scenario.expect, violations=found.violated),
    )
    result.failing, result.check, result.digest = shrunk, found, digest
    result.replay_digest = run_virtual(shrunk).history.digest()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.written = out / f"stateful-seed{seed}-shrunk.yaml"
        shrunk.to_yaml(result.written)
    return result
