"""Store helpers built on plain c10d store calls (set/get/add/wait): gather, barrier.

Used by the agent's exit barrier and by rendezvous code. Every blocking call is bounded by a timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

__all__ = ["barrier", "get_all", "store_timeout", "synchronize"]


@contextmanager
def store_timeout(store, timeout: float):
    """Temporarily set the store's timeout (seconds); restore it afterwards."""
    old = store.timeout
    store.set_timeout(timedelta(seconds=timeout))
    try:
        yield
    finally:
        store.set_timeout(old)


def get_all(store, rank: int, prefix: str, world_size: int) -> list[bytes]:
    """Read ``prefix0 .. prefix{world_size-1}`` (waiting for each); the values in rank order."""
    keys = [f"{prefix}{i}" for i in range(world_size)]
    multi_get = getattr(store, "multi_get", None)
    if multi_get is not None:
        try:
            return list(multi_get(keys))
        except (AttributeError, NotImplementedError):
            pass
    return [store.get(key) for key in keys]


def synchronize(store, data: bytes, rank: int, world_size: int, key_prefix: str, timeout: float = 300) -> list[bytes]:
    """All-gather: each rank publishes ``data``; returns every rank's data in rank order (bounded by ``timeout``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    with store_timeout(store, timeout):
        store.set(f"{key_prefix}{rank}", data)
        return get_all(store, rank, key_prefix, world_size)


def barrier(
    store,
    world_size: int,
    key_prefix: str,
    barrier_timeout: float = 300,
    rank: int | None = None,
    rank_tracing_decoder: Callable[[int], str] | None = None,
    trace_timeout: float = 10,
) -> None:
    """Block until ``world_size`` callers reached the barrier named ``key_prefix`` (or raise after the timeout).

    Counts arrivals with one ``add``; the last arrival sets a release key the others ``wait`` on: O(1) store calls
    per caller. On timeout the error says how many arrived (and, when ``rank`` was given, which ranks did, decoded
    with ``rank_tracing_decoder``).
    """
    if world_size < 1:
        raise ValueError(f"barrier world_size must be >= 1, got {world_size}")
    count_key = f"{key_prefix}/num_members"
    release_key = f"{key_prefix}/last_member"
    if rank is not None:
        store.set(f"{key_prefix}/arrived/{rank}", b"1")
    with store_timeout(store, barrier_timeout):
        arrived = store.add(count_key, 1)
        if arrived >= world_size:
            store.set(release_key, b"1")
        try:
            store.wait([release_key])
        except Exception as e:
            done = store.add(count_key, 0)
            detail = ""
            if rank is not None:
                missing = [r for r in range(world_size) if not store.check([f"{key_prefix}/arrived/{r}"])]
                decode = rank_tracing_decoder or str
                detail = f"; missing: {', '.join(decode(r) for r in missing)}"
            raise RuntimeError(
                f"barrier {key_prefix!r} timed out after {barrier_timeout} s: {done} of {world_size} arrived{detail}"
            ) from e
