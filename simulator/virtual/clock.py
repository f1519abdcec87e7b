"""Virtual time: one simulation clock, per-node views of it (for clock skew), and the event queue."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any

# Wall-clock origin of virtual time, so ``time()`` looks like a real epoch timestamp in rendezvous state.
EPOCH = 1_700_000_000.0


class VirtualClock:
    """Shared simulation time (seconds since the scenario started) and the queue of scheduled callbacks.

    Callbacks at the same time run in the order they were scheduled (a sequence number breaks ties), so a run is a
    pure function of the scenario and its seed.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()
        self.processed = 0

    def schedule(self, at: float, fn: Callable[..., Any], *args: Any) -> None:
        if at < self.now:
            at = self.now
        heapq.heappush(self._queue, (at, next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.schedule(self.now + max(0.0, delay), fn, *args)

    def __len__(self) -> int:
        return len(self._queue)

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def run_next(self) -> bool:
        """Advance to the earliest callback and run it; False when the queue is empty."""
        if not self._queue:
            return False
        at, _, fn, args = heapq.heappop(self._queue)
        self.now = at
        self.processed += 1
        fn(*args)
        return True


class NodeClock:
    """One node's view of virtual time, implementing :class:`elastic_impl.utils.clock.Clock`.

    ``monotonic()`` is the shared virtual time; ``time()`` is the epoch time plus this node's ``skew`` (the
    ``clock_skew`` fault changes it). Blocking calls are refused: simulated code must return to the event loop.
    """

    def __init__(self, clock: VirtualClock, skew: float = 0.0) -> None:
        self._clock = clock
        self.skew = skew

    def monotonic(self) -> float:
        return self._clock.now

    def time(self) -> float:
        return EPOCH + self._clock.now + self.skew

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("a virtual-time node cannot sleep; schedule a callback on the VirtualClock instead")

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        raise RuntimeError("a virtual-time node cannot block on an event; schedule a callback on the VirtualClock instead")

    def __repr__(self) -> str:
        return f"NodeClock(now={self._clock.now:.6f}, skew={self.skew})"
