"""Invariants over a :class:`~simulator.history.History`.

Each invariant is a function ``(history, scenario) -> list[Violation]``; :func:`check` runs them all. They read only
the history records (see :mod:`simulator.history` for field meanings), so live and virtual runs are checked alike.

Invariants (names are what ``Violation.invariant`` and ``expect.violations`` use):

- ``ranks_unique``: in each round, node ranks (``rdzv_complete``) are unique and in ``0..world_size-1``; where the
  participant list is recorded it has ``world_size`` entries and names each node at its rank (so the ranks are
  contiguous); global worker ranks (``worker_start``) are unique per round and in ``0..world_size-1``.
- ``membership_agreement``: every node that completed a round saw the same world size and participants.
- ``world_size_bounds``: a round has between ``min_nodes`` and ``max_nodes`` NODES; workers started in it see
  ``nodes_in_round * workers_per_node`` as their world size.
- ``rounds_monotonic``: each node completes strictly increasing rounds.
- ``failure_handled``: every ``worker_failed`` is followed on that node, within the failure bound, by a ``restart``,
  a new ``rdzv_join``, the agent's exit, or the job's end; every killed agent's surviving peers react (``restart``,
  ``rdzv_join`` or the job's end) within the detection bound, counted again from the end of any store outage that
  peer could not see through (store down, frozen or split off; the peer cut off or paused).
- ``restart_budget``: the job restarts its workers for failures (``restart`` without ``detail.reason ==
  "membership"``) in at most ``max_restarts`` distinct rounds (where records carry the round; a failure round costs
  one restart however many nodes restart in it), no node does so more than ``max_restarts`` times, and no agent
  gives up with its budget spent (``agent_exit`` with ``detail.restarts_exhausted``) before ``max_restarts``
  failure rounds.
- ``no_orphans``: every ``orphan_check`` found no leftover process.
- ``expectations``: the scenario's optional ``expect.final_world_size`` and ``expect.restarts`` hold.
- ``liveness``: the job reached exactly one outcome and it is the expected one (``expect.outcome``); a run that
  reached its ``time_limit`` without any outcome (a hang, e.g. endless re-rendezvous) always violates it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import history as h
from .history import Event, History
from .scenario import Scenario

# Slack on top of protocol bounds: scheduling noise (live) and store latency (virtual).
BOUND_SLACK = 2.0


@dataclass
class Violation:
    invariant: str
    message: str
    events: list[Event] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.invariant}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "message": self.message, "events": [e.to_dict() for e in self.events]}


@dataclass
class CheckResult:
    violations: list[Violation]
    invariants: list[str]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def violated(self) -> list[str]:
        """Names of the violated invariants, in check order, without repeats."""
        seen: dict[str, None] = {}
        for v in self.violations:
            seen.setdefault(v.invariant, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "invariants": self.invariants,
            "violations": [v.to_dict() for v in self.violations],
            "stats": self.stats,
        }


def failure_bound(scenario: Scenario) -> float:
    """Seconds within which a failed worker must lead to a restart or the job's end."""
    extra = scenario.expect.extra.get("failure_bound")
    if isinstance(extra, (int, float)):
        return float(extra)
    t = scenario.timeouts
    return 2 * t.monitor + t.close + BOUND_SLACK


def detection_bound(scenario: Scenario) -> float:
    """Seconds within which survivors must react to a dead peer: the heartbeat expiry plus one beat, a monitor
    tick and a poll."""
    extra = scenario.expect.extra.get("detection_bound")
    if isinstance(extra, (int, float)):
        return float(extra)
    t = scenario.timeouts
    return t.heartbeat * (t.keep_alive_max_attempt + 2) + 2 * t.monitor + BOUND_SLACK


def _by_round(events: list[Event]) -> dict[int, list[Event]]:
    rounds: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        if e.round is not None:
            rounds[e.round].append(e)
    return rounds


def _rank_holders(rnd: int, events: list[Event], owner, what: str, out: list[Violation]) -> list[Event]:
    """Check that each event's rank lies in [0, world size) and that one ``owner(event)`` holds each rank; append
    violations to ``out`` and return the events whose rank is in range."""
    holders: dict[int, Event] = {}
    valid = []
    for e in events:
        ws = e.world_size
        if e.rank is None or ws is None or not 0 <= e.rank < ws:
            out.append(Violation("ranks_unique", f"round {rnd}: {what(e)} got rank {e.rank} of world size {ws}", [e]))
            continue
        valid.append(e)
        other = holders.setdefault(e.rank, e)
        if owner(other) != owner(e):
            out.append(Violation(
                "ranks_unique", f"round {rnd}: rank {e.rank} given to both {what(other)} and {what(e)}", [other, e]))
    return valid


