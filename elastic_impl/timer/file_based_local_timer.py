"""Timer server and client over a named pipe (FIFO): works for any local process that knows the path.

Each request is one JSON line, shorter than ``PIPE_BUF``, so writes from concurrent workers never interleave.
The server signals the worker (``signal`` of the request, SIGKILL by default) when its timer expires.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from elastic_impl.timer.api import RequestQueue, TimerClient, TimerRequest, TimerServer, _check_interval
from elastic_impl.timer.debug_info_logging import log_debug_info_for_expired_timers  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.clock import Clock
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.proc_tree import pid_exists

__all__ = ["FileTimerClient", "FileTimerRequest", "FileTimerServer"]

logger = logging.getLogger(__name__)

_VERSION = 1
_FORCED = float("-inf")


class FileTimerRequest(TimerRequest):
    """A timer request carrying the signal to send on expiry; ``worker_id`` is the pid."""

    __slots__ = ["version", "signal"]

    def __init__(self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0) -> None:
        super().__init__(worker_pid, scope_id, expiration_time)
        self.version = _VERSION
        self.signal = signal

    @property
    def worker_pid(self) -> int:
        return self.worker_id

    def __eq__(self, other) -> bool:
        return isinstance(other, FileTimerRequest) and super().__eq__(other) and self.signal == other.signal

    def __hash__(self):
        return hash((self.worker_id, self.scope_id, self.expiration_time, self.signal))

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_pid,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            }
        )


class FileTimerClient(TimerClient):
    """Sends this process's timer requests to the :class:`FileTimerServer` listening on ``file_path``."""

    def __init__(self, file_path: str, signal=signal.SIGKILL) -> None:
        super().__init__()
        # Upstream takes anything and fails later, far from the mistake: a TypeError at the first acquire, or (with
        # its server running) a request the server cannot act on. A signal is a number (signal.Signals is an int).
        if isinstance(signal, bool) or not isinstance(signal, int):
            raise TypeError(f"FileTimerClient signal {signal!r}: expected a signal number such as signal.SIGKILL")
        self._file_path = file_path
        self.signal = signal

    # a server started at the same time may not have created (or opened) its FIFO yet: retry like upstream
    # (10 tries, 0.1 s apart) before giving up
    _OPEN_TRIES = 10
    _OPEN_RETRY_DELAY = 0.1

    def _open_non_blocking(self) -> int:
        for attempt in range(self._OPEN_TRIES):
            try:
                return os.open(self._file_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                # ENOENT: no FIFO yet; ENXIO: no server reading it. Anything else will not fix itself.
                if e.errno not in (errno.ENXIO, errno.ENOENT) or attempt == self._OPEN_TRIES - 1:
                    raise
                time.sleep(self._OPEN_RETRY_DELAY)
        raise AssertionError("unreachable")

    def _send_request(self, request: FileTimerRequest) -> None:
        try:
            fd = self._open_non_blocking()
        except OSError as e:
            # upstream's wording (code may match it), plus the path
            raise BrokenPipeError(
                "Could not send the FileTimerRequest because FileTimerServer is not available "
                f"(cannot open {self._file_path!r}: {e.strerror})."
            ) from e
        try:
            line = request.to_json()
            # one write of at most PIPE_BUF bytes is atomic; a longer one could interleave with other workers'
            if len(line) + 1 > select.PIPE_BUF:  # + its newline: what is written must fit
                raise RuntimeError(f"FileTimerRequest larger than {select.PIPE_BUF} bytes is not supported: {line}")
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self._send_request(FileTimerRequest(os.getpid(), scope_id, expiration_time, int(self.signal)))

    def release(self, scope_id: str) -> None:
        self._send_request(FileTimerRequest(os.getpid(), scope_id, -1, 0))


class _FifoRequestQueue(RequestQueue):
    """Parses JSON lines from the server's FIFO fd."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._buffer = b""

    def size(self) -> int:
        return 1

    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        if self.fd is None:
            return []
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if ready:
            try:
                while chunk := os.read(self.fd, 65536):
                    self._buffer += chunk
            except BlockingIOError:
                pass
        *lines, self._buffer = self._buffer.split(b"\n")
        requests: list[TimerRequest] = []
        for line in lines:
            try:
                d = json.loads(line)
                requests.append(
                    FileTimerRequest(
                        int(d["pid"]), str(d["scope_id"]), float(d["expiration_time"]), int(d["signal"])
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring malformed timer request %r: %s", line[:200], e)
        return requests


class FileTimerServer(TimerServer):
    """Creates the FIFO ``file_path`` on ``start()`` and reaps workers whose timers expired.

    ``log_event(name, request)`` (optional) is called with ``"timer_expired"`` before a worker is signalled.
    """

    def __init__(
        self,
        file_path: str,
        run_id: str,
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Callable[[str, FileTimerRequest | None], None] | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        _check_interval(max_interval)
        if not isinstance(file_path, str) or not file_path:
            raise ValueError(f"file_path must be a non-empty path string, got {file_path!r}")
        self._fifo_queue = _FifoRequestQueue()
        super().__init__(self._fifo_queue, max_interval, daemon, clock=clock)
        self._file_path = file_path
        self._run_id = run_id
        self._log_event = log_event
        self._timers: dict[tuple[int, str], FileTimerRequest] = {}
        self._lock = threading.Lock()
        self._keepalive_fd: int | None = None
        self._owns_fifo = False  # only a FIFO this server created is removed by it
        self._last_progress_time = int(self._clock.time())

    def __del__(self) -> None:
        try:
            self._close_fifo()
        except Exception:
            pass

    def _open_fifo(self) -> None:
        try:
            st = os.lstat(self._file_path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISFIFO(st.st_mode):
                raise ValueError(f"FileTimerServer file_path {self._file_path!r} exists and is not a FIFO")
            os.unlink(self._file_path)  # a stale FIFO from a previous run
        os.mkfifo(self._file_path, 0o600)
        self._owns_fifo = True
        self._fifo_queue.fd = os.open(self._file_path, os.O_RDONLY | os.O_NONBLOCK)
        # our own writer end keeps the FIFO from reading EOF between clients
        self._keepalive_fd = os.open(self._file_path, os.O_WRONLY | os.O_NONBLOCK)

    def _close_fifo(self) -> None:
        for fd in (self._fifo_queue.fd, self._keepalive_fd):
            if fd is not None:
                os.close(fd)
        self._fifo_queue.fd = self._keepalive_fd = None
        if self._owns_fifo:
            self._owns_fifo = False
            try:
                if stat.S_ISFIFO(os.lstat(self._file_path).st_mode):
                    os.unlink(self._file_path)
            except FileNotFoundError:
                pass

    def start(self) -> None:
        if self._watchdog_thread is not None and self._watchdog_thread.is_alive():
            return  # already listening: a second start() is a no-op (upstream tolerates it too)
        logger.info("FileTimerServer run_id=%s listening on %s", self._run_id, self._file_path)
        self._open_fifo()
        super().start()

    def stop(self) -> None:
        super().stop()
        self._close_fifo()

    def run_once(self, wait: float = 0.0) -> list[Any]:
        reaped = super().run_once(wait)
        self._last_progress_time = int(self._clock.time())
        return reaped

    @staticmethod
    def is_process_running(pid: int) -> bool:
        return pid_exists(pid)

    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        with self._lock:
            for request in timer_requests:
                key = (request.worker_id, request.scope_id)
                if request.expiration_time < 0:
                    self._timers.pop(key, None)
                else:
                    self._timers[key] = request  # type: ignore[assignment]

    def clear_timers(self, worker_ids: set[Any]) -> None:
        with self._lock:
            for key in [k for k in self._timers if k[0] in worker_ids]:
                del self._timers[key]

    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        expired: dict[Any, list[TimerRequest]] = {}
        with self._lock:
            # timers of processes that exited on their own are dropped, never fired at a recycled pid
            for key in [k for k in self._timers if not self.is_process_running(k[0])]:
                del self._timers[key]
            for request in self._timers.values():
                if request.expiration_time <= deadline:
                    expired.setdefault(request.worker_id, []).append(request)
        return expired

    def expire_timer(self, worker_id: Any, scope_id: str | None = None) -> int:
        with self._lock:
            keys = [k for k in self._timers if k[0] == worker_id and (scope_id is None or k[1] == scope_id)]
            for key in keys:
                old = self._timers[key]
                self._timers[key] = FileTimerRequest(old.worker_id, old.scope_id, _FORCED, old.signal)
        return len(keys)

    def _reap_worker(self, worker_id: int) -> bool:
        now = self._clock.time()
        with self._lock:
            requests = [r for k, r in self._timers.items() if k[0] == worker_id]
        expired = sorted((r for r in requests if r.expiration_time <= now), key=lambda r: r.expiration_time)
        for request in expired or requests:
            if self._log_event is not None:
                try:
                    self._log_event("timer_expired", request)
                except Exception as e:
                    logger.warning("log_event callback failed: %s", e)
        # the signal of the earliest expired timer that has one > 0; FileTimerClient(signal=0 or < 0) documents that
        # the worker is not killed: its timers are then dropped (returning True clears them), as upstream
        sig = next((r.signal for r in expired or requests if getattr(r, "signal", 0) > 0), None)
        if sig is None:
            logger.info("timers of worker pid %s expired with no signal > 0; not reaping it", worker_id)
            return True
        try:
            os.kill(worker_id, sig)
        except ProcessLookupError:
            logger.info("worker pid %s already gone; nothing to reap", worker_id)
        except OSError:
            logger.exception("could not signal worker pid %s; will retry next interval", worker_id)
            return False
        return True

    def get_last_progress_time(self) -> int:
        """Wall time (``clock.time()`` s) of the watchdog's last completed iteration."""
        return self._last_progress_time
