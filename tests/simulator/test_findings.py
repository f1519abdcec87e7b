"""Protocol findings of the virtual simulator (fuzzing with the correct store), kept as regression tests.

Each runs the real rendezvous state machine in virtual time; an xfail names a runtime bug that is reported and not
fixed yet (strict: the test starts failing once the bug is fixed, so the marker gets removed).
"""

import pytest

from simulator.checker import check
from simulator.scenario import scenario_from_dict
from simulator.virtual import run_virtual

# Two nodes train at max_nodes=2 while two more wait. One worker crashes: its node re-joins and opens the next
# round, into which the waiting nodes are promoted (up to max_nodes) and then the opener adds itself as well.
OVERFULL_NEXT_ROUND = {
    "name": "waiters fill the next round",
    "nodes": 4, "workers_per_node": 1, "min_nodes": 2, "max_nodes": 2, "max_restarts": 3,
    "timeouts": {"join": 30, "last_call": 0.5, "heartbeat": 0.5, "close": 5, "monitor": 0.1},
    "job": {"steps": 8, "step_seconds": 0.5}, "store": {"latency": 0.01},
    "faults": [{"at": 2.0, "fault": "kill_worker", "node": 2, "rank": 0}],
}


@pytest.mark.xfail(
    strict=True,
    reason="runtime bug (elastic_impl/rendezvous/dynamic_rendezvous.py, _decide_join): a participant that opens the "
    "next round adds itself after _open_next_round promoted max_nodes waiters, so the round completes with "
    "max_nodes + 1 nodes",
)
def test_a_round_opened_with_a_full_wait_list_stays_within_max_nodes():
    s = scenario_from_dict(OVERFULL_NEXT_ROUND)
    result = check(run_virtual(s).history, s)
    assert "world_size_bounds" not in result.violated, [str(v) for v in result.violations[:3]]
