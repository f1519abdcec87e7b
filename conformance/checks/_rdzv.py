"""Shared helpers for rendezvous checks: real DynamicRendezvousHandlers over the shared TCPStore."""

from __future__ import annotations

import threading
from datetime import timedelta

DR = "rendezvous.dynamic_rendezvous"


def timeout(ctx, join: float = 20, last_call: float = 0.3, close: float = 5, heartbeat: float = 5):
    return ctx.get(f"{DR}.RendezvousTimeout")(
        join=timedelta(seconds=join), last_call=timedelta(seconds=last_call), close=timedelta(seconds=close),
        heartbeat=timedelta(seconds=heartbeat),
    )


def c10d_handler(ctx, run_id: str, min_nodes: int = 1, max_nodes: int = 1, **timeouts):
    """A DynamicRendezvousHandler on a C10dRendezvousBackend, each on its own connection to the shared store."""
    store = ctx.resources.tcp_store_client()
    backend = ctx.get("rendezvous.c10d_rendezvous_backend.C10dRendezvousBackend")(store, run_id)
    handler = ctx.get(f"{DR}.DynamicRendezvousHandler").from_backend(
        run_id=run_id, store=store, backend=backend, min_nodes=min_nodes, max_nodes=max_nodes,
        timeout=timeout(ctx, **timeouts),
    )
    ctx.add_cleanup(handler.shutdown)
    return handler


def in_threads(ctx, fns, timeout_s: float = 40):
    """Run callables concurrently (one simulated node each); return their results or raise the first error."""
    results: list = [None] * len(fns)
    errors: list = [None] * len(fns)

    def runner(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # reported to the caller below
            errors[i] = exc

    threads = [threading.Thread(target=runner, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    ctx.expect(not any(t.is_alive() for t in threads), f"concurrent nodes did not finish within {timeout_s} s")
    for exc in errors:
        if exc is not None:
            raise exc
    return results
