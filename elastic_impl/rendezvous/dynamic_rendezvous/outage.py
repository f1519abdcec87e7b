"""How long a joining node keeps trying a store that does not answer: one policy, used by the handler's join loop
and by the virtual-time simulator's agents, so both give up (or ride an outage out) at the same moment.

A cut network, a restarting store or a store host failing over makes store calls fail for a while. A node that
gave up its join on the first such error was the only one to lose the job (its peers' monitoring rides out the same
outage; seen in the live netns scenarios), so a join retries for ``budget`` seconds -- the store liveness bound --
counted from the first error it sees (on a silent store that error only comes once the first call timed out).
"""

from __future__ import annotations

import logging
import math

from ..api import RendezvousConnectionError
from .state import RendezvousSettings

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package

__all__ = ["JoinOutageRideOut"]


class JoinOutageRideOut:
    """One join's ride-out of store connection errors: at most ``budget`` seconds from the first error on.

    ``failed(error, now)`` returns how long to wait before the next try, or raises RendezvousConnectionError once
    the store has not answered for ``budget`` seconds; ``answered(now)`` ends an outage (the next error starts a new
    one). ``now`` is the caller's monotonic clock. WARNING once when an outage starts and once when it ends.
    """

    def __init__(self, settings: RendezvousSettings, node: object, budget: float) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
            raise ValueError(f"invalid store outage budget: {budget!r} (must be finite seconds >= 0)")
        self._settings = settings
        self._node = node
        self.budget = float(budget)
        self.since: float | None = None  # when the current outage's first error was seen

    def failed(self, error: RendezvousConnectionError, now: float) -> float:
        if self.since is None:
            self.since = now
            logger.warning("rendezvous %s: node %s cannot reach the store while joining (%s); retrying for up to %g s",
                           self._settings.run_id, self._node, error, self.budget)
        down = now - self.since
        if down >= self.budget:
            raise RendezvousConnectionError(
                f"{error} (the store did not answer for {down:.1f} s while node {self._node} was joining)"
            ) from None
        # Often enough to rejoin soon after the store is back; never past the budget.
        return min(1.0, self.budget - down, max(0.1, self._settings.keep_alive_seconds / 2))

    def answered(self, now: float) -> None:
        if self.since is not None:
            logger.warning("rendezvous %s: node %s reaches the store again after %.1f s", self._settings.run_id,
                           self._node, now - self.since)
            self.since = None
