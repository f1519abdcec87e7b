"""Timer server and client over a ``multiprocessing`` queue (workers forked from the server's process)."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any

from elastic_impl.timer.api import RequestQueue, TimerClient, TimerRequest, TimerServer
from elastic_impl.utils.clock import Clock

__all__ = ["LocalTimerClient", "LocalTimerServer", "MultiprocessingRequestQueue"]

logger = logging.getLogger(__name__)


class LocalTimerClient(TimerClient):
    """Sends this process's (pid) timer requests to a :class:`LocalTimerServer` through ``mp_queue``."""

    def __init__(self, mp_queue):
        super().__init__()
        self._mp_queue = mp_queue

    def acquire(self, scope_id, expiration_time):
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, expiration_time))

    def release(self, scope_id):
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, -1))


class MultiprocessingRequestQueue(RequestQueue):
    """A :class:`RequestQueue` reading a ``multiprocessing.Queue``."""

    def __init__(self, mp_queue):
        super().__init__()
        self._mp_queue = mp_queue

    def size(self) -> int:
        try:
            return self._mp_queue.qsize()
        except NotImplementedError:  # macOS has no sem_getvalue
            return 1

    def get(self, size, timeout: float) -> list[TimerRequest]:
        requests: list[TimerRequest] = []
        # waiting on a real queue is I/O, not protocol time: it uses the OS clock on purpose
        deadline = time.monotonic() + max(0.0, timeout)
        while len(requests) < size:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    item = self._mp_queue.get(block=True, timeout=remaining)
                else:
                    item = self._mp_queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, TimerRequest):
                requests.append(item)
            else:
                logger.warning("ignoring non-TimerRequest item on the timer queue: %r", item)
        return requests


class LocalTimerServer(TimerServer):
    """Kills (SIGKILL) worker processes whose timers expired; worker ids are pids."""

    def __init__(
        self, mp_queue, max_interval: float = 60, daemon: bool = True, *, clock: Clock | None = None
    ):
        super().__init__(MultiprocessingRequestQueue(mp_queue), max_interval, daemon, clock=clock)
        self._timers: dict[tuple[Any, str], TimerRequest] = {}
        self._lock = threading.Lock()

    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        with self._lock:
            for request in timer_requests:
                key = (request.worker_id, request.scope_id)
                if request.expiration_time < 0:
                    self._timers.pop(key, None)
                else:
                    self._timers[key] = request

    def clear_timers(self, worker_ids: set[Any]) -> None:
        with self._lock:
            for key in [k for k in self._timers if k[0] in worker_ids]:
                del self._timers[key]

    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        expired: dict[Any, list[TimerRequest]] = {}
        with self._lock:
            for request in self._timers.values():
                if request.expiration_time <= deadline:
                    expired.setdefault(request.worker_id, []).append(request)
        return expired

    def expire_timer(self, worker_id: Any, scope_id: str | None = None) -> int:
        with self._lock:
            keys = [k for k in self._timers if k[0] == worker_id and (scope_id is None or k[1] == scope_id)]
            for key in keys:
                # -inf is before any deadline, real or virtual
                self._timers[key] = TimerRequest(worker_id, key[1], float("-inf"))
        return len(keys)

    def _reap_worker(self, worker_id: int) -> bool:
        try:
            os.kill(worker_id, signal.SIGKILL)
        except ProcessLookupError:
            logger.info("worker pid %s already gone; nothing to reap", worker_id)
        except OSError:
            logger.exception("could not kill worker pid %s; will retry next interval", worker_id)
            return False
        return True
