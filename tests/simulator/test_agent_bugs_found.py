"""The virtual simulation runs the real agent's decisions (AgentStepper), so an agent bug planted there is found by
the virtual fuzzer, shrunk, and the shrunk schedule replays it; without the bug the same schedule is clean."""

from dataclasses import replace

import pytest

from elastic_impl.agent.server.decisions import Action, AgentStepper, Decision
from simulator.checker import check
from simulator.fuzz import fuzz
from simulator.generator import fuzz_base
from simulator.virtual import run_virtual


def _per_node_budget(self):
    """Planted bug: each agent counts only its own restarts (the job-wide count is ignored)."""
    yield from ()
    if self.remaining_restarts <= 0:
        return None
    self.remaining_restarts -= 1
    return self.restart_count + 1


_real_on_healthy = AgentStepper._on_healthy


def _reform_spends_budget(self, clock):
    """Planted bug: a membership change is counted against max_restarts."""
    decision = yield from _real_on_healthy(self, clock)
    if decision.action == Action.REFORM and (yield from self._spend_restart()) is None:
        return Decision(Action.FAIL, f"max_restarts={self.max_restarts} is exhausted")
    return decision


@pytest.mark.parametrize("method, bug", [("_spend_restart", _per_node_budget), ("_on_healthy", _reform_spends_budget)],
                         ids=["budget-per-node", "membership-counted"])
def test_a_planted_agent_bug_is_found_by_virtual_fuzzing(monkeypatch, tmp_path, method, bug):
    base = replace(fuzz_base(), max_restarts=1)
    with monkeypatch.context() as planted:
        planted.setattr(AgentStepper, method, bug)
        found = fuzz(seed=3, runs=1000, base=base, out_dir=tmp_path)
        assert not found.ok, f"{found.runs} schedules and no violation"
        assert "restart_budget" in found.check.violated
        replayed = check(run_virtual(found.failing).history, found.failing)
        assert replayed.violated == found.failing.expect.violations
    # The same schedule on the real stepper keeps the budget: the violation was the planted bug's.
    clean = check(run_virtual(found.failing).history, found.failing)
    assert clean.ok, [str(v) for v in clean.violations]
