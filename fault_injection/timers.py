"""Timer faults: make a worker's ``expires`` timer run out now.

Workers guard their work with ``elastic_impl.timer.expires(after=...)`` against a :class:`~elastic_impl.timer.
FileTimerServer` (a named pipe). :class:`ExpireTimer` uses the server's ``expire_timer(worker_pid)`` extension to mark
the worker's timers as expired; the server's watchdog then reaps the worker (SIGKILL by default) on its next
iteration, exactly as if the worker had overrun its deadline. :class:`WorkerTimerServer` hosts such a server for the
workers of one node.
"""

from __future__ import annotations

import os

from fault_injection.base import Fault, FaultError

__all__ = ["WorkerTimerServer", "ExpireTimer", "TIMER_FILE_ENV"]

# The worker side (simulator.live.worker) acquires its timers through a FileTimerClient on this FIFO.
TIMER_FILE_ENV = "ELASTIC_SIM_TIMER_FILE"


class WorkerTimerServer:
    """A started :class:`FileTimerServer` on the FIFO ``path`` (checks every ``max_interval`` seconds)."""

    def __init__(self, path: str, run_id: str = "sim", max_interval: float = 0.2) -> None:
        from elastic_impl.timer import FileTimerServer

        self.path = str(path)
        self.expired: list[tuple[int, str]] = []  # (pid, scope) of every timer the server fired

        def log_event(name, request):
            if name == "timer_expired" and request is not None:
                self.expired.append((request.worker_pid, request.scope_id))

        self.server = FileTimerServer(self.path, run_id, max_interval=max_interval, log_event=log_event)
        self.server.start()

    def expire(self, worker_pid: int) -> int:
        return self.server.expire_timer(worker_pid)

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> WorkerTimerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ExpireTimer(Fault):
    """Expire every timer ``worker_pid`` holds on ``server`` (a TimerServer or WorkerTimerServer)."""

    kind = "expire_timer"
    instant = True

    def __init__(self, server, worker_pid: int, scope: str | None = None, on_event=None, **labels) -> None:
        if not isinstance(worker_pid, int) or worker_pid <= 1:
            raise FaultError(f"expire_timer needs a worker pid > 1, got {worker_pid!r}")
        super().__init__(on_event, pid=worker_pid, scope=scope, **labels)
        self.server = getattr(server, "server", server)
        self.worker_pid = worker_pid
        self.scope = scope

    def _inject(self) -> int:
        count = self.server.expire_timer(self.worker_pid, self.scope)
        if count == 0:
            alive = os.path.exists(f"/proc/{self.worker_pid}")
            raise FaultError(
                f"expire_timer: worker pid {self.worker_pid} holds no timer"
                + ("" if alive else " (the process is gone)")
            )
        return count

    def _result_detail(self):
        return {"timers": self.result}
