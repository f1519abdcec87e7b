"""The clock seam.

Protocol logic (rendezvous state machine, keep-alive, timeouts, timers) never calls ``time`` directly: it takes a
``Clock``. Production code uses :data:`REAL_CLOCK`; the virtual-time simulator passes its own implementation so the
same code runs deterministically on simulated time.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (deadlines, intervals)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (timestamps in records and events)."""

    def sleep(self, seconds: float) -> None:
        """Block the caller for ``seconds`` of this clock's time."""

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Wait for ``event`` up to ``timeout`` seconds of this clock's time; return whether it is set."""


class RealClock:
    """Operating-system time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def __repr__(self) -> str:
        return "RealClock()"


REAL_CLOCK: Clock = RealClock()
