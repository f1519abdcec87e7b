"""Timer API: clients ask a server to kill their process if a scope is not released before a deadline.

Expiration times are absolute ``clock.time()`` seconds. The clock comes from the ``elastic_impl.utils.clock`` seam
(module-wide via :func:`set_clock`, or per server via ``clock=``) so the simulator can expire timers in virtual time.

Our extensions, for the simulator and the fault injector:
* ``TimerServer.run_once()`` runs one watchdog iteration synchronously (no thread needed);
* ``TimerServer.expire_timer(worker_id, scope_id=None)`` force-expires a worker's timers (all scopes if
  ``scope_id`` is None); the next watchdog iteration (or ``run_once()``) reaps that worker.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
import math
import threading
from typing import Any

from elastic_impl.utils.clock import REAL_CLOCK, Clock

__all__ = [
    "TimerRequest",
    "TimerClient",
    "RequestQueue",
    "TimerServer",
    "configure",
    "expires",
    "set_clock",
    "get_clock",
]

logger = logging.getLogger(__name__)

_clock: Clock = REAL_CLOCK


def set_clock(clock: Clock) -> None:
    """Make ``expires`` and servers created afterwards (without ``clock=``) use ``clock``."""
    if not isinstance(clock, Clock):
        raise TypeError(f"clock must implement elastic_impl.utils.clock.Clock, got {clock!r}")
    global _clock
    _clock = clock


def get_clock() -> Clock:
    return _clock


class TimerRequest:
    """Acquire (``expiration_time >= 0``) or release (negative) the timer ``scope_id`` of ``worker_id``."""

    __slots__ = ["worker_id", "scope_id", "expiration_time"]

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float):
        self.worker_id = worker_id
        self.scope_id = scope_id
        self.expiration_time = expiration_time

    def __eq__(self, other):
        if isinstance(other, TimerRequest):
            return (self.worker_id, self.scope_id, self.expiration_time) == (
                other.worker_id,
                other.scope_id,
                other.expiration_time,
            )
        return False

    def __hash__(self):
        return hash((self.worker_id, self.scope_id, self.expiration_time))

    def __repr__(self):
        return f"TimerRequest(worker_id={self.worker_id!r}, scope_id={self.scope_id!r}, expiration_time={self.expiration_time!r})"


class TimerClient(abc.ABC):
    """Talks to a timer server on behalf of the calling worker."""

    @abc.abstractmethod
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Ask the server to reap this worker unless ``scope_id`` is released before ``expiration_time``."""

    @abc.abstractmethod
    def release(self, scope_id: str):
        """Cancel the timer ``scope_id`` of this worker."""


class RequestQueue(abc.ABC):
    """Where a server reads its timer requests from."""

    @abc.abstractmethod
    def size(self) -> int:
        """Approximate number of pending requests."""

    @abc.abstractmethod
    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        """Up to ``size`` requests, waiting at most ``timeout`` seconds for the first one."""