def ranks_unique(history: History, scenario: Scenario) -> list[Violation]:
    out: list[Violation] = []
    for rnd, events in sorted(_by_round(history.filter(h.RDZV_COMPLETE)).items()):
        for e in _rank_holders(rnd, events, lambda e: e.node, lambda e: e.node, out):
            participants = e.detail.get("participants")
            if isinstance(participants, list) and participants:
                if len(participants) != e.world_size:
                    out.append(Violation(
                        "ranks_unique",
                        f"round {rnd}: {e.node} saw {len(participants)} participants but world size {e.world_size}",
                        [e]))
                elif participants[e.rank] != e.node:
                    out.append(Violation(
                        "ranks_unique",
                        f"round {rnd}: {e.node} has rank {e.rank} but the participant list puts {participants[e.rank]} there",
                        [e]))
    for rnd, events in sorted(_by_round(history.filter(h.WORKER_START)).items()):
        _rank_holders(rnd, events, lambda e: (e.node, e.detail.get("local_rank")),
                      lambda e: f"{e.node} local rank {e.detail.get('local_rank')}", out)
    return out


def membership_agreement(history: History, scenario: Scenario) -> list[Violation]:
    out = []
    for rnd, events in sorted(_by_round(history.filter(h.RDZV_COMPLETE)).items()):
        first = events[0]
        for e in events[1:]:
            if e.world_size != first.world_size:
                out.append(Violation(
                    "membership_agreement",
                    f"round {rnd}: {first.node} saw world size {first.world_size}, {e.node} saw {e.world_size}",
                    [first, e]))
                break
            p1, p2 = first.detail.get("participants"), e.detail.get("participants")
            if p1 is not None and p2 is not None and list(p1) != list(p2):
                out.append(Violation(
                    "membership_agreement", f"round {rnd}: {first.node} saw participants {p1}, {e.node} saw {p2}", [first, e]))
                break
    return out


def world_size_bounds(history: History, scenario: Scenario) -> list[Violation]:
    out = []
    lo, hi, wpn = scenario.min_nodes, scenario.max_nodes, scenario.workers_per_node
    node_ws: dict[int, int] = {}
    for e in history.filter(h.RDZV_COMPLETE):
        if e.world_size is None or not lo <= e.world_size <= hi:
            out.append(Violation(
                "world_size_bounds", f"round {e.round}: {e.node} completed with {e.world_size} nodes, outside [{lo}, {hi}]", [e]))
        elif e.round is not None:
            node_ws.setdefault(e.round, e.world_size)
    for e in history.filter(h.WORKER_START):
        expected = node_ws.get(e.round) if e.round is not None else None
        if e.world_size is None or not lo * wpn <= e.world_size <= hi * wpn:
            out.append(Violation(
                "world_size_bounds",
                f"round {e.round}: a worker of {e.node} started with world size {e.world_size}, outside [{lo * wpn}, {hi * wpn}]",
                [e]))
        elif expected is not None and e.world_size != expected * wpn:
            out.append(Violation(
                "world_size_bounds",
                f"round {e.round}: a worker of {e.node} has world size {e.world_size}, expected {expected} nodes x {wpn}",
                [e]))
    return out


def rounds_monotonic(history: History, scenario: Scenario) -> list[Violation]:
    out = []
    last: dict[str, Event] = {}
    for e in history.filter(h.RDZV_COMPLETE):
        prev = last.get(e.node)
        if prev is not None and e.round is not None and prev.round is not None and e.round <= prev.round:
            out.append(Violation("rounds_monotonic", f"{e.node} completed round {e.round} after round {prev.round}", [prev, e]))
        last[e.node] = e
    return out


_JOB_END = (h.JOB_SUCCEEDED, h.JOB_FAILED)


def failure_handled(history: History, scenario: Scenario) -> list[Violation]:
    out = []
    events = history.sorted().events
    bound = failure_bound(scenario)
    for i, e in enumerate(events):
        if e.event != h.WORKER_FAILED:
            continue
        handled = any(
            later.t - e.t <= bound
            and (later.event in _JOB_END or (later.node == e.node and later.event in (h.RESTART, h.RDZV_JOIN, h.AGENT_EXIT)))
            for later in events[i + 1:]
        )
        if not handled and not _ended_before(events, e.t + bound):
            # A failure in the last moments of a run that ended for other reasons is not a violation of the bound.
            continue
        if not handled:
            out.append(Violation(
                "failure_handled", f"worker failure on {e.node} at t={e.t:.3f} not followed by a restart or job end within {bound:g} s", [e]))
    dbound = detection_bound(scenario)
    for i, e in enumerate(events):
        if e.event != h.FAULT_START or e.detail.get("fault") != "kill_agent":
            continue
        victim = e.detail.get("target") or (f"node{e.detail['node']}" if isinstance(e.detail.get("node"), int) else None)
        peers = _running_peers(events[:i], victim)
        for peer in peers:
            deadline = _detection_deadline(e.t, dbound, _blind_periods(events, peer))
            reacted = any(
                later.t <= deadline
                and (later.event in _JOB_END or (later.node == peer and later.event in (h.RESTART, h.RDZV_JOIN, h.AGENT_EXIT)))
                for later in events[i + 1:]
            )
            if not reacted and _ended_before(events, deadline):
                waited = f"{dbound:g} s" if deadline == e.t + dbound else \
                    f"{deadline - e.t:.3g} s (the detection bound after the store outages it could not see through)"
                out.append(Violation(
                    "failure_handled",
                    f"{peer} did not react within {waited} to the loss of {victim} at t={e.t:.3f}",
                    [e]))
    return out


