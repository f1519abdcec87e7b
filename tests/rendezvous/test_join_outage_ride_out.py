"""The join's ride-out of a store outage (JoinOutageRideOut): one policy for the handler and the virtual simulator."""

import pytest

from elastic_impl.rendezvous import RendezvousConnectionError
from elastic_impl.rendezvous.dynamic_rendezvous import RendezvousSettings, RendezvousTimeout
from elastic_impl.rendezvous.dynamic_rendezvous.outage import JoinOutageRideOut

SETTINGS = RendezvousSettings("run", 1, 2, RendezvousTimeout(), keep_alive_interval=1.0, keep_alive_max_attempt=3)
DOWN = RendezvousConnectionError("store gone")


def test_retries_until_the_budget_counted_from_the_first_error_then_says_how_long(caplog):
    ride_out = JoinOutageRideOut(SETTINGS, "n1", budget=3.0)
    assert ride_out.failed(DOWN, now=10.0) == 0.5  # half the keep-alive interval
    assert ride_out.failed(DOWN, now=12.8) == pytest.approx(0.2)  # never past the budget
    with pytest.raises(RendezvousConnectionError, match=r"store gone \(the store did not answer for 3.0 s while "
                                                        r"node n1 was joining\)"):
        ride_out.failed(DOWN, now=13.0)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "rendezvous run: node n1 cannot reach the store while joining (store gone)"]


def test_an_answer_ends_the_outage_so_the_next_error_gets_the_whole_budget_again(caplog):
    ride_out = JoinOutageRideOut(SETTINGS, "n1", budget=3.0)
    ride_out.failed(DOWN, now=0.0)
    ride_out.answered(now=2.5)
    assert "reaches the store again after 2.5 s" in caplog.records[-1].getMessage()
    assert ride_out.failed(DOWN, now=5.0) == 0.5 and ride_out.since == 5.0


@pytest.mark.parametrize("budget", [-1, float("inf"), float("nan"), "15", True])
def test_a_bad_budget_is_refused_naming_it(budget):
    with pytest.raises(ValueError, match=r"^invalid store outage budget: .* \(must be finite seconds >= 0\)$"):
        JoinOutageRideOut(SETTINGS, "n1", budget)
