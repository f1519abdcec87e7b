"""Per-node liveness (backends offering ``NodeLiveness`` with it switched on: etcd-v3 leases) for the stepper."""


from __future__ import annotations

import logging

from ..api import (
    RendezvousError,
)

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package


class PerNodeLiveness:
    """The per-node-liveness part of :class:`~.stepper.RendezvousStepper` (a mixin: it uses the stepper's state)."""

    # ------------------------------------------------------------------ per-node liveness (optional in the seam)

    def _liveness(self) -> bool:
        """Whether heartbeats renew the storage's own liveness entries (``NodeLiveness``, switched on)."""
        return self._offers_liveness and bool(self.backend.supports_liveness())

    def _beat(self) -> None:
        """Renew this node's liveness once half a keep-alive interval has passed (TTL: the heartbeat expiry)."""
        mono = self.clock.monotonic()
        if mono - self._beat_at >= self.settings.keep_alive_seconds / 2:
            self.backend.heartbeat(self.node.key, self.settings.heartbeat_expiry_seconds)
            self._beat_at = mono

    def _refresh_live(self) -> None:
        """Re-read the live set unless it was read within ``max_poll_interval`` (which bounds how stale it is)."""
        mono = self.clock.monotonic()
        if self._live is None or mono - self._live_read_at >= self.max_poll_interval:
            self._live = set(self.backend.live_nodes())
            self._live_read_at = mono

    def _forget(self) -> None:
        self._beat_at = float("-inf")
        try:
            self.backend.forget(self.node.key)
        except RendezvousError as e:  # the entry lapses by itself within the expiry
            logger.debug("rendezvous %s: could not drop the liveness of %s: %s", self.settings.run_id, self.node, e)
