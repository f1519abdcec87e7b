"""AgentStepper: the agent's decisions with no I/O, driven by scripted answers (the run loop's own tests drive it
through SimpleElasticAgent over a real TCPStore; the virtual simulator drives it over its simulated store)."""

import pytest

from elastic_impl.agent.server.decisions import Action, AgentStepper, Ask, StoreUnavailable
from elastic_impl.rendezvous.api import RendezvousConnectionError


class Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


def answers(**given):
    """An answer function from keyword answers (Ask values); records the asks in order."""
    asked = []

    def answer(ask):
        asked.append(ask)
        return given[ask.value]

    answer.asked = asked
    return answer


def stepper(max_restarts=2, window=1.0, restart_count=0, world_size=2):
    s = AgentStepper(max_restarts, monitor_interval=0.1, store_outage_window=window)
    s.joined(round=4, world_size=world_size, restart_count=restart_count, members_by_count=True)
    return s


def test_a_failure_round_is_counted_once_job_wide_and_the_budget_is_the_jobs():
    s, clock = stepper(max_restarts=2, restart_count=1), Clock()
    claimant = answers(peer_failed=False, claim_failure_round=True, increment_restart_count=2)
    decision = s.step("FAILED", clock, claimant)
    assert (decision.action, decision.restart_count, s.remaining_restarts) == (Action.RESTART, 2, 0)
    assert claimant.asked == [Ask.PEER_FAILED, Ask.CLAIM_FAILURE_ROUND, Ask.INCREMENT_RESTART_COUNT]
    # Another node of the same round loses the claim and takes the claimant's count (at least one more than its own).
    other = stepper(max_restarts=2, restart_count=1)
    loser = answers(peer_failed=False, claim_failure_round=False, restart_count_above=1)  # increment not seen yet
    assert other.step("FAILED", clock, loser).restart_count == 2
    assert Ask.INCREMENT_RESTART_COUNT not in loser.asked
    # A rejoined agent with a fresh process still sees the job's count: the budget spent elsewhere stays spent.
    fresh = stepper(max_restarts=2, restart_count=2)
    assert fresh.step("FAILED", clock, answers(peer_failed=False, claim_failure_round=True,
                                               increment_restart_count=3)).action == Action.FAIL


def test_without_a_job_wide_counter_the_budget_is_a_local_countdown():
    s, clock = stepper(max_restarts=1, restart_count=None), Clock()
    no_counter = answers(peer_failed=False, claim_failure_round=None)
    assert s.step("FAILED", clock, no_counter).action == Action.RESTART
    s.joined(round=5, world_size=2, restart_count=None)
    assert s.restart_count == 1  # TORCHELASTIC_RESTART_COUNT = this agent's own restarts, like upstream
    assert s.step("FAILED", clock, no_counter).action == Action.FAIL


DOWN = StoreUnavailable(RendezvousConnectionError("connection reset"))


def test_a_failure_the_counter_cannot_take_waits_for_the_store_and_is_never_counted_locally():
    # The job already spent its one restart elsewhere; this node never restarted itself. The old fallback (this
    # node's own countdown, still 1) restarted here: a second failure round on a budget of one.
    s, clock = stepper(max_restarts=1, restart_count=1, window=1.0), Clock()
    waiting = s.step("FAILED", clock, answers(peer_failed=False, claim_failure_round=DOWN))
    assert (waiting.action, waiting.restart_count) == (Action.RETRY_LATER, None)
    assert 0 < waiting.retry_in <= 0.5 and "counted once the store answers" in waiting.reason
    assert (s.restart_count, s.remaining_restarts) == (1, 1)  # nothing spent while the counter is silent
    clock.now += 0.5  # the store answers again: the failure is counted in the job's count, which is spent
    counted = answers(peer_failed=False, claim_failure_round=True, increment_restart_count=2)
    assert s.step("FAILED", clock, counted).action == Action.FAIL


def test_a_failure_is_counted_once_when_the_store_answers_again():
    # Claimed, then the store went away before the increment: the retry increments without claiming again (a second
    # claim would lose to this node's own first one and leave the round uncounted).
    s, clock = stepper(max_restarts=3, restart_count=1), Clock()
    first = answers(peer_failed=False, claim_failure_round=True, increment_restart_count=DOWN)
    assert s.step("FAILED", clock, first).action == Action.RETRY_LATER
    clock.now += 0.2
    retry = answers(peer_failed=False, increment_restart_count=2)
    decision = s.step("FAILED", clock, retry)
    assert (decision.action, decision.restart_count) == (Action.RESTART, 2)
    assert retry.asked == [Ask.PEER_FAILED, Ask.INCREMENT_RESTART_COUNT]
    # A node that lost the claim counts on the claimant even when it cannot read the count: one more than it knew.
    loser = stepper(max_restarts=3, restart_count=1)
    lost = loser.step("FAILED", clock, answers(peer_failed=False, claim_failure_round=False, restart_count_above=DOWN))
    assert (lost.action, lost.restart_count) == (Action.RESTART, 2)
    loser.joined(round=5, world_size=2, restart_count=1)  # rejoined before the claimant's increment landed
    assert loser.restart_count == 2  # the job-wide count it knew is not forgotten


