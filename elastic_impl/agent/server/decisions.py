"""The elastic agent's decisions, without I/O: what a monitor result leads to.

:class:`AgentStepper` holds what the agent knows between monitor ticks (the round its workers belong to, the job-wide
restart count, the restart budget, when the store may be asked again) and turns one monitor result into one
:class:`Decision`. It never touches a store, a process or a thread: when it needs to know something about the world
it yields an :class:`Ask`, and whoever drives it answers. The same stepper runs inside
:class:`~elastic_impl.agent.server.api.SimpleElasticAgent` (answers from the rendezvous handler and the round's
store) and inside the virtual-time simulator (answers from the simulated store), so both make the same decisions::

    stepper.joined(round=..., world_size=..., restart_count=..., members=None, members_by_count=True)
    decision = stepper.step(worker_state, clock, answer)   # answer(ask) -> the value that ask wants (below)
    decision.action                                       # KEEP_RUNNING, RESTART, REFORM, SUCCEED, ...

The decisions (a worker group's state in, an action out):

- SUCCEEDED: if the run moved past this node's round, REFORM (or SUCCEED without a barrier when the run is already
  closed: the job ended without this node); otherwise wait at the exit barrier and SUCCEED, or PEER_FAILED_JOB when
  the barrier ended because a peer failed the job.
- FAILED / UNHEALTHY: PEER_FAILED_JOB if a peer already failed the job (restarting cannot help); otherwise count the
  failure against the restart budget: RESTART while the budget allows, else FAIL. A failure the job-wide counter
  cannot take yet (the store does not answer) is RETRY_LATER until it can, and STORE_LOST after the outage window.
- HEALTHY: at most as often as the store checks allow, PEER_FAILED_JOB if a peer failed the job, REFORM if nodes
  wait to join or a participant left; a store outage is ridden out for ``store_outage_window`` seconds (STORE_LOST
  after that).

The restart budget is the job's when the driver has a job-wide counter (the rendezvous keeps one): a failure round
costs one restart however many nodes saw it (the first node of the round to claim it counts it), and a node that
rejoins starts from the job's count. Without a counter it is a countdown of this agent's own restarts. Membership
changes (REFORM) never spend it.

A failure is counted in the job-wide counter BEFORE the workers restart, never after. Counting it locally while the
store is unreachable and publishing it later cannot keep the budget: until it is published the other nodes do not see
it, re-form (for free) and may spend the same last restart on a failure of their own, and the node's local countdown
never saw the restarts the job spent elsewhere (found by virtual fuzzing: two worker kills and a 0.1 s partition
restarted a job with max_restarts=1 twice). Waiting costs no availability: the restart is a re-rendezvous, which
needs the same store. So the failure stays pending (RETRY_LATER, asked again every few tenths of a second) until the
store answers; it is then counted exactly once, because the claim is per failure round (a peer that claimed the
round counts it; a claim this node won is remembered, so a retry only increments). A store still silent after the
outage window ends the agent (STORE_LOST): by then its peers have dropped it anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from elastic_impl.rendezvous.api import RendezvousConnectionError
from elastic_impl.utils.clock import Clock

__all__ = ["Action", "AgentStepper", "Ask", "Decision", "StoreUnavailable", "drive"]

# Seconds between checks whether a peer failed the job while the workers are healthy (one store read each).
PEER_FAILURE_POLL = 1.0


class Ask(str, Enum):
    """What the stepper needs to know from the world; the driver's answer for each is given here."""

    PEER_FAILED = "peer_failed"  # bool: another node published that the job failed (in this round's store)
    CURRENT_ROUND = "current_round"  # int | None: the run's round now (None: unknown)
    RUN_CLOSED = "run_closed"  # bool: the run was closed (the job ended)
    EXIT_BARRIER = "exit_barrier"  # bool: wait at the exit barrier; whether it ended because a peer failed the job
    NODES_WAITING = "nodes_waiting"  # int, or StoreUnavailable when the store cannot be reached
    PARTICIPANTS = "participants"  # tuple | None: the round's current participants (None: unknown)
    CLAIM_FAILURE_ROUND = "claim_failure_round"  # bool | None | StoreUnavailable: this node is the first of its
    #   round to count a failure (None: there is no job-wide counter; StoreUnavailable: there is, but it did not answer)
    INCREMENT_RESTART_COUNT = "increment_restart_count"  # int | StoreUnavailable: the job-wide count after adding one
    RESTART_COUNT_ABOVE = "restart_count_above"  # int | None | StoreUnavailable: the job-wide count once it exceeds
    #   stepper.restart_count (the claimant's increment), or as it is when a short wait for that ran out