class TimerServer(abc.ABC):
    """Reads requests from ``request_queue`` and reaps workers whose timers expired, every ``max_interval`` s."""

    def __init__(
        self,
        request_queue: RequestQueue,
        max_interval: float,
        daemon: bool = True,
        *,
        clock: Clock | None = None,
    ):
        _check_interval(max_interval)
        self._request_queue = request_queue
        self._max_interval = max_interval
        self._daemon = daemon
        self._clock = clock if clock is not None else _clock
        self._watchdog_thread: threading.Thread | None = None
        self._stop_signaled = threading.Event()

    @abc.abstractmethod
    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        """Apply acquire/release requests."""

    @abc.abstractmethod
    def clear_timers(self, worker_ids: set[Any]) -> None:
        """Forget every timer of ``worker_ids``."""

    @abc.abstractmethod
    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        """Timers expiring before ``deadline``, per worker id."""

    @abc.abstractmethod
    def _reap_worker(self, worker_id: Any) -> bool:
        """Kill ``worker_id``; True when it is gone (or was already)."""

    def expire_timer(self, worker_id: Any, scope_id: str | None = None) -> int:
        """Force-expire the timers of ``worker_id`` (one scope or all); return how many were expired."""
        raise NotImplementedError(f"{type(self).__name__} does not support expire_timer")

    def _reap_worker_no_throw(self, worker_id: Any) -> bool:
        # As upstream documents: a _reap_worker that raises counts as reaped, so its timers are cleared rather than
        # retried forever; a _reap_worker that returns False is retried on the next interval.
        try:
            return self._reap_worker(worker_id)
        except Exception:
            logger.exception("_reap_worker(%s) raised; counting the worker as reaped", worker_id)
            return True

    def run_once(self, wait: float = 0.0) -> list[Any]:
        """One watchdog iteration: read requests (waiting up to ``wait`` s), reap expired workers; return them."""
        batch = max(1, self._request_queue.size())
        self.register_timers(self._request_queue.get(batch, wait))
        now = self._clock.time()
        reaped = []
        for worker_id, expired in self.get_expired_timers(now).items():
            logger.info("reaping worker %s: timers %s expired", worker_id, [r.scope_id for r in expired])
            if self._reap_worker_no_throw(worker_id):
                self.clear_timers({worker_id})
                reaped.append(worker_id)
        return reaped

    def _run_watchdog(self):
        self.run_once(self._max_interval)

    def _watchdog_loop(self):
        while not self._stop_signaled.is_set():
            try:
                self._run_watchdog()
            except Exception:  # the watchdog must outlive one bad iteration
                logger.exception("timer watchdog iteration failed")

    def start(self) -> None:
        if self._watchdog_thread is not None and self._watchdog_thread.is_alive():
            # upstream tolerates a second start(); one watchdog is enough, so it is a no-op here
            logger.info("%s already started", type(self).__name__)
            return
        logger.info("starting %s (max_interval=%s s)", type(self).__name__, self._max_interval)
        self._stop_signaled.clear()
        self._watchdog_thread = threading.Thread(
            target=self._watchdog_loop, name=type(self).__name__ + "-watchdog", daemon=self._daemon
        )
        self._watchdog_thread.start()

    def stop(self) -> None:
        logger.info("stopping %s", type(self).__name__)
        self._stop_signaled.set()
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(self._max_interval + 5)
            self._watchdog_thread = None


def _check_interval(max_interval: float) -> None:
    if (
        isinstance(max_interval, bool)
        or not isinstance(max_interval, (int, float))
        or not (math.isfinite(max_interval) and max_interval > 0)
    ):
        raise ValueError(f"max_interval must be a positive finite number of seconds, got {max_interval!r}")


_timer_client: TimerClient | None = None


def configure(timer_client: TimerClient | None):
    """Set the client ``expires`` uses when none is passed (None: no default client)."""
    if timer_client is not None and not isinstance(timer_client, TimerClient):
        raise TypeError(f"timer_client must be a TimerClient or None, got {timer_client!r}")
    global _timer_client
    _timer_client = timer_client
    logger.info("timer client configured to %s", type(timer_client).__name__)


@contextlib.contextmanager
def expires(after: float, scope: str | None = None, client: TimerClient | None = None):
    """Reap this worker unless the block finishes within ``after`` seconds."""
    if (
        isinstance(after, bool)
        or not isinstance(after, (int, float))
        or not (math.isfinite(after) and after >= 0)
    ):
        raise ValueError(f"expires(after=...) must be a non-negative finite number of seconds, got {after!r}")
    if client is None:
        if _timer_client is None:
            # upstream's wording; code may match on it
            raise RuntimeError("Configure timer client before using countdown timers.")
        client = _timer_client
    if scope is None:
        # default scope: the caller's file and line, so nested/parallel blocks get distinct timers
        # frames: this generator <- contextlib's __enter__ <- the caller's ``with``
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        scope = f"{caller.f_code.co_filename}#{caller.f_lineno}" if caller is not None else "expires"
        del frame, caller
    client.acquire(scope, _clock.time() + after)
    try:
        yield
    finally:
        client.release(scope)
