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
