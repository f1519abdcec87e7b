"""Clock faults for agents: a skewed wall clock, and delayed heartbeats.

:class:`ClockSkew` shifts an agent's wall clock (``time.time()``; the monotonic clock is untouched, as with a
misconfigured NTP). The agent process must call :func:`install_skew` at start-up (the simulator's agent entry point
``simulator.live.agent_main`` does); it reads the offset in seconds from the file named by ``$ELASTIC_SIM_CLOCK_FILE``
(re-read at most every 0.1 s), so the skew can change while the agent runs. The rendezvous heartbeats of this code
base are wall-clock stamps compared across nodes, so a skew is visible to the peers exactly as on real machines.

:class:`HeartbeatDelay` delays everything an agent does, heartbeats included, by stopping it for ``stop_seconds``
out of every ``period`` seconds (SIGSTOP/SIGCONT), like a node starved of CPU. Heal: it runs freely again.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from fault_injection.base import Fault, FaultError

__all__ = ["ClockSkew", "HeartbeatDelay", "install_skew", "CLOCK_FILE_ENV", "write_skew"]

CLOCK_FILE_ENV = "ELASTIC_SIM_CLOCK_FILE"


def write_skew(path: str, seconds: float) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(float(seconds)))
    os.replace(tmp, path)  # readers never see a half-written number


def install_skew(path: str | None = None) -> bool:
    """In the agent process: make ``time.time()`` return real time + the offset in ``path``. Returns whether done."""
    path = path or os.environ.get(CLOCK_FILE_ENV)
    if not path:
        return False
    real_time = time.time
    state = {"offset": 0.0, "checked": float("-inf")}
    lock = threading.Lock()

    def skewed_time() -> float:
        now = time.monotonic()
        if now - state["checked"] >= 0.1:
            with lock:
                state["checked"] = now
                try:
                    with open(path) as f:
                        state["offset"] = float(f.read().strip() or 0.0)
                except (OSError, ValueError):
                    pass  # no file yet (or mid-replace): keep the last offset
        return real_time() + state["offset"]

    time.time = skewed_time
    return True


class ClockSkew(Fault):
    """Shift one agent's wall clock by ``seconds`` (positive: ahead); heal: back to the previous offset."""

    kind = "clock_skew"

    def __init__(self, clock_file: str, seconds: float, on_event=None, **labels) -> None:
        if not isinstance(seconds, (int, float)) or seconds != seconds:
            raise FaultError(f"invalid clock_skew seconds {seconds!r}; expected a number")
        super().__init__(on_event, seconds=float(seconds), **labels)
        self.clock_file = clock_file
        self.seconds = float(seconds)
        # The offset in force before the injection (what heal restores); the simulator reads it to undo the skew
        # on this node's event stamps.
        self.previous = 0.0

    def _inject(self) -> None:
        try:
            with open(self.clock_file) as f:
                self.previous = float(f.read().strip() or 0.0)
        except (OSError, ValueError):
            self.previous = 0.0
        write_skew(self.clock_file, self.seconds)

    def _heal(self) -> None:
        write_skew(self.clock_file, self.previous)


class HeartbeatDelay(Fault):
    """Stop process ``pid`` for ``stop_seconds`` out of every ``period`` seconds until healed."""

    kind = "heartbeat_delay"

    def __init__(self, pid: int, stop_seconds: float, period: float, on_event=None, **labels) -> None:
        if not isinstance(pid, int) or pid <= 1:
            raise FaultError(f"heartbeat_delay needs an agent pid > 1, got {pid!r}")
        if not (0 < stop_seconds < period):
            raise FaultError(f"heartbeat_delay needs 0 < stop_seconds < period, got {stop_seconds!r}, {period!r}")
        super().__init__(on_event, pid=pid, stop_seconds=stop_seconds, period=period, **labels)
        self.pid = pid
        self.stop_seconds = float(stop_seconds)
        self.period = float(period)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.stop_seconds)
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait(self.period - self.stop_seconds)
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _inject(self) -> None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            raise FaultError(f"heartbeat_delay: pid {self.pid} does not exist") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-delay-{self.pid}", daemon=True)
        self._thread.start()

    def _heal(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period + 5)
            self._thread = None
