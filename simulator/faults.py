"""The fault registry: every fault kind once -- its parameters, how to draw it, and what it does live and virtually.

One :class:`FaultKind` entry per fault name. The entry is what scenario validation checks a fault against
(:func:`validate_fault`), what the random generator and the hypothesis strategies draw from (:func:`draw_fault`, one
drawing rule behind two sources of randomness, see :class:`Draw`), and what both runners call: :func:`inject_live`
(``simulator/live/runner.py``, over the public nemesis methods of :class:`simulator.live.cluster.Cluster`) and
:func:`inject_virtual` (``simulator/virtual/sim.py``). Adding a fault kind is adding one entry here (plus the
primitive it needs on each side); a side that cannot exist is ``None`` with the reason in ``live_missing`` /
``virtual_missing``.

This module imports neither runner: implementations receive the cluster / simulation object and use its methods.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .scenario import Fault, Scenario

# How a fault names its node. ``one``: required, the fault acts on that node. ``one_or_all``: optional, no node
# means every node (drawn half the time without one). ``cluster``: acts on the shared store, a node is ignored (never
# drawn). ``new``: the index the added node gets (optional; the generators number new nodes in time order).
NODE_TARGETS = ("one", "one_or_all", "cluster", "new")

# Argument keys any fault may carry: ``from: launch`` counts a live fault's ``at`` from the agents' launch instead of
# from when the job runs (see simulator/live/runner.py).
COMMON_ARGS = ("from",)


@dataclass(frozen=True)
class Seconds:
    """A number-of-seconds parameter: what validation accepts (``minimum``; ``None`` for any finite number) and the
    range the generators draw from. ``resolution``: steps per second hypothesis draws on (coarse steps shrink well);
    the seeded random generator draws uniformly to the millisecond."""

    low: float
    high: float
    resolution: int
    minimum: float | None = 0.0


@dataclass(frozen=True)
class FaultKind:
    name: str
    summary: str
    node: str = "one"
    ranked: bool = False  # takes ``rank`` (a local rank)
    timed: bool = False  # stays until undone: drawn with a duration so the run can recover
    seconds: Seconds | None = None  # a required ``seconds`` parameter
    args: dict[str, str] = field(default_factory=dict)  # extra ``args`` keys it understands -> what they mean
    live: Callable[[Any, Fault, float], Any] | None = None
    virtual: Callable[[Any, Fault], tuple[bool, Callable[[], None] | None]] | None = None
    # When the fault has no ``duration``: how long the virtual one lasts (None: until a ``heal``).
    virtual_default_duration: float | None = None
    live_missing: str = ""
    virtual_missing: str = ""
    # Checks the values of ``args`` (their keys are checked against ``args``): (args, node, total nodes) -> None, or
    # the one-line reason the first bad one is refused, starting with its key.
    check_args: Callable[[dict, int | None, int], str | None] | None = None

    def __post_init__(self) -> None:
        if self.node not in NODE_TARGETS:
            raise ValueError(f"fault kind {self.name}: node={self.node!r} is invalid (allowed: {', '.join(NODE_TARGETS)})")
        if self.live is None and not self.live_missing:
            raise ValueError(f"fault kind {self.name}: no live implementation and no reason given (live_missing)")
        if self.virtual is None and not self.virtual_missing:
            raise ValueError(f"fault kind {self.name}: no virtual implementation and no reason given (virtual_missing)")


DURATION = Seconds(0.1, 3.0, resolution=10, minimum=None)  # validation of ``duration`` is its own (> 0)


# ---------------------------------------------------------------------- live implementations (Cluster methods)
# Each returns the fault_injection object to heal when the fault's duration is over, or None for instant faults.

def _live_kill_worker(cluster, fault: Fault, budget: float) -> None:
    cluster.kill_worker(fault.node, fault.rank or 0, timeout=budget)


def _live_expire_timer(cluster, fault: Fault, budget: float) -> None:
    cluster.expire_timer(fault.node, fault.rank or 0, timeout=budget)


def _live_kill_agent(cluster, fault: Fault, budget: float) -> None:
    cluster.kill_agent(fault.node)


def _live_pause_agent(cluster, fault: Fault, budget: float):
    period = fault.args.get("period")
    if period is not None:
        return cluster.heartbeat_delay(fault.node, float(fault.args.get("stop", period / 2)), float(period))
    return cluster.pause_agent(fault.node)


def _live_partition(cluster, fault: Fault, budget: float):
    return cluster.partition(fault.node, mode=fault.args.get("mode", "blackhole"))


def _live_heal(cluster, fault: Fault, budget: float) -> None:
    cluster.heal(fault.node)


def _live_delay(cluster, fault: Fault, budget: float):
    return cluster.delay(fault.node, fault.seconds)


def _live_restart_store(cluster, fault: Fault, budget: float):
    return cluster.restart_store(downtime=fault.duration or 0.0)


def _live_freeze_store(cluster, fault: Fault, budget: float):
    return cluster.freeze_store()


def _live_kill_store_leader(cluster, fault: Fault, budget: float):
    return cluster.kill_store_leader()


def _live_clock_skew(cluster, fault: Fault, budget: float):
    return cluster.clock_skew(fault.node, fault.seconds)


def _live_isolate_node(cluster, fault: Fault, budget: float):
    return cluster.isolate_node(fault.node)


def _live_split_cluster(cluster, fault: Fault, budget: float):
    return cluster.split_cluster(fault.args.get("groups") or default_split(cluster.node_counts()[1]))


def _live_one_way_drop(cluster, fault: Fault, budget: float):
    return cluster.drop_one_way(fault.node, fault.args["to"])


def default_split(nodes: int) -> list[list[int]]:
    """``split_cluster`` without ``groups``: the lower half of the node indices (with the store), the upper half."""
    keep = (nodes + 1) // 2
    return [list(range(keep)), list(range(keep, nodes))]


def _check_split_groups(args: dict, node: int | None, total: int) -> str | None:
    groups = args.get("groups")
    if groups is None:
        return None
    if not isinstance(groups, list) or len(groups) < 2 or not all(isinstance(g, list) for g in groups):
        return f"groups={groups!r}: must be a list of at least two lists of node indices"
    seen: set[int] = set()
    for i, group in enumerate(groups):
        if i > 0 and not group:
            return f"groups={groups!r}: only the first group (the store's side) may be empty"
        for index in group:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < total:
                return f"groups={groups!r}: {index!r} is not a node index 0..{total - 1}"
            if index in seen:
                return f"groups={groups!r}: node {index} is in two groups"
            seen.add(index)
    return None


def _check_partition_mode(args: dict, node: int | None, total: int) -> str | None:
    mode = args.get("mode", "blackhole")
    return None if mode in ("blackhole", "drop") else f"mode={mode!r}: must be 'blackhole' or 'drop'"


def _check_drop_target(args: dict, node: int | None, total: int) -> str | None:
    to = args.get("to")
    if to == "store":
        return None
    if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < total or to == node:
        return f"to={to!r}: must be 'store' or a node index 0..{total - 1} other than the fault's node"
    return None


def _live_add_node(cluster, fault: Fault, budget: float) -> None:
    index = cluster.add_node()
    if fault.node is not None and index != fault.node:
        from .live.cluster import LiveError

        raise LiveError(f"add_node started node{index}, but the scenario names node{fault.node}")


def _live_remove_node(cluster, fault: Fault, budget: float) -> None:
    cluster.remove_node(fault.node)


# ---------------------------------------------------------------------- virtual implementations (Simulation)
# Each returns (fired, undo): fired False records the fault as a no-op (its target was not there); undo (or None)
# runs when the fault's duration is over.

def _virtual_worker_fault(reason: str):
    def apply(sim, fault: Fault):
        agent = sim.agents.get(fault.node)
        return agent is not None and agent.kill_worker(fault.rank or 0, reason), None

    return apply


def _virtual_kill_agent(sim, fault: Fault):
    agent = sim.agents.get(fault.node)
    return agent is not None and agent.kill(), None


def _virtual_pause_agent(sim, fault: Fault):
    agent = sim.agents.get(fault.node)
    period, stop = fault.args.get("period"), fault.args.get("stop")
    if agent is not None and isinstance(period, (int, float)) and isinstance(stop, (int, float)) and period > 0:
        # A straggler: stopped ``stop`` seconds out of every ``period`` for the fault's duration.
        span = fault.duration if fault.duration is not None else period
        k = 0
        while k * period < span:
            start = sim.clock.now + k * period
            sim.clock.schedule(start, agent.pause)
            sim.clock.schedule(start + min(stop, span - k * period), agent.resume)
            k += 1
        return agent.alive, (lambda: None)  # the last cycle already resumed it
    if agent is not None and agent.pause():
        return True, agent.resume
    return False, None


def _virtual_partition(sim, fault: Fault):
    name = f"node{fault.node}"
    # blackhole (and a cut-off namespace) is silent: calls hang; drop closes connections: calls fail at once
    sim.store.partition(name, silent=fault.args.get("mode", "blackhole") != "drop")
    return True, lambda: sim.store.heal(name)


def _virtual_split_cluster(sim, fault: Fault):
    # The virtual nodes share nothing but the store, so a split is the nodes away from the store's side cut off it.
    groups = fault.args.get("groups") or default_split(len(sim.agents))
    cut = [f"node{index}" for group in groups[1:] for index in group]
    for name in cut:
        sim.store.partition(name)

    def undo() -> None:
        for name in cut:
            sim.store.heal(name)

    return True, undo


def _virtual_delay(sim, fault: Fault):
    name = f"node{fault.node}"
    sim.store.delay(name, float(fault.seconds or 0.0))
    return True, lambda: sim.store.heal(name)


def _virtual_heal(sim, fault: Fault):
    sim.store.heal(f"node{fault.node}" if fault.node is not None else None)
    for agent in sim.agents.values():
        if fault.node is None or agent.index == fault.node:
            agent.resume()
    return True, None


def _virtual_restart_store(sim, fault: Fault):
    sim.store.crash()

    def back() -> None:
        sim.store.down = False

    return True, back


def _virtual_clock_skew(sim, fault: Fault):
    agent = sim.agents.get(fault.node)
    if agent is None or not agent.alive:
        return False, None
    skew = float(fault.seconds or 0.0)
    agent.clock.skew += skew

    def undo() -> None:
        agent.clock.skew -= skew

    return True, undo


def _virtual_add_node(sim, fault: Fault):
    return sim.add_node(fault.node), None


def _virtual_remove_node(sim, fault: Fault):
    return sim.remove_node(fault.node), None


REGISTRY: dict[str, FaultKind] = {
    kind.name: kind
    for kind in (
        FaultKind("kill_worker", "SIGKILL one worker (local rank)", ranked=True,
                  live=_live_kill_worker, virtual=_virtual_worker_fault("SIGKILL")),
        FaultKind("kill_agent", "SIGKILL a node: its agent and every process below it",
                  live=_live_kill_agent, virtual=_virtual_kill_agent),
        FaultKind("pause_agent", "SIGSTOP the agent until healed (or a duty cycle: late heartbeats)", timed=True,
                  args={"period": "seconds per stop/run cycle (a straggler)", "stop": "seconds stopped per cycle"},
                  live=_live_pause_agent, virtual=_virtual_pause_agent),
        FaultKind("partition", "cut one node off the store", timed=True,
                  args={"mode": "blackhole (nothing delivered: calls hang; the default) | drop (connections closed: "
                                "calls fail at once)"},
                  check_args=_check_partition_mode, live=_live_partition, virtual=_virtual_partition),
        FaultKind("heal", "undo the active faults of one node (or of all)", node="one_or_all",
                  live=_live_heal, virtual=_virtual_heal),
        FaultKind("delay", "add latency to one node's store traffic", timed=True,
                  seconds=Seconds(0.01, 0.5, resolution=100),
                  live=_live_delay, virtual=_virtual_delay),
        FaultKind("restart_store", "crash the store and bring it back after the duration", node="cluster", timed=True,
                  live=_live_restart_store, virtual=_virtual_restart_store, virtual_default_duration=1.0),
        FaultKind("freeze_store", "SIGSTOP the store (every etcd member) for the duration: calls hang, data kept",
                  node="cluster", timed=True, live=_live_freeze_store,
                  virtual_missing="the virtual store has no call in flight: a call either answers or fails. A frozen "
                                  "store is neither down (failing calls end the job after the agents' store-outage "
                                  "window; live calls hang and the job rides the freeze out) nor slow (heartbeats "
                                  "would keep landing, so the eviction guard under test is never reached); it needs "
                                  "hanging calls in the virtual store first"),
        FaultKind("kill_store_leader", "SIGKILL the etcd cluster's leader (healed: it restarts and rejoins)",
                  node="cluster", live=_live_kill_store_leader,
                  virtual_missing="the virtual store is one linearizable server with no members, so there is no "
                                  "leader to lose (a leader change is a short outage at most: restart_store)"),
        FaultKind("expire_timer", "expire a worker's watchdog timer (the timer server reaps it)", ranked=True,
                  live=_live_expire_timer, virtual=_virtual_worker_fault("timer expired (reaped with SIGKILL)")),
        FaultKind("clock_skew", "shift one agent's wall clock", timed=True,
                  seconds=Seconds(-2.0, 2.0, resolution=10, minimum=None),
                  live=_live_clock_skew, virtual=_virtual_clock_skew),
        FaultKind("isolate_node", "cut one node off the store AND its peers (its own network namespace)", timed=True,
                  live=_live_isolate_node,
                  # a virtual node talks to nothing but the store (no collectives): cut off everything = off the store
                  virtual=_virtual_partition),
        FaultKind("split_cluster", "cut the nodes into groups; the first keeps the store (network namespaces)",
                  node="cluster", timed=True,
                  args={"groups": "lists of node indices, the first with the store; nodes in none join it "
                                  "(default: the lower half with the store, the upper half cut off)"},
                  check_args=_check_split_groups, live=_live_split_cluster, virtual=_virtual_split_cluster),
        FaultKind("one_way_drop", "lose every packet from one node to another node or to the store, the other "
                  "direction still flows (network namespaces)", timed=True,
                  args={"to": "the node index the packets are for, or 'store' (required)"},
                  check_args=_check_drop_target, live=_live_one_way_drop,
                  virtual_missing="a virtual store call is one atomic request and answer; losing one direction (a "
                                  "write applied whose answer never comes, or the reverse) needs calls that can "
                                  "land without answering, and peer-to-peer traffic, which virtual nodes do not have"),
        FaultKind("add_node", "start one more agent", node="new",
                  live=_live_add_node, virtual=_virtual_add_node),
        FaultKind("remove_node", "ask a node to leave (SIGTERM)",
                  live=_live_remove_node, virtual=_virtual_remove_node),
    )
}

FAULT_NAMES = tuple(REGISTRY)


def fault_names() -> tuple[str, ...]:
    """Every registered fault name now."""
    return tuple(REGISTRY)


def drawn_fault_names() -> tuple[str, ...]:
    """The generators' default kinds: every registered kind the virtual simulation can run (random schedules and
    the stateful fuzzer run virtually), so a new entry with a virtual side is drawn at once."""
    return tuple(name for name, kind in REGISTRY.items() if kind.virtual is not None)


def kind_of(name: str) -> FaultKind:
    kind = REGISTRY.get(name)
    if kind is None:
        raise ValueError(f"unknown fault {name!r} (allowed: {', '.join(REGISTRY)})")
    return kind


# ---------------------------------------------------------------------- validation

def validate_fault(fault: Fault, scenario: Scenario, where: str, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` for the first field of ``fault`` its kind does not accept (one line, naming the field
    and value). ``where`` names the fault (``scenario 'x': faults[2]``)."""

    def bad(name: str, value: Any, allowed: str) -> Exception:
        return error(f"{where}.{name}={value!r} is invalid ({allowed})")

    kind = REGISTRY.get(fault.fault) if isinstance(fault.fault, str) else None
    if kind is None:
        raise bad("fault", fault.fault, f"allowed: {', '.join(REGISTRY)}")
    if not _is_number(fault.at) or fault.at < 0:
        raise bad("at", fault.at, "must be a number of seconds >= 0.0")
    limit = scenario.time_limit
    if _is_number(limit) and fault.at >= limit:
        # Never injected: the run ends at time_limit (and a live nemesis would sleep until then).
        raise bad("at", fault.at, f"must be < time_limit ({limit:g} s): the run ends before a fault that late")
    if fault.signal is not None:
        # No kind takes one: kill_worker/kill_agent always SIGKILL, remove_node always SIGTERMs.
        raise bad("signal", fault.signal, "no fault kind takes a signal: kill_worker and kill_agent send SIGKILL, "
                  "remove_node SIGTERM")
    total = scenario.total_nodes
    if fault.node is None and kind.node == "one":
        raise error(f"{where}.node is required for fault {fault.fault} (a node index 0..{total - 1})")
    if fault.node is not None:
        if isinstance(fault.node, bool) or not isinstance(fault.node, int) or fault.node < 0:
            raise bad("node", fault.node, "must be an integer >= 0")
        if fault.node >= total:
            raise bad("node", fault.node, f"node indices are 0..{total - 1}")
    if fault.rank is not None:
        if isinstance(fault.rank, bool) or not isinstance(fault.rank, int) or fault.rank < 0:
            raise bad("rank", fault.rank, "must be an integer >= 0")
        if not kind.ranked:
            raise bad("rank", fault.rank, f"only {', '.join(k.name for k in REGISTRY.values() if k.ranked)} take a rank")
        if fault.rank >= scenario.workers_per_node:
            raise bad("rank", fault.rank, f"local ranks are 0..{scenario.workers_per_node - 1}")
    if fault.duration is not None and (not _is_number(fault.duration) or fault.duration <= 0):
        raise bad("duration", fault.duration, "must be a number of seconds > 0.0")
    if fault.seconds is not None:
        minimum = kind.seconds.minimum if kind.seconds is not None else 0.0
        if not _is_number(fault.seconds) or (minimum is not None and fault.seconds < minimum):
            raise bad("seconds", fault.seconds, "must be a number of seconds" + (f" >= {minimum}" if minimum is not None else ""))
    elif kind.seconds is not None:
        raise error(f"{where}.seconds is required for fault {fault.fault}")
    if not isinstance(fault.args, dict):
        raise bad("args", fault.args, "must be a mapping")
    allowed = (*COMMON_ARGS, *kind.args)
    unknown = [key for key in fault.args if key not in allowed]
    if unknown:
        raise bad(f"args.{unknown[0]}", fault.args[unknown[0]], f"fault {fault.fault} takes args: {', '.join(allowed)}")
    problem = kind.check_args(fault.args, fault.node, total) if kind.check_args is not None else None
    if problem is not None:
        raise error(f"{where}.args.{problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------- drawing (random generator and hypothesis)

class Draw(Protocol):
    """A source of choices. :class:`RandomDraw` (a seeded ``random.Random``) and the hypothesis strategies' draw
    (simulator/fuzz.py) implement it, so both generate faults by the same rule (:func:`draw_fault`)."""

    def choice(self, options: Sequence[str]) -> str: ...

    def index(self, count: int) -> int: ...

    def seconds(self, low: float, high: float, resolution: int) -> float: ...

    def coin(self) -> bool: ...


class RandomDraw:
    """:class:`Draw` over ``random.Random``: uniform seconds to the millisecond."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[str]) -> str:
        return self.rng.choice(options)

    def index(self, count: int) -> int:
        return self.rng.randrange(count)

    def seconds(self, low: float, high: float, resolution: int) -> float:
        return round(self.rng.uniform(low, high), 3)

    def coin(self) -> bool:
        return self.rng.random() < 0.5


# Drawn ``at`` times are on this grid for hypothesis (steps per second).
AT_RESOLUTION = 100


def draw_fault(draw: Draw, kinds: Sequence[str] | None, nodes: int, workers_per_node: int, horizon: float) -> Fault:
    """One fault of ``kinds`` (default: :func:`drawn_fault_names`) at a time in ``[0, horizon]`` on one of ``nodes`` nodes, with every parameter its kind
    needs (a rank, a duration for faults that stay until undone, seconds). ``add_node`` gets no index: number new
    nodes in time order (:func:`number_new_nodes`)."""
    from .scenario import Fault

    name = draw.choice(tuple(kinds) if kinds is not None else drawn_fault_names())
    kind = kind_of(name)
    fault = Fault(at=draw.seconds(0.0, horizon, AT_RESOLUTION), fault=name, node=draw.index(nodes))
    if kind.ranked:
        fault.rank = draw.index(workers_per_node)
    if kind.timed:
        fault.duration = draw.seconds(DURATION.low, DURATION.high, DURATION.resolution)
    if kind.seconds is not None:
        fault.seconds = draw.seconds(kind.seconds.low, kind.seconds.high, kind.seconds.resolution)
    if kind.node in ("cluster", "new") or (kind.node == "one_or_all" and draw.coin()):
        fault.node = None
    return fault


def number_new_nodes(faults: list[Fault], first_new: int) -> list[Fault]:
    """The faults in time order, ``add_node`` ones given fresh indices from ``first_new`` (scenarios name them)."""
    from dataclasses import replace

    out = []
    added = 0
    for f in sorted(faults, key=lambda f: f.at):
        if f.fault == "add_node":
            f = replace(f, node=first_new + added)
            added += 1
        out.append(f)
    return out


# ---------------------------------------------------------------------- injection

def inject_live(cluster, fault: Fault, budget: float) -> Any:
    """Inject ``fault`` into a live :class:`~simulator.live.cluster.Cluster`; return the object to heal after its
    duration (or None). ``budget``: seconds a fault may wait for its target (e.g. a restarted worker)."""
    kind = kind_of(fault.fault)
    if kind.live is None:
        from .live.cluster import LiveError

        raise LiveError(f"fault {fault.fault!r} has no live implementation: {kind.live_missing}")
    return kind.live(cluster, fault, budget)


def inject_virtual(sim, fault: Fault) -> tuple[bool, Callable[[], None] | None, float | None]:
    """Inject ``fault`` into a virtual :class:`~simulator.virtual.sim.Simulation`: (fired, undo, duration)."""
    kind = kind_of(fault.fault)
    if kind.virtual is None:
        raise ValueError(f"fault {fault.fault!r} has no virtual implementation: {kind.virtual_missing}")
    fired, undo = kind.virtual(sim, fault)
    duration = fault.duration if fault.duration is not None else kind.virtual_default_duration
    return fired, undo, duration