def test_a_failure_not_counted_within_the_outage_window_ends_the_agent_with_a_clear_error():
    s, clock = stepper(max_restarts=2, window=1.0), Clock()
    assert s.step("FAILED", clock, answers(peer_failed=False, claim_failure_round=DOWN)).action == Action.RETRY_LATER
    clock.now += 1.5
    lost = s.step("FAILED", clock, answers(peer_failed=False, claim_failure_round=DOWN))
    assert lost.action == Action.STORE_LOST and isinstance(lost.error, RendezvousConnectionError)
    assert str(lost.error) == lost.reason == (
        "workers failed in round 4, and the failure could not be counted against max_restarts=2: the store did not "
        "answer for more than 1 s (last error: RendezvousConnectionError: connection reset)")
    assert lost.error.__cause__ is DOWN.error


def test_a_peer_that_failed_the_job_stops_this_node_without_spending_the_budget():
    s, clock = stepper(), Clock()
    assert s.step("FAILED", clock, answers(peer_failed=True)).action == Action.PEER_FAILED_JOB
    assert s.remaining_restarts == 2
    assert stepper().step("HEALTHY", clock, answers(peer_failed=True)).action == Action.PEER_FAILED_JOB


def test_membership_changes_reform_for_free():
    s, clock = stepper(max_restarts=0, world_size=2), Clock()
    decision = s.step("HEALTHY", clock, answers(peer_failed=False, nodes_waiting=1))
    assert (decision.action, decision.reason) == (Action.REFORM, "1 node(s) waiting to join")
    clock.now += 0.2
    left = answers(nodes_waiting=0, participants=("a",))  # peer-failure check not due again yet (1 s apart)
    assert s.step("HEALTHY", clock, left).action == Action.REFORM and left.asked == [Ask.NODES_WAITING, Ask.PARTICIPANTS]
    clock.now += 0.2
    assert s.step("HEALTHY", clock, answers(nodes_waiting=0, participants=("a", "b"))).action == Action.KEEP_RUNNING
    assert s.remaining_restarts == 0


def test_success_waits_at_the_barrier_unless_the_run_moved_on():
    clock = Clock()
    s = stepper()
    assert s.step("SUCCEEDED", clock, answers(current_round=4, exit_barrier=False)).action == Action.SUCCEED
    assert s.step("SUCCEEDED", clock, answers(current_round=4, exit_barrier=True)).action == Action.PEER_FAILED_JOB
    moved = answers(current_round=6, run_closed=False)
    assert s.step("SUCCEEDED", clock, moved).action == Action.REFORM and Ask.EXIT_BARRIER not in moved.asked
    ended = s.step("SUCCEEDED", clock, answers(current_round=6, run_closed=True))
    assert ended.action == Action.SUCCEED and "superseded" in ended.reason


def test_a_store_outage_is_ridden_out_for_the_window_then_ends_the_agent():
    s, clock = stepper(window=1.0), Clock()
    down = StoreUnavailable(RendezvousConnectionError("connection reset"))
    first = s.step("HEALTHY", clock, answers(peer_failed=False, nodes_waiting=down))
    assert first.action == Action.KEEP_RUNNING and "unavailable" in first.reason
    clock.now += 0.05  # within the pacing of checks during the outage: not even asked
    assert s.step("HEALTHY", clock, answers()).action == Action.KEEP_RUNNING
    clock.now += 1.5
    lost = s.step("HEALTHY", clock, answers(peer_failed=False, nodes_waiting=down))
    assert lost.action == Action.STORE_LOST and lost.error is down.error


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"invalid max_restarts: -1 \(must be an int >= 0\)"):
        AgentStepper(-1, 0.1)
    with pytest.raises(ValueError, match=r"invalid monitor_interval: 0 \(must be a number > 0\)"):
        AgentStepper(1, 0)
    with pytest.raises(ValueError, match=r"invalid worker group state for a decision: 'STOPPED'"):
        stepper().step("STOPPED", Clock(), answers())