# Faults during which no node can learn anything from the store, and faults that blind only their target node.
_STORE_WIDE_BLINDING = frozenset({"restart_store", "freeze_store", "kill_store_leader", "split_cluster"})
_NODE_BLINDING = frozenset({"partition", "isolate_node", "pause_agent"})


def _blind_periods(events: list[Event], node: str) -> list[tuple[float, float]]:
    """When ``node`` could not see a dead peer's silence: the store down, frozen or split off (a split's groups are
    not in every history, so it counts for every node), or the node itself cut off or paused. Nobody is evicted for
    silence while it could not reach the store (issue 13.3), so the detection clock starts again when that ends."""
    open_at: dict[tuple[str, str | None], float] = {}
    periods: list[tuple[float, float]] = []
    for e in events:
        if e.event not in (h.FAULT_START, h.FAULT_END) or e.detail.get("noop"):
            continue
        fault = e.detail.get("fault")
        target = e.detail.get("target") or (f"node{e.detail['node']}" if isinstance(e.detail.get("node"), int) else None)
        if not (fault in _STORE_WIDE_BLINDING or (fault in _NODE_BLINDING and target == node)):
            continue
        key = (fault, target)
        if e.event == h.FAULT_START:
            open_at.setdefault(key, e.t)
        elif key in open_at:
            periods.append((open_at.pop(key), e.t))
    periods += [(t0, float("inf")) for t0 in open_at.values()]
    return sorted(periods)


def _detection_deadline(killed_at: float, bound: float, blind: list[tuple[float, float]]) -> float:
    """``killed_at + bound``, restarted at the end of every blind period that overlaps the wait."""
    deadline = killed_at + bound
    for start, end in blind:
        if start <= deadline and end > killed_at:
            deadline = max(deadline, end + bound)
    return deadline


def _ended_before(events: list[Event], t: float) -> bool:
    """Whether the history runs at least to ``t`` (so absence of a reaction before ``t`` is meaningful)."""
    return bool(events) and events[-1].t >= t


def _running_peers(before: list[Event], victim: str | None) -> list[str]:
    """Nodes other than ``victim`` that completed the victim's latest round and still run its workers."""
    last_round: dict[str, int] = {}
    exited: set[str] = set()
    for e in before:
        if e.event == h.RDZV_COMPLETE and e.round is not None:
            last_round[e.node] = e.round
            exited.discard(e.node)
        elif e.event in (h.AGENT_EXIT, h.RDZV_JOIN, h.RESTART):
            exited.add(e.node)  # gone, or already re-forming: nothing left to react to
    if victim is None or victim not in last_round:
        return []
    rnd = last_round[victim]
    return sorted(n for n, r in last_round.items() if n != victim and r == rnd and n not in exited)


def restart_budget(history: History, scenario: Scenario) -> list[Violation]:
    budget = scenario.max_restarts
    counts: dict[str, list[Event]] = defaultdict(list)
    # The budget is the job's: a failure round costs one restart however many nodes restart in it.
    failure_rounds: dict[int, Event] = {}
    out: list[Violation] = []
    for e in history:
        if e.event == h.RESTART and e.detail.get("reason") != "membership":
            counts[e.node].append(e)
            if e.round is not None:
                failure_rounds.setdefault(e.round, e)
        elif e.event == h.AGENT_EXIT and e.detail.get("restarts_exhausted") and len(failure_rounds) < budget:
            out.append(Violation(
                "restart_budget", f"{e.node} gave up with the restart budget spent after {len(failure_rounds)} "
                f"failure round(s), max_restarts is {budget}", [e]))
    out += [
        Violation("restart_budget", f"{node} restarted its workers {len(evs)} times, max_restarts is {budget}",
                  evs[budget:])
        for node, evs in sorted(counts.items())
        if len(evs) > budget
    ]
    if len(failure_rounds) > budget:
        rounds = sorted(failure_rounds)
        out.append(Violation(
            "restart_budget", f"the job restarted for failures in {len(rounds)} rounds {rounds}, max_restarts is {budget}",
            [failure_rounds[r] for r in rounds[budget:]]))
    return out


