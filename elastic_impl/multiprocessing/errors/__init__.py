"""Structured worker errors: the ``record`` decorator, ``ProcessFailure`` and ``ChildFailedError``.

The error file format is the one upstream torchelastic writes, so an agent of either implementation can read it:
``{"message": {"message": "<Type>: <msg>", "extraInfo": {"py_callstack": "...", "timestamp": "<int secs>"}}}``.
"""

from __future__ import annotations

import json
import logging
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
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here

__all__ = ["ChildFailedError", "ErrorHandler", "ProcessFailure", "get_error_handler", "record"]

# A decoded error file (upstream's name for the type).
JSON = dict[str, Any]

logger = logging.getLogger(__name__)

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


_EMPTY_ERROR_DATA_MESSAGE = "<NONE>"
# What upstream puts in ``message`` when a worker exited with a code and left no error file; code may compare to it.
_NO_ERROR_FILE_MESSAGE = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


class _NotAnErrorRecord(ValueError):
    """An error file whose JSON is not the layout ErrorHandler writes."""


def _parse_error_record(data: Any) -> tuple[str, int | None]:
    """(message, timestamp) of an error file's JSON; timestamp None when the record has none."""
    if not isinstance(data, dict):
        raise _NotAnErrorRecord(f"the JSON is {type(data).__name__}, not an object")
    if "message" not in data:
        raise _NotAnErrorRecord("it has no 'message' field")
    message = data["message"]
    if isinstance(message, str):
        # the flat layout: {"message": "...", "timestamp": <int or int string>}
        raw = data.get("timestamp", 0)
    elif isinstance(message, dict):
        extra = message.get("extraInfo", {})
        if not isinstance(extra, dict):
            raise _NotAnErrorRecord(f"'message.extraInfo' is {type(extra).__name__}, not an object")
        raw = extra.get("timestamp")
        callstack = extra.get("py_callstack")
        message = str(callstack) if callstack else str(message.get("message", ""))
    else:
        raise _NotAnErrorRecord(f"'message' is {type(message).__name__}, neither a string nor an object")
    if raw is None:
        return message, None
    try:
        return message, int(raw)
    except (TypeError, ValueError):
        raise _NotAnErrorRecord(f"its timestamp {raw!r} is not an integer") from None


@dataclass
class ProcessFailure:
    """What is known about one failed worker: exit code, error file contents and (our extension) its stderr tail.

    The attributes hold what upstream's hold (``error_file`` is ``"<N/A>"`` when the worker wrote none, ``message``
    is the error file's message, ``Signal N (NAME) received by PID P`` or upstream's pointer text); the richer
    explanation (likely cause of a signal, the worker's last stderr lines) is in ``ChildFailedError.format_msg()``.
    An error file that is not an error record never raises: ``message`` names the file and what is wrong with it.
    """

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
        # The report names the file the worker was asked to write even after error_file became "<N/A>".
        self.expected_error_file = self.error_file
        self.stderr_tail = _read_tail(self.stderr_file)
        if self.error_file and os.path.isfile(self.error_file):
            self._read_error_file()
        else:
            self.error_file = _NOT_AVAILABLE
            self.error_file_data = {"message": _EMPTY_ERROR_DATA_MESSAGE}
            self.message = ""
            self.timestamp = int(time.time())
        if not self.message:
            if self.exitcode is not None and self.exitcode < 0:
                self.message = f"Signal {-self.exitcode} ({self.signal_name()}) received by PID {self.pid}"
            else:
                self.error_file_data["errorTraits"] = {"category": "system_terminated_error", "retryability": "False"}
                self.message = _NO_ERROR_FILE_MESSAGE

    def _read_error_file(self) -> None:
        data: Any = None
        try:
            with open(self.error_file) as f:
                data = json.load(f)
            self.message, timestamp = _parse_error_record(data)
        except (OSError, ValueError) as e:  # _NotAnErrorRecord and JSONDecodeError are ValueErrors
            self.error_file_data = data if isinstance(data, dict) else {"message": _EMPTY_ERROR_DATA_MESSAGE}
            self.message = f"error file {self.error_file} is not a torchelastic error record: {e}"
            self.timestamp = int(time.time())
            return
        self.error_file_data = data
        self.timestamp = int(time.time()) if timestamp is None else timestamp

    def signal_name(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return _NOT_AVAILABLE
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
        expected = getattr(failure, "expected_error_file", "")
        if failure.error_file and failure.error_file != _NOT_AVAILABLE:
            error_file = failure.error_file
        elif expected and expected != _NOT_AVAILABLE:
            error_file = f"{expected} (not written by the worker; see its stderr below)"
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
            name = failure.signal_name()
            name = f"signal {-failure.exitcode}" if name == _NOT_AVAILABLE else name
            lines.append(f"  signal    : {name} {signal_cause(name)}".rstrip())
        msg_lines = _report_message(failure).splitlines() or [""]
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


def _report_message(failure: ProcessFailure) -> str:
    """The message line of the report: upstream's pointer text is replaced by the worker's last stderr line."""
    message = failure.message
    if isinstance(message, dict):  # upstream's ProcessFailure keeps the error record's message object
        extra = message.get("extraInfo")
        message = (extra.get("py_callstack") if isinstance(extra, dict) else None) or message.get("message", "")
    message = str(message)
    if message == _NO_ERROR_FILE_MESSAGE and failure.stderr_tail:
        return failure.stderr_tail[-1].strip()
    return message


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
            # As upstream: sys.exit(0) ends the decorated function as a normal return; any other exit (None
            # included) propagates, and an exit is never an error record: it carries its own code.
            if se.code == 0:
                return None  # type: ignore[return-value]
            raise
        except ChildFailedError as e:
            # The root cause travels up as the child's own record; the ChildFailedError itself is never recorded.
            rank, failure = e.get_first_failure()
            if failure.error_file != _NOT_AVAILABLE:
                handler.dump_error_file(failure.error_file, failure.exitcode)
            else:
                logger.info("local_rank %s failed without an error file; decorate its entrypoint with @record", rank)
            raise
        except Exception as e:
            # Only exceptions: KeyboardInterrupt and other BaseExceptions are stops, not errors (as upstream).
            handler.record_exception(e)
            raise

    return wrapper
