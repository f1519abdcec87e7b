"""Shared helpers for rendezvous checks: real DynamicRendezvousHandlers over the shared TCPStore."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

DR = "rendezvous.dynamic_rendezvous"


def timeout(ctx, join: float = 20, last_call: float = 0.3, close: float = 5, heartbeat: float = 5):
    return ctx.get(f"{DR}.RendezvousTimeout")(
        join=timedelta(seconds=join), last_call=timedelta(seconds=last_call), close=timedelta(seconds=close),
        heartbeat=timedelta(seconds=heartbeat),
    )


def c10d_handler(ctx, run_id: str, min_nodes: int = 1, max_nodes: int = 1, keep_alive: tuple[int, int] = (5, 3),
                 **timeouts):
    """A DynamicRendezvousHandler on a C10dRendezvousBackend, each on its own connection to the shared store.

    ``keep_alive``: (interval in whole seconds, attempts): a node silent for their product is dead (upstream's
    defaults: 5 s x 3).
    """
    store = ctx.resources.tcp_store_client()
    backend = ctx.get("rendezvous.c10d_rendezvous_backend.C10dRendezvousBackend")(store, run_id)
    handler = ctx.get(f"{DR}.DynamicRendezvousHandler").from_backend(
        run_id=run_id, store=store, backend=backend, min_nodes=min_nodes, max_nodes=max_nodes,
        timeout=timeout(ctx, **timeouts), keep_alive_interval=keep_alive[0], keep_alive_max_attempt=keep_alive[1],
    )
    ctx.add_cleanup(handler.shutdown)
    return handler


class Concurrent:
    """Callables running in threads (one simulated node each), started together; ``results`` joins them."""

    def __init__(self, fns) -> None:
        self.results: list = [None] * len(fns)
        self.errors: list = [None] * len(fns)
        self.threads = [threading.Thread(target=self._run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
        for t in self.threads:
            t.start()

    def _run(self, i, fn) -> None:
        try:
            self.results[i] = fn()
        except BaseException as exc:  # reported to the caller by results()
            self.errors[i] = exc

    def results_within(self, ctx, timeout_s: float) -> list:
        """Their results once all finished, or the first error; fails the check if any is still running."""
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        ctx.expect(not any(t.is_alive() for t in self.threads),
                   f"concurrent nodes did not finish within {timeout_s} s")
        for exc in self.errors:
            if exc is not None:
                raise exc
        return self.results


def in_threads(ctx, fns, timeout_s: float = 40):
    """Run callables concurrently (one simulated node each); return their results or raise the first error."""
    return Concurrent(fns).results_within(ctx, timeout_s)