def no_orphans(history: History, scenario: Scenario) -> list[Violation]:
    return [
        Violation("no_orphans", f"{e.node}: orphan processes left at t={e.t:.3f}: {e.detail.get('orphans')}", [e])
        for e in history.filter(h.ORPHAN_CHECK)
        if e.detail.get("orphans")
    ]


def liveness(history: History, scenario: Scenario) -> list[Violation]:
    ends = history.filter(_JOB_END)
    succeeded = [e for e in ends if e.event == h.JOB_SUCCEEDED]
    failed = [e for e in ends if e.event == h.JOB_FAILED]
    if succeeded and failed:
        return [Violation("liveness", "the job both succeeded and failed", [succeeded[0], failed[0]])]
    expected = scenario.expect.outcome
    if not ends:
        last = history.events[-1].t if len(history) else 0.0
        if expected is None and not scenario.faults:
            expected = "succeeded"
        if expected is None and last < scenario.time_limit - 1e-6:
            return []  # stopped early for another reason; nothing to say about an outcome
        return [Violation(
            "liveness",
            f"the job reached no outcome by t={last:.3f} (expected {expected or 'an outcome'}; faults ended at "
            f"t={scenario.fault_end:g}, time limit {scenario.time_limit:g} s)",
            [],
        )]
    got = "succeeded" if succeeded else "failed"
    if expected is not None and got != expected:
        reason = ends[0].detail.get("reason")
        why = f" ({reason})" if reason else ""
        return [Violation("liveness", f"the job {got}{why}, expected {expected}", [ends[0]])]
    return []


def expectations(history: History, scenario: Scenario) -> list[Violation]:
    """Scenario-specific ``expect`` entries: ``final_world_size`` (nodes in the last completed round) and
    ``restarts`` (how many ``restart`` records, membership restarts included)."""
    out = []
    extra = scenario.expect.extra
    if "final_world_size" in extra:
        completes = history.filter(h.RDZV_COMPLETE)
        last = max((e.round for e in completes if e.round is not None), default=None)
        sizes = sorted({e.world_size for e in completes if e.round == last})
        if sizes != [extra["final_world_size"]]:
            out.append(Violation(
                "expectations", f"final world size {sizes or 'none'} (round {last}), expected {extra['final_world_size']}"))
    if "restarts" in extra:
        restarts = history.filter(h.RESTART)
        if len(restarts) != extra["restarts"]:
            out.append(Violation("expectations", f"{len(restarts)} restarts, expected {extra['restarts']}", restarts[:3]))
    return out


INVARIANTS: dict[str, Callable[[History, Scenario], list[Violation]]] = {
    "ranks_unique": ranks_unique,
    "membership_agreement": membership_agreement,
    "world_size_bounds": world_size_bounds,
    "rounds_monotonic": rounds_monotonic,
    "failure_handled": failure_handled,
    "restart_budget": restart_budget,
    "no_orphans": no_orphans,
    "liveness": liveness,
    "expectations": expectations,
}


def stats(history: History) -> dict[str, Any]:
    rounds = {e.round for e in history.filter(h.RDZV_COMPLETE) if e.round is not None}
    ends = history.filter(_JOB_END)
    restarts = history.filter(h.RESTART)
    failures = [e for e in restarts if e.detail.get("reason") != "membership"]
    return {
        "events": len(history),
        "rounds": len(rounds),
        "last_round": max(rounds) if rounds else None,
        "restarts": len(restarts),
        # What max_restarts limits (failure restarts, once per round job-wide) apart from free membership re-forms.
        "failure_restarts": len(failures),
        "failure_rounds": len({e.round for e in failures}) if all(e.round is not None for e in failures) else None,
        "membership_restarts": len(restarts) - len(failures),
        "restart_count": max((e.detail.get("restart_count") or 0 for e in restarts), default=0),
        "worker_failures": len(history.filter(h.WORKER_FAILED)),
        "faults": len(history.filter(h.FAULT_START)),
        "outcome": ("succeeded" if ends[0].event == h.JOB_SUCCEEDED else "failed") if ends else None,
        "end_t": round(history.events[-1].t, 6) if len(history) else 0.0,
    }


def check(history: History, scenario: Scenario, only: list[str] | None = None) -> CheckResult:
    """Run every invariant (or the ``only`` ones) over ``history``."""
    names = list(INVARIANTS) if only is None else only
    unknown = [n for n in names if n not in INVARIANTS]
    if unknown:
        raise ValueError(f"unknown invariant {unknown[0]!r}; known: {', '.join(INVARIANTS)}")
    violations: list[Violation] = []
    for name in names:
        violations.extend(INVARIANTS[name](history, scenario))
    return CheckResult(violations, names, stats(history))
