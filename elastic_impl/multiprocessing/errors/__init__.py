"""Structured worker errors: the ``record`` decorator, ``ProcessFailure`` and ``ChildFailedError``.

The error file format is the one upstream torchelastic writes, so an agent of either implementation can read it:
``{"message": {"message": "<Type>: <msg>", "extraInfo": {"py_callstack": "...", "timestamp": "<int secs>"}}}``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar

from elastic_impl.multiprocessing.errors.error_handler import ErrorHandler
from elastic_impl.multiprocessing.errors.handlers import get_error_handler

__all__ = ["ChildFailedError", "ErrorHandler", "ProcessFailure", "get_error_handler", "record"]

_NOT_AVAILABLE = "<N/A>"
STDERR_TAIL_LINES = 20

# Why a worker most likely died of a given signal; shown next to the signal name.
_SIGNAL_CAUSES = {
    "SIGKILL": "killed: possibly the OOM killer or a timer reaper",
    "SIGSEGV": "segmentation fault: invalid memory access in native code (C/C++/CUDA extension)",
    "SIGABRT": "aborted: a native assertion or std::terminate in C/C++ code",
    "SIGBUS": "bus error: bad memory access (e.g. truncated mmap or /dev/shm full)",
    "SIGFPE": "floating point exception in native code",
    "SIGTERM": "terminated: asked to stop (by the agent, the scheduler or a user)",
    "SIGINT": "interrupted (Ctrl-C or a forwarded SIGINT)",
    "SIGHUP": "hang-up: the controlling terminal or session went away",
}

T = TypeVar("T")


def signal_cause(name: str) -> str:
    return _SIGNAL_CAUSES.get(name, "")


def _read_tail(path: str | None, lines: int = STDERR_TAIL_LINES) -> list[str]:
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]


@dataclass
class ProcessFailure:
    """What is known about one failed worker: exit code, error file contents and (our extension) its stderr tail."""

    local_rank: int
    pid: int
    exitcode: int
    error_file: str
    # Extension: the worker's redirected/teed stderr log; its last lines are kept in ``stderr_tail``.
    stderr_file: str | None = None
    error_file_data: dict = field(init=False, default_factory=dict)
    message: str = field(init=False, default="")
    timestamp: int = field(init=False, default=0)
    stderr_tail: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.error_file_data = {}
        if self.error_file and os.path.isfile(self.error_file):
            try:
                with open(self.error_file) as f:
                    self.error_file_data = json.load(f)
            except (OSError, ValueError) as e:
                self.message = f"unreadable error file {self.error_file}: {e}"
            else:
                self.message, self.timestamp = self._message_from_error_file(self.error_file_data)
        if not self.timestamp:
            self.timestamp = int(time.time())
        self.stderr_tail = _read_tail(self.stderr_file)
        if not self.message:
            if self.exitcode is not None and self.exitcode < 0:
                name = self.signal_name()
                cause = signal_cause(name)
                self.message = f"Signal {-self.exitcode} ({name}) received by PID {self.pid}" + (
                    f" ({cause})" if cause else ""
                )
            elif self.stderr_tail:
                self.message = self.stderr_tail[-1].strip()
            else:
                self.message = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"

    @staticmethod
    def _message_from_error_file(data: dict) -> tuple[str, int]:
        msg = data.get("message")
        timestamp = 0
        if isinstance(msg, dict):
            extra = msg.get("extraInfo") or {}
            try:
                timestamp = int(extra.get("timestamp") or 0)
            except (TypeError, ValueError):
                timestamp = 0
            text = str(msg.get("message", ""))
            callstack = extra.get("py_callstack")
            if callstack:
                text = str(callstack)
            return text, timestamp
        return ("" if msg is None else str(msg)), timestamp

    def signal_name(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return f"signal {-self.exitcode}"
        return _NOT_AVAILABLE

    def timestamp_isoformat(self) -> str:
        return datetime.fromtimestamp(self.timestamp).isoformat(sep="_")


class ChildFailedError(Exception):
    """Raised by the launcher when workers failed; the root cause is the earliest failure by timestamp."""

    def __init__(self, name: str, failures: dict[int, ProcessFailure]):
        self.name = name
        self.failures = failures
        if not failures:
            raise ValueError("ChildFailedError needs at least one failure, got an empty failures dict")
        super().__init__(self.format_msg())

    def get_first_failure(self) -> tuple[int, ProcessFailure]:
        rank = min(self.failures, key=lambda r: (self.failures[r].timestamp, r))
        return rank, self.failures[rank]

    def _format_failure(self, idx: int, rank: int, failure: ProcessFailure) -> str:
        if failure.error_file_data:
            error_file = failure.error_file
        elif failure.error_file:
            error_file = f"{failure.error_file} (not written by the worker; see its stderr below)"
        else:
            error_file = "none (run with @record to get a traceback)"
        lines = [
            f"[{idx}]:",
            f"  time      : {failure.timestamp_isoformat()}",
            f"  host      : {getattr(failure, 'host', None) or _hostname()}",  # a peer's failure names its host
            f"  rank      : {rank} (local_rank: {failure.local_rank})",
            f"  exitcode  : {failure.exitcode} (pid: {failure.pid})",
            f"  error_file: {error_file}",
        ]
        if failure.exitcode is not None and failure.exitcode < 0:
            lines.append(f"  signal    : {failure.signal_name()} {signal_cause(failure.signal_name())}".rstrip())
        msg_lines = failure.message.splitlines() or [""]
        lines.append(f"  message   : {msg_lines[0]}")
        lines.extend(f"    {m}" for m in msg_lines[1:])
        if failure.stderr_tail:
            lines.append(f"  stderr (last {len(failure.stderr_tail)} lines of {failure.stderr_file}):")
            lines.extend(f"    | {t}" for t in failure.stderr_tail)
        return "\n".join(lines)

    def format_msg(self, boarder_delim: str = "=", section_delim: str = "-") -> str:
        title = f"{self.name} FAILED"
        root_rank, root = self.get_first_failure()
        others = [(r, f) for r, f in sorted(self.failures.items()) if r != root_rank]
        parts = [boarder_delim * 60, title, section_delim * 60, "Failures:"]
        if others:
            parts.extend(self._format_failure(i + 1, r, f) for i, (r, f) in enumerate(others))
        else:
            parts.append("  <NO_OTHER_FAILURES>")
        parts += [section_delim * 60, "Root Cause (first observed failure):", self._format_failure(0, root_rank, root)]
        parts.append(boarder_delim * 60)
        return "\n".join(parts)


def _hostname() -> str:
    import socket

    return socket.getfqdn()


def record(fn: Callable[..., T] | None = None, error_handler: ErrorHandler | None = None) -> Callable[..., T]:
    """Decorate a worker's main so an uncaught exception is written to ``TORCHELASTIC_ERROR_FILE`` and re-raised."""

    if fn is None:
        return lambda f: record(f, error_handler)  # type: ignore[return-value]
    handler = error_handler or get_error_handler()

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        handler.initialize()
        try:
            return fn(*args, **kwargs)
        except SystemExit as se:
            # A clean sys.exit(0/None) is not a failure; any other code is reported like an exception.
            if se.code in (None, 0):
                raise
            handler.record_exception(se)
            raise
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            if failure.error_file != _NOT_AVAILABLE and failure.error_file_data:
                handler.dump_error_file(failure.error_file, failure.exitcode)
            else:
                handler.record_exception(e)
            raise
        except BaseException as e:
            handler.record_exception(e)
            raise

    return wrapper
