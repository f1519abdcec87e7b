"""The generator: fault schedules (and client operations) over time, from a scenario file or at random.

Random schedules are drawn from a seeded ``random.Random`` by the fault registry's rule (:func:`simulator.faults.
draw_fault`: valid node indices and local ranks, a duration for faults that need an undo), so every generated
scenario passes validation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

from .faults import RandomDraw, draw_fault
from .scenario import Expect, Fault, Job, Scenario, StoreConfig, Timeouts


def operations(scenario: Scenario) -> Iterator[Fault]:
    """The scenario's faults and client operations (``add_node``/``remove_node``) in the order they happen."""
    yield from sorted(scenario.faults, key=lambda f: f.at)


def fuzz_base(seed: int = 0, broken_cas: bool = False) -> Scenario:
    """The cluster random schedules run against: 4 nodes of 2 workers, elastic 2..4, a store slow enough (50 ms)
    that concurrent updates overlap."""
    return Scenario(
        name="fuzz",
        mode="virtual",
        nodes=4,
        workers_per_node=2,
        min_nodes=2,
        max_nodes=4,
        max_restarts=3,
        timeouts=Timeouts(join=30.0, last_call=0.5, heartbeat=0.5, close=5.0, keep_alive_max_attempt=3, monitor=0.1),
        job=Job(steps=8, step_seconds=0.5),
        seed=seed,
        store=StoreConfig(latency=0.05, loss=0.0, broken_cas=broken_cas),
        time_limit=120.0,
        expect=Expect(outcome=None),
    ).validate()


def random_fault(rng: random.Random, scenario: Scenario, horizon: float, kinds: tuple[str, ...] | None = None,
                 node_count: int | None = None) -> Fault:
    """One random fault of ``kinds`` (default: every kind with a virtual side) at a time in ``[0, horizon)``, drawn by its registry entry's rule."""
    nodes = node_count if node_count is not None else scenario.nodes
    return draw_fault(RandomDraw(rng), kinds, nodes, scenario.workers_per_node, horizon)


def random_schedule(seed: int, scenario: Scenario, count: int, horizon: float | None = None,
                    kinds: tuple[str, ...] | None = None) -> list[Fault]:
    """``count`` random faults over ``horizon`` seconds (default: the job's length), reproducible from ``seed``."""
    rng = random.Random(seed)
    horizon = horizon if horizon is not None else scenario.job.seconds
    faults = []
    added = 0
    for _ in range(count):
        fault = random_fault(rng, scenario, horizon, kinds, scenario.nodes + added)
        if fault.fault == "add_node":
            fault.node = scenario.nodes + added
            added += 1
        faults.append(fault)
    return sorted(faults, key=lambda f: f.at)


def with_faults(scenario: Scenario, faults: list[Fault], name: str | None = None) -> Scenario:
    """A copy of ``scenario`` with ``faults`` (validated)."""
    copy = replace(scenario, faults=sorted(faults, key=lambda f: f.at), name=name or scenario.name,
                   expect=replace(scenario.expect, violations=list(scenario.expect.violations)))
    return copy.validate()


def random_scenario(seed: int, base: Scenario | None = None, max_faults: int = 6) -> Scenario:
    """A random schedule of up to ``max_faults`` faults on ``base`` (default :func:`fuzz_base`)."""
    base = base or fuzz_base()
    rng = random.Random(seed)
    count = rng.randint(0, max_faults)
    faults = random_schedule(rng.randrange(2**31), base, count)
    return with_faults(replace(base, seed=seed), faults, name=f"random schedule (seed {seed})")