class Action(str, Enum):
    KEEP_RUNNING = "keep_running"  # nothing to do until the next monitor tick
    RESTART = "restart"  # the workers failed and the budget allows: stop them, re-rendezvous, start again
    REFORM = "reform"  # membership changed: restart the same way, without spending the budget
    SUCCEED = "succeed"  # done: the workers succeeded (the exit barrier, if any, is behind)
    FAIL = "fail"  # the workers failed and the budget is spent: stop them, tell the peers, end the job
    PEER_FAILED_JOB = "peer_failed_job"  # a peer failed the job: stop, report its root cause, do not restart
    RETRY_LATER = "retry_later"  # the workers failed, but the failure cannot be counted yet (the store does not
    #   answer): restart nothing, and step again with the same state after ``retry_in`` seconds
    STORE_LOST = "store_lost"  # the store stayed unreachable past the outage window: end the agent with ``error``


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    # RESTART: the job-wide restart count this restart runs under (TORCHELASTIC_RESTART_COUNT of the next attempt).
    restart_count: int | None = None
    # STORE_LOST: the store error that ended it.
    error: BaseException | None = None
    # RETRY_LATER: seconds until the driver steps again.
    retry_in: float | None = None


@dataclass(frozen=True)
class StoreUnavailable:
    """An answer saying the store could not be asked (the error it gave)."""

    error: BaseException


class AgentStepper:
    """The agent's decision state for one worker spec; see the module docstring. Not thread-safe."""

    def __init__(self, max_restarts: int, monitor_interval: float, store_outage_window: float = 0.0) -> None:
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
            raise ValueError(f"invalid max_restarts: {max_restarts!r} (must be an int >= 0)")
        if not isinstance(monitor_interval, (int, float)) or monitor_interval <= 0:
            raise ValueError(f"invalid monitor_interval: {monitor_interval!r} (must be a number > 0)")
        self.max_restarts = max_restarts
        self.monitor_interval = float(monitor_interval)
        # How long healthy workers ride out a store that cannot be reached (peers drop a silent node after about
        # as long, so a store gone for good still ends the agent within that bound).
        self.store_outage_window = float(store_outage_window)
        self.remaining_restarts = max_restarts
        # Set by the agent (upstream's ``_remaining_restarts = 0``): no further restart, whatever the job-wide count.
        self.restarts_disabled = False
        # Job-wide restart count as of the last rendezvous: TORCHELASTIC_RESTART_COUNT of the running attempt.
        self.restart_count = 0
        self.round: int | None = None
        self.world_size: int | None = None
        self._members: tuple | None = None
        self._members_by_count = False
        self._next_store_check = float("-inf")
        self._next_peer_failure_check = float("-inf")
        self._store_outage_since: float | None = None
        # This node won the claim of its round's failure but could not increment the job-wide count yet: a retry
        # must increment without claiming again (the claim is spent: a second one would say a peer counted it).
        self._claim_won = False
        # The job-wide count the last RESTART ran under: a floor for the next join's count (see joined).
        self._restarted_under = 0

    @property
    def restarts_spent(self) -> int:
        return self.max_restarts - self.remaining_restarts

    # ------------------------------------------------------------------ inputs

    def joined(self, round: int | None, world_size: int | None, restart_count: int | None,
               members: tuple | None = None, members_by_count: bool = False) -> None:
        """A rendezvous completed: the workers now belong to ``round`` of ``world_size`` nodes.

        ``restart_count``: the job-wide count the join saw (None: no job-wide counter; this agent's own count is
        used). ``members``: the participants read right after the round (None: not read). ``members_by_count``:
        judge a participant change by the count alone (a completed round's participants can only shrink).
        """
        self.round = round
        self.world_size = world_size
        # The job-wide count only grows: the larger of what the join saw and what this node already knew. (A node
        # that lost its round's claim restarts under one more than it knew while the claimant may not have counted
        # yet; a rejoin must not forget that.)
        known = max(self.restart_count, self._restarted_under)
        self.restart_count = max(known, restart_count if restart_count is not None else self.restarts_spent)
        self._claim_won = False
        self._members = members
        self._members_by_count = members_by_count

    # ------------------------------------------------------------------ decisions

    def step(self, workers: str, clock: Clock, answer: Callable[[Ask], Any]) -> Decision:
        """Decide on one monitor result, asking ``answer`` whatever the decision needs to know."""
        return drive(self.decide(workers, clock), answer)

    def decide(self, workers: str, clock: Clock) -> Generator[Ask, Any, Decision]:
        """The decision on the worker group's state ``workers`` (a WorkerState value), as a generator of asks."""
        if workers == "SUCCEEDED":
            return (yield from self._on_success())
        if workers in ("FAILED", "UNHEALTHY"):
            return (yield from self._on_failure(clock))
        if workers == "HEALTHY":
            return (yield from self._on_healthy(clock))
        raise ValueError(f"invalid worker group state for a decision: {workers!r} (SUCCEEDED, FAILED, UNHEALTHY or HEALTHY)")

    def _on_success(self) -> Generator[Ask, Any, Decision]:
        moved_on = None
        if self.round is not None:
            current = yield Ask.CURRENT_ROUND
            moved_on = current if current is not None and current > self.round else None
        if moved_on is not None:
            if (yield Ask.RUN_CLOSED):
                # Taken for dead and the others already finished the job: nobody will ever reach this round's
                # exit barrier.
                return Decision(Action.SUCCEED, f"the job ended without this node (its round {self.round} was "
                                                "superseded); exit barrier skipped")
            # A success in a world that no longer exists is not the job's: rejoin like any membership change.
            return self._reform(f"workers succeeded in round {self.round}, but the run moved on to round {moved_on}")
        if (yield Ask.EXIT_BARRIER):
            return Decision(Action.PEER_FAILED_JOB, "workers succeeded, but a peer failed the job")
        return Decision(Action.SUCCEED)

    def _on_failure(self, clock: Clock) -> Generator[Ask, Any, Decision]:
        self._next_peer_failure_check = clock.monotonic() + PEER_FAILURE_POLL
        if (yield Ask.PEER_FAILED):
            # Our workers most likely broke because a peer gave up: restarting cannot help.
            return Decision(Action.PEER_FAILED_JOB, "workers failed after a peer failed the job")
        count = yield from self._spend_restart()
        if isinstance(count, StoreUnavailable):
            return self._failure_not_counted(count.error, clock.monotonic())
        self._store_outage_since = None
        if count is None:
            return Decision(Action.FAIL, f"workers failed and max_restarts={self.max_restarts} is exhausted")
        self._restarted_under = count
        return Decision(Action.RESTART, "workers failed", restart_count=count)

    def _on_healthy(self, clock: Clock) -> Generator[Ask, Any, Decision]:
        checks_started = clock.monotonic()
        if checks_started < self._next_store_check:
            return Decision(Action.KEEP_RUNNING)
        if checks_started >= self._next_peer_failure_check:
            self._next_peer_failure_check = checks_started + PEER_FAILURE_POLL
            if (yield Ask.PEER_FAILED):
                return Decision(Action.PEER_FAILED_JOB, "a peer failed the job")
        waiting = yield Ask.NODES_WAITING
        if isinstance(waiting, StoreUnavailable):
            return self._store_outage(waiting.error, clock.monotonic())
        self._store_outage_since = None
        reason = f"{waiting} node(s) waiting to join" if waiting > 0 else self._participants_changed((yield Ask.PARTICIPANTS))
        if reason:
            return self._reform(reason)
        # The checks share the store connection with the rendezvous heartbeats: on a slow store they would take it
        # nearly all the time and starve the heartbeats into eviction. Wait at least as long as they took before the
        # next (the monitor interval the driver waits anyway counts towards that).
        took = clock.monotonic() - checks_started
        self._next_store_check = clock.monotonic() + max(0.0, took - self.monitor_interval)
        return Decision(Action.KEEP_RUNNING)

    # ------------------------------------------------------------------ the parts

    def _reform(self, reason: str) -> Decision:
        """A membership restart: free of the restart budget."""
        return Decision(Action.REFORM, reason, restart_count=self.restart_count)

    def _spend_restart(self) -> Generator[Ask, Any, int | StoreUnavailable | None]:
        """Count this failure against the budget: the job-wide count the restart runs under, None when the budget is
        spent, StoreUnavailable when the job-wide counter did not answer (nothing spent: ask again later)."""
        if self.restarts_disabled:
            return None
        claimed = True if self._claim_won else (yield Ask.CLAIM_FAILURE_ROUND)
        if isinstance(claimed, StoreUnavailable):
            return claimed
        count = None
        if claimed:
            # One failure usually breaks every node's workers (their collectives fail): one count per round, by the
            # first node to claim it; the others take the count it made.
            self._claim_won = True
            count = yield Ask.INCREMENT_RESTART_COUNT
            if isinstance(count, StoreUnavailable):
                return count
            self._claim_won = False
        elif claimed is not None:
            # A peer claimed the round and counts it: at least one more than this node knew, even if the count it
            # made cannot be read (so this node's unanswered read never turns into a count of its own).
            count = yield Ask.RESTART_COUNT_ABOVE
            count = max(count if isinstance(count, int) else 0, self.restart_count + 1)
        if count is None:  # no job-wide counter: this agent's own countdown
            if self.remaining_restarts <= 0:
                return None
            self.remaining_restarts -= 1
            return self.restart_count + 1
        self.remaining_restarts = max(0, self.max_restarts - count)
        return count if count <= self.max_restarts else None

    def _participants_changed(self, members: tuple | None) -> str | None:
        if self._members_by_count and members is not None and len(members) != self.world_size:
            return "participants changed (a node left or was evicted)"
        if self._members is not None and members is not None and set(members) != set(self._members):
            return "participants changed (a node left or was evicted)"
        if self._members is not None and len(self._members) != self.world_size:
            # Read right after the round completed, yet short of its world size: a participant left or was evicted
            # before that read (comparing later reads with it alone would never notice).
            return "participants changed (a node left right after the round completed)"
        return None

    def _outage_over(self, now: float) -> bool:
        """Whether the store has been unreachable for longer than the outage window (the outage starts now if new)."""
        if self._store_outage_since is None:
            self._store_outage_since = now
        return now - self._store_outage_since > self.store_outage_window

    def _outage_retry_in(self) -> float:
        return min(0.5, max(self.store_outage_window / 10, 0.05))

    def _store_outage(self, error: BaseException, now: float) -> Decision:
        """Healthy workers do not need the store; the membership check does. Retry it for up to the outage window."""
        if self._outage_over(now):
            return Decision(Action.STORE_LOST, f"store unreachable for more than {self.store_outage_window:g} s",
                            error=error)
        self._next_store_check = now + self._outage_retry_in()
        return Decision(Action.KEEP_RUNNING, f"store unavailable for {now - self._store_outage_since:.1f} s "
                                             f"(giving up after {self.store_outage_window:.1f} s): {error}")

    def _failure_not_counted(self, error: BaseException, now: float) -> Decision:
        """The job-wide counter did not answer: the failure stays pending (see the module docstring)."""
        if self._outage_over(now):
            reason = (f"workers failed in round {self.round}, and the failure could not be counted against "
                      f"max_restarts={self.max_restarts}: the store did not answer for more than "
                      f"{self.store_outage_window:g} s (last error: {type(error).__name__}: {error})")
            lost = RendezvousConnectionError(reason)
            lost.__cause__ = error
            return Decision(Action.STORE_LOST, reason, error=lost)
        return Decision(Action.RETRY_LATER, f"workers failed; the failure is counted once the store answers (unavailable "
                                            f"for {now - self._store_outage_since:.1f} s, giving up after "
                                            f"{self.store_outage_window:.1f} s): {error}",
                        retry_in=self._outage_retry_in())


def drive(decision: Generator[Ask, Any, Decision], answer: Callable[[Ask], Any]) -> Decision:
    """Run one decision to its end, answering each of its asks with ``answer``."""
    try:
        ask = next(decision)
        while True:
            ask = decision.send(answer(ask))
    except StopIteration as done:
        return done.value
