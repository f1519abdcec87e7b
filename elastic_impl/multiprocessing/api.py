"""Start, watch and stop a group of worker processes (function or binary entrypoints)."""

from __future__ import annotations

import abc
import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import IntFlag
from types import FrameType
from typing import Any, Union

from elastic_impl.multiprocessing.errors import ProcessFailure, record
from elastic_impl.multiprocessing.redirects import redirect_stderr, redirect_stdout  # noqa: F401 -- upstream exposes them here
from elastic_impl.multiprocessing.subprocess_handler import SubprocessHandler, get_subprocess_handler
from elastic_impl.multiprocessing.tail_log import TailLog
from elastic_impl.utils.clock import REAL_CLOCK, Clock
from elastic_impl.utils.proc_tree import descendants, is_alive, pids_with_env, process_table, read_stat
from elastic_impl.utils.process_state import read_proc_state

logger = logging.getLogger(__name__)

IS_WINDOWS = sys.platform == "win32"
IS_MACOS = sys.platform == "darwin"
IS_LINUX = sys.platform.startswith("linux")

DEFAULT_SHUTDOWN_GRACE_S = 30.0
# How long a stop keeps sending SIGKILL to what outlived its grace before giving up on it (see PContext._kill_tree).
SIGKILL_WAIT = 10.0

# Which signals stop the workers and end the agent's run (torchrun's --signals-to-handle sets it for the agent).
SIGNALS_TO_HANDLE_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"
DEFAULT_SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
# Signals no process can catch: naming one is a mistake, not a request.
_UNCATCHABLE_SIGNALS = frozenset({"SIGKILL", "SIGSTOP"})

__all__ = [
    "DefaultLogsSpecs", "LogsDest", "LogsSpecs", "MultiprocessContext", "PContext", "RunProcsResult",
    "SignalException", "Std", "SubprocessContext", "to_map", "start_processes", "get_std_cm",
]


def get_std_cm(std_rd: str, redirect_fn: Callable[[str], AbstractContextManager]) -> AbstractContextManager:
    """``redirect_fn(std_rd)``, or a do-nothing context when there is no file (``std_rd`` empty) or the platform
    cannot redirect a file descriptor (Windows, macOS)."""
    if IS_WINDOWS or IS_MACOS or not std_rd:
        return nullcontext()
    return redirect_fn(std_rd)


class SignalException(Exception):
    """Raised (by the launcher's handlers) when the agent itself receives a termination signal."""

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval


def parse_signals_to_handle(names: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` -> the signals; ValueError naming a name that is not a catchable signal here."""
    catchable = sorted(s.name for s in signal.Signals if s.name not in _UNCATCHABLE_SIGNALS)
    out: list[signal.Signals] = []
    for name in str(names).split(","):
        name = name.strip()
        if name not in catchable:
            raise ValueError(f"bad signal {name!r} in {names!r}: expected comma-separated names of catchable "
                             f"signals ({', '.join(catchable)})")
        if signal.Signals[name] not in out:
            out.append(signal.Signals[name])
    return tuple(out)


def signals_to_handle_from_env() -> tuple[signal.Signals, ...]:
    """The signals named by ``TORCHELASTIC_SIGNALS_TO_HANDLE`` (default: SIGTERM, SIGINT, SIGHUP, SIGQUIT).

    A name that is not a catchable signal is skipped with a warning, as upstream does (the launcher rejects it
    before it gets here).
    """
    names = os.environ.get(SIGNALS_TO_HANDLE_ENV, DEFAULT_SIGNALS_TO_HANDLE)
    out: list[signal.Signals] = []
    for name in names.split(","):
        try:
            out.extend(s for s in parse_signals_to_handle(name) if s not in out)
        except ValueError:
            logger.warning("%s=%r: %r is not a catchable signal; not handled", SIGNALS_TO_HANDLE_ENV, names,
                           name.strip())
    return tuple(out)


def _terminate_process_handler(signum: int, frame: FrameType | None) -> None:
    sigval = signal.Signals(signum)
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)


class Std(IntFlag):
    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR

    @classmethod
    def from_str(cls, vm: str) -> Union[Std, dict[int, Std]]:
        """``"0".."3"`` -> Std; ``"0:3,1:0"`` -> {local_rank: Std}."""

        def to_std(v: str) -> Std:
            try:
                s = Std(int(v))
            except ValueError:
                raise ValueError(
                    f"bad Std value {vm!r}: expected 0-3 (0=NONE,1=OUT,2=ERR,3=ALL) or 'local_rank:value,...'"
                ) from None
            if s not in cls:
                raise ValueError(f"bad Std value {vm!r}: expected 0-3")
            return s

        if not isinstance(vm, str):
            raise ValueError(f"bad Std value {vm!r}: expected a string like '3' or '0:3,1:0'")
        if re.fullmatch(r"\s*[0-3]\s*", vm):
            return to_std(vm.strip())
        if re.fullmatch(r"\s*\d+\s*:\s*[0-3]\s*(,\s*\d+\s*:\s*[0-3]\s*)*", vm):
            out: dict[int, Std] = {}
            for item in vm.split(","):
                rank, val = item.split(":")
                out[int(rank)] = to_std(val.strip())
            return out
        raise ValueError(f"bad Std value {vm!r}: expected 0-3 (0=NONE,1=OUT,2=ERR,3=ALL) or 'local_rank:value,...'")


def to_map(val_or_map: Union[Std, dict[int, Std]], local_world_size: int) -> dict[int, Std]:
    """Expand one Std to every local rank, or fill a partial map with Std.NONE."""
    if isinstance(val_or_map, Std):
        return dict.fromkeys(range(local_world_size), val_or_map)
    if not isinstance(val_or_map, dict):
        raise ValueError(f"bad Std value {val_or_map!r}: expected a Std or a dict of local_rank -> Std")
    return {r: Std(val_or_map.get(r, Std.NONE)) for r in range(local_world_size)}


@dataclass
class LogsDest:
    """Where each local rank's stdout/stderr/error file goes, and which of them are teed to the console."""

    stdouts: dict[int, str] = field(default_factory=dict)
    stderrs: dict[int, str] = field(default_factory=dict)
    tee_stdouts: dict[int, str] = field(default_factory=dict)
    tee_stderrs: dict[int, str] = field(default_factory=dict)
    error_files: dict[int, str] = field(default_factory=dict)
    filtered_stdout: str = field(default_factory=str)
    filtered_stderr: str = field(default_factory=str)


class LogsSpecs(abc.ABC):
    def __init__(
        self,
        log_dir: str | None = None,
        redirects: Union[Std, dict[int, Std]] = Std.NONE,
        tee: Union[Std, dict[int, Std]] = Std.NONE,
        local_ranks_filter: set[int] | None = None,
    ) -> None:
        for what, val in (("redirects", redirects), ("tee", tee)):
            if not isinstance(val, (Std, dict)):
                raise ValueError(f"bad {what} value {val!r}: expected a Std or a dict of local_rank -> Std")
        self._root_log_dir = log_dir
        self._redirects = redirects
        self._tee = tee
        self._local_ranks_filter = local_ranks_filter

    @abc.abstractmethod
    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest: ...

    @property
    @abc.abstractmethod
    def root_log_dir(self) -> str: ...


def _new_attempt_dir(run_log_dir: str, restart: str) -> str:
    """A folder no earlier start of the workers used: ``attempt_<restart>``, else ``attempt_<restart>.<n>``.

    A membership change re-forms the group without using a restart, so the restart count repeats; upstream then
    deletes the previous start's logs and error files. Ours never deletes what a worker wrote.
    """
    base = os.path.join(run_log_dir, f"attempt_{restart}")
    path, n = base, 0
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}.{n}"


class LogDirNotADirectoryError(NotADirectoryError, ValueError):
    """log_dir names a file: NotADirectoryError as upstream, and a ValueError as this package always raised."""


class DefaultLogsSpecs(LogsSpecs):
    """Logs under ``<log_dir>/<run_id>_<unique>/attempt_<restart_count>[.<n>]/<local_rank>/`` (stdout.log,
    stderr.log, error.json): one folder per run, and a new attempt folder for every start of the worker group."""

    def __init__(
        self,
        log_dir: str | None = None,
        redirects: Union[Std, dict[int, Std]] = Std.NONE,
        tee: Union[Std, dict[int, Std]] = Std.NONE,
        local_ranks_filter: set[int] | None = None,
    ) -> None:
        if log_dir != os.devnull:
            if not log_dir:  # None or "": a fresh temporary folder, as upstream
                log_dir = tempfile.mkdtemp(prefix="torchelastic_")
            elif os.path.isfile(log_dir):  # upstream's wording: tests match it
                raise LogDirNotADirectoryError(f"log_dir: {log_dir} is a file")
            elif os.path.exists(log_dir) and not os.path.isdir(log_dir):
                raise LogDirNotADirectoryError(f"bad log_dir {log_dir!r}: exists and is not a directory")
            else:
                os.makedirs(log_dir, exist_ok=True)
        super().__init__(log_dir, redirects, tee, local_ranks_filter)
        self._run_log_dir: str | None = None  # made on the first reify, when the run id is known

    @property
    def root_log_dir(self) -> str:
        return str(self._root_log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Every rank's files; also sets each rank's ``TORCHELASTIC_ERROR_FILE`` in ``envs`` (as upstream).

        ``stdouts``/``stderrs`` name every rank: ``""`` where the stream is not redirected (it goes to the console).
        """
        nprocs = len(envs)
        if nprocs == 0:
            logger.warning("reify() of %r with no local ranks (empty envs)", self)
        first = envs[min(envs)] if envs else {}
        run_id = first.get("TORCHELASTIC_RUN_ID", "test_run_id")  # upstream's default when the agent set none
        restart = first.get("TORCHELASTIC_RESTART_COUNT", "0")
        if self._root_log_dir == os.devnull:
            attempt_log_dir = os.devnull
        else:
            if self._run_log_dir is None:
                # One folder per run of the launcher (as torchrun does): a rerun with the same run id and log dir
                # must not write over, or delete, what the previous run's workers wrote.
                safe_run_id = run_id.replace(os.sep, "_") or "none"
                self._run_log_dir = tempfile.mkdtemp(prefix=f"{safe_run_id}_", dir=str(self._root_log_dir))
            attempt_log_dir = _new_attempt_dir(self._run_log_dir, restart)
        redirs = to_map(self._redirects, nprocs)
        ts = to_map(self._tee, nprocs)
        dest = LogsDest()
        if attempt_log_dir != os.devnull:
            dest.filtered_stdout = os.path.join(attempt_log_dir, "filtered_stdout.log")
            dest.filtered_stderr = os.path.join(attempt_log_dir, "filtered_stderr.log")
        console = ""  # a stream that is not redirected goes to the console
        dest.stdouts = dict.fromkeys(range(nprocs), console)
        dest.stderrs = dict.fromkeys(range(nprocs), console)
        for local_rank, tee_std in ts.items():
            redirect_std = redirs[local_rank] | tee_std  # teeing needs the file to tail
            if attempt_log_dir == os.devnull:
                dest.error_files[local_rank] = ""
                if local_rank in envs:
                    envs[local_rank]["TORCHELASTIC_ERROR_FILE"] = ""
                continue
            clogdir = os.path.join(attempt_log_dir, str(local_rank))
            os.makedirs(clogdir, exist_ok=True)
            dest.error_files[local_rank] = os.path.join(clogdir, "error.json")
            if local_rank in envs:  # the worker's @record writes here (upstream's reify sets it the same way)
                envs[local_rank]["TORCHELASTIC_ERROR_FILE"] = dest.error_files[local_rank]
            if redirect_std & Std.OUT == Std.OUT:
                dest.stdouts[local_rank] = os.path.join(clogdir, "stdout.log")
            if redirect_std & Std.ERR == Std.ERR:
                dest.stderrs[local_rank] = os.path.join(clogdir, "stderr.log")
            if not self._local_ranks_filter or local_rank in self._local_ranks_filter:
                if tee_std & Std.OUT == Std.OUT:
                    dest.tee_stdouts[local_rank] = dest.stdouts[local_rank]
                if tee_std & Std.ERR == Std.ERR:
                    dest.tee_stderrs[local_rank] = dest.stderrs[local_rank]
            else:
                # A filtered-out rank stays off the console: what is not written to a log file goes nowhere (as
                # torchrun). An empty filter filters nothing, as upstream.
                if dest.stdouts[local_rank] == console:
                    dest.stdouts[local_rank] = os.devnull
                if dest.stderrs[local_rank] == console:
                    dest.stderrs[local_rank] = os.devnull
        logger.info("log directory for this attempt: %s", attempt_log_dir)
        return dest

    def __repr__(self) -> str:
        return (f"DefaultLogsSpecs(root_log_dir={self._root_log_dir}, redirects={self._redirects}, "
                f"tee={self._tee}, local_ranks_filter={self._local_ranks_filter})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DefaultLogsSpecs):
            return False
        return (self._root_log_dir, self._redirects, self._tee, self._local_ranks_filter) == (
            other._root_log_dir, other._redirects, other._tee, other._local_ranks_filter)


@dataclass
class RunProcsResult:
    """Outcome of a finished group: return values (function entrypoints only) or failures, by local rank."""

    return_values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, ProcessFailure] = field(default_factory=dict)
    stdouts: dict[int, str] = field(default_factory=dict)
    stderrs: dict[int, str] = field(default_factory=dict)

    def is_failed(self) -> bool:
        return len(self.failures) > 0


# --------------------------------------------------------------------------------------------- process tree helpers
_PR_SET_CHILD_SUBREAPER = 36

# Every worker (and so everything it starts, unless it wipes its environment) carries its group's mark: a daemon
# that double-forked into a session of its own is neither a descendant of a worker nor in a worker's session, but
# it is still found by its mark when the group is stopped.
WORKER_GROUP_MARK_ENV = "ELASTIC_IMPL_WORKER_GROUP"


_process_token: tuple[int, str] | None = None  # (pid, token): a forked child makes its own


def _mark_prefix() -> str:
    """``<pid>.<token>.``: what every group mark of this process starts with (the guardian sweeps by it)."""
    global _process_token
    if _process_token is None or _process_token[0] != os.getpid():
        _process_token = (os.getpid(), uuid.uuid4().hex[:12])
    return f"{_process_token[0]}.{_process_token[1]}."


def _new_group_mark() -> str:
    return _mark_prefix() + uuid.uuid4().hex[:8]


# The guardian of this process (see _guardian.py): stops the marked processes its workers leave once it is gone.
_guardian: tuple[int, subprocess.Popen] | None = None
_guardian_lock = threading.Lock()
GUARDIAN_EXIT_WAIT_S = 5.0


def _ensure_guardian() -> None:
    """Start this process's guardian once (Linux): if the agent is SIGKILLed, its workers' double-forked daemons
    (no parent-death signal reaches them) and workers started from other threads are still stopped."""
    global _guardian
    if not IS_LINUX:
        return
    with _guardian_lock:
        if _guardian is not None and _guardian[0] == os.getpid() and _guardian[1].poll() is None:
            return
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_guardian.py")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", script, str(os.getpid()), _mark_prefix()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                start_new_session=True,  # not stopped with the agent's process group or session
            )
        except (OSError, ValueError) as e:  # not fatal: the agent still stops its groups itself while it lives
            logger.warning("could not start the guardian that stops workers' daemons if this agent is killed: %s", e)
            return
        first = _guardian is None
        _guardian = (os.getpid(), proc)
    if first:
        atexit.register(_stop_guardian)


def guardian_pid() -> int | None:
    """The pid of this process's guardian while it runs (None: none started, or it ended)."""
    if _guardian is None or _guardian[0] != os.getpid() or _guardian[1].poll() is not None:
        return None
    return _guardian[1].pid


def _stop_guardian() -> None:
    """At a normal exit: the guardian sweeps what is left of this process's groups now, and the exit waits for it,
    so that no pipe of ours (its stderr) stays open after we are gone."""
    if _guardian is None or _guardian[0] != os.getpid():
        return
    proc = _guardian[1]
    try:
        proc.terminate()
        proc.wait(GUARDIAN_EXIT_WAIT_S)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _become_subreaper() -> None:
    """Orphaned grandchildren re-parent to us (not init), so we can still see and reap them (Linux only)."""
    if not IS_LINUX:
        return
    try:
        from elastic_impl.multiprocessing.redirects import libc

        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception as e:  # not fatal: sessions still reach most grandchildren
        logger.debug("PR_SET_CHILD_SUBREAPER unavailable: %s", e)


def _start_time(pid: int) -> str | None:
    stat = read_stat(pid)
    return stat.start_time if stat is not None else None


def _group_members(roots: set[int]) -> set[int]:
    """Live descendants of ``roots`` plus every process in their sessions (which catches re-parented orphans)."""
    table = process_table()
    members = {p for p, stat in table.items() if stat.session in roots}
    members |= {r for r in roots if r in table}
    return members | set(descendants(members, table))


def _signal_all(pgids: set[int], pids: set[int], sig: int) -> None:
    for pg in pgids:
        try:
            os.killpg(pg, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(pids: set[int]) -> None:
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass
        except OSError:
            pass


def _wait_any_exit(pids: set[int], timeout: float, clock: Clock) -> None:
    """Block until one of ``pids`` exits or ``timeout`` passes: on exit events (pidfd) where Linux has them."""
    fds = []
    try:
        if hasattr(os, "pidfd_open"):
            for p in pids:
                try:
                    fds.append(os.pidfd_open(p))
                except OSError:  # gone already, or not ours to watch: the caller's next check sees it
                    pass
        if fds and len(fds) == len(pids):
            select.select(fds, [], [], timeout)
        else:
            clock.sleep(timeout)
    finally:
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------- contexts
class PContext(abc.ABC):
    """A group of worker processes, one per local rank, started together and stopped together."""

    def __init__(
        self,
        name: str,
        entrypoint: Union[Callable, str],
        args: dict[int, tuple],
        envs: dict[int, dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
        clock: Clock = REAL_CLOCK,
    ):
        self.name = name
        if set(args) != set(envs):
            raise ValueError(
                f"bad args/envs: local ranks differ (args has {sorted(args)}, envs has {sorted(envs)}); "
                "both need one entry per local rank"
            )
        nprocs = len(args)
        if nprocs == 0:
            raise ValueError("bad args: empty; need one entry per local rank")
        logs_dest = logs_specs.reify(envs)
        self.entrypoint = entrypoint
        self.args = args
        self.envs = envs
        self.stdouts = logs_dest.stdouts
        self.stderrs = logs_dest.stderrs
        self.error_files = logs_dest.error_files
        self.nprocs = nprocs
        self.clock = clock
        self._tail_logs = [
            TailLog(name, logs_dest.tee_stdouts, sys.stdout, log_line_prefixes),
            TailLog(name, logs_dest.tee_stderrs, sys.stderr, log_line_prefixes),
        ]
        # --duplicate-std*-filters: the teed lines holding any of the filter strings, of every teed rank, also go
        # to one file per stream in the attempt's log folder.
        self._filtered_files: list[Any] = []
        for filters, tee_files, path in (
            (duplicate_stdout_filters, logs_dest.tee_stdouts, logs_dest.filtered_stdout),
            (duplicate_stderr_filters, logs_dest.tee_stderrs, logs_dest.filtered_stderr),
        ):
            if not filters:
                continue
            if not path:
                raise ValueError(f"bad logs_specs {logs_specs!r}: duplicate filters {filters!r} need a file for the "
                                 "filtered lines, but its reify() names none (LogsDest.filtered_stdout/stderr)")
            dst = open(path, "w", errors="replace", buffering=1)  # noqa: SIM115 -- closed in close()
            self._filtered_files.append(dst)
            self._tail_logs.append(TailLog(name, tee_files, dst, log_line_prefixes,
                                           log_line_filter=_holds_any_of(list(filters))))
        self._previous_signal_handlers: dict[signal.Signals, Any] = {}
        self._closed = False
        self._group_mark = _new_group_mark()  # see WORKER_GROUP_MARK_ENV
        self._grace_cut = threading.Event()  # see cut_grace_short
        self._seen: dict[int, str] = {}  # pid -> /proc start time of every group member observed
        self._result: RunProcsResult | None = None  # terminal result, kept so later polls do not re-close
        # SIGTERM->SIGKILL grace when a failure makes the poll stop the surviving workers (an agent sets its own).
        self.failure_close_timeout: float = 30

    def start(self) -> None:
        # Only the main thread may install signal handlers; elsewhere the caller handles signals itself.
        if not IS_WINDOWS and threading.current_thread() is threading.main_thread():
            for sig in signals_to_handle_from_env():
                previous = signal.signal(sig, _terminate_process_handler)
                self._previous_signal_handlers.setdefault(sig, previous)
        _become_subreaper()
        _ensure_guardian()
        self._start()
        for tail in self._tail_logs:
            tail.start()

    def _restore_signal_handlers(self) -> None:
        """Put back the handlers ``start`` replaced, so that after ``close`` a signal does what it did before (a
        SIGTERM to a program that ran workers in-process stops it again). A handler someone installed after ours
        stays."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; the handlers stay until the main thread's close
        for sig, previous in self._previous_signal_handlers.items():
            if signal.getsignal(sig) is _terminate_process_handler and previous is not None:
                signal.signal(sig, previous)
        self._previous_signal_handlers.clear()

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _poll(self) -> RunProcsResult | None: ...

    def _wait_for_exit(self, timeout: float) -> None:
        """Block until a worker the last check saw running exits, or ``timeout`` passed.

        Waiting on the last check's view, not on a fresh one, matters: a worker that exits between ``_poll`` and
        here must wake us at once (its exit event is already pending), not be filtered out as "already exited"
        and leave us sleeping the whole period. This default just sleeps: it is not abstract, so a subclass written
        for upstream's PContext (``_start``, ``_poll``, ``pids``, ``_close``) works unchanged.
        """
        self.clock.sleep(timeout)

    def wait(self, timeout: float = -1, period: float = 1) -> RunProcsResult | None:
        """Result once all workers finished or one failed; None if still running after ``timeout`` (-1: forever)."""
        if IS_LINUX and self._result is None:
            self._remember_members()
        if timeout == 0:
            return self._poll()
        if timeout < 0:
            timeout = sys.maxsize
        expiry = self.clock.monotonic() + timeout
        while True:
            pr = self._poll()
            if pr:
                return pr
            remaining = expiry - self.clock.monotonic()
            if remaining <= 0:
                return None
            # An exit wakes us at once; ``period`` only bounds how long we sleep without any event.
            self._wait_for_exit(min(period, remaining))

    @abc.abstractmethod
    def pids(self) -> dict[int, int]: ...

    @abc.abstractmethod
    def _close(self, death_sig: signal.Signals, timeout: float = 30) -> None: ...

    def close(self, death_sig: signal.Signals | None = None, timeout: int = 30) -> None:
        """Stop every worker and all their descendants: ``death_sig`` (SIGTERM) then SIGKILL after ``timeout``."""
        if not death_sig:
            death_sig = signal.SIGTERM
        self._close(death_sig=death_sig, timeout=timeout)
        if not self._closed:
            self._closed = True
            for tail in self._tail_logs:
                tail.stop()
            for f in self._filtered_files:
                f.close()
        self._restore_signal_handlers()

    def cut_grace_short(self) -> None:
        """End the grace of a stop (now or to come): what is still alive gets SIGKILL at once. Only sets an event,
        so a signal handler may call it (the agent does, on a second termination signal)."""
        self._grace_cut.set()

    def _remember_members(self) -> None:
        """Note every process in the group (with its start time) so one that later leaves the tree is still found."""
        roots = set(self.pids().values())
        for p in _group_members(roots) - set(self._seen):
            start = _start_time(p)
            if start is not None:
                self._seen[p] = start

    def _still_ours(self) -> set[int]:
        # The start time guards against killing an unrelated process that reused a remembered pid.
        return {p for p, start in self._seen.items() if _start_time(p) == start}

    def _members_now(self, roots: set[int]) -> set[int]:
        """Every process of the group now: the workers' trees and sessions, and whatever carries the group's mark
        (a double-forked daemon re-parented to this agent, or to init) with its own descendants."""
        return _group_members(roots | set(pids_with_env(WORKER_GROUP_MARK_ENV, self._group_mark)))

    def _reap_workers(self) -> None:
        """Collect the exit status of workers that exited, through their own process objects (Popen/Process).

        The workers themselves are never reaped with a bare ``waitpid``: their Popen/Process would then never see
        the status (Popen reports exit code 0, a multiprocessing Process stays "alive" with no exit code forever).
        """
        return None  # the base has no process objects; the contexts override it

    def _kill_tree(self, roots: set[int], death_sig: int, timeout: float) -> None:
        self._remember_members()
        members = self._members_now(roots) | self._still_ours()
        _signal_all(roots, members, death_sig)
        deadline = self.clock.monotonic() + timeout
        while True:
            members |= self._members_now(roots)
            self._reap_workers()
            _reap(members - roots)
            live = {p for p in members if is_alive(p)}
            if not live or self.clock.monotonic() >= deadline or self._grace_cut.is_set():
                break
            _wait_any_exit(live, 0.05, self.clock)
        if live:
            if self._grace_cut.is_set() and self.clock.monotonic() < deadline:
                logger.warning("[%s] %d processes still alive after %s; the grace was cut short: sending SIGKILL",
                               self.name, len(live), signal.Signals(death_sig).name)
            else:
                logger.warning("[%s] %d processes ignored %s for %.1fs; sending SIGKILL", self.name, len(live),
                               signal.Signals(death_sig).name, timeout)
            # Bounded: a process in uninterruptible kernel sleep (a hung driver or NFS mount) does not die of SIGKILL
            # until the kernel lets go of it, and an agent blocked here would never report the failure or leave.
            kill_deadline = self.clock.monotonic() + SIGKILL_WAIT
            while live and self.clock.monotonic() < kill_deadline:
                _signal_all(roots, live | self._members_now(roots), signal.SIGKILL)
                self._reap_workers()
                _reap(members - roots)
                self.clock.sleep(0.01)
                members |= self._members_now(roots)
                live = {p for p in members if is_alive(p)}
                self._reap_workers()
                _reap(live - roots)
            if live:
                states = ", ".join(f"{pid} ({read_proc_state(pid) or '?'})" for pid in sorted(live))
                logger.error("[%s] %d processes survived SIGKILL for %.0fs (pid (state): %s); D means stuck in the "
                             "kernel: they end when it lets go of them", self.name, len(live), SIGKILL_WAIT, states)

    def _failure(self, local_rank: int, pid: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=local_rank, pid=pid, exitcode=exitcode,
                              error_file=self.error_files.get(local_rank, ""),
                              stderr_file=self.stderrs.get(local_rank))


def _parent_to_die_with() -> int | None:
    """This process's pid, if workers started now may die with it.

    Linux's parent-death signal fires when the *thread* that started the child ends, not the process: only a
    start from the main thread (the agent's loop) may use it, or a worker would die with a short-lived thread.
    """
    if not IS_LINUX or threading.current_thread() is not threading.main_thread():
        return None
    return os.getpid()


def _holds_any_of(needles: list[str]) -> Callable[[str], bool]:
    return lambda line: any(needle in line for needle in needles)


def _bound_to_numa(fn: Callable, numa_options: Any, local_rank: int) -> Callable:
    """``fn`` that first binds this worker to the CPUs near its GPU: in the worker, so that CUDA is never
    initialised in the agent (a forked worker could not use it then), and under @record, so a binding error is the
    worker's reported failure."""
    if numa_options is None:
        return fn

    def bound(*args: Any) -> Any:
        from elastic_impl.multiprocessing.numa_binding import bind_this_process, worker_cpus

        cpus = worker_cpus(numa_options, local_rank)
        if cpus:
            bind_this_process(cpus)
        return fn(*args)

    return bound


def _wrap(local_rank: int, fn: Callable, args: tuple, env: dict[str, str], stdout: str | None,
          stderr: str | None, ret_file: str, error_file: str, die_with: int | None = None,
          numa_options: Any = None) -> None:
    """Runs in the worker: own session, env, redirects; result pickled to ``ret_file`` for the parent."""
    if die_with is not None:
        from elastic_impl.multiprocessing.subprocess_handler.subprocess_handler import die_with_parent

        die_with_parent(die_with)
    if not IS_WINDOWS:
        try:
            os.setsid()
        except OSError:
            pass
    os.environ.update(env)
    if error_file:
        os.environ["TORCHELASTIC_ERROR_FILE"] = error_file
    for path, fd, stream in ((stdout, 1, sys.stdout), (stderr, 2, sys.stderr)):
        if path:
            stream.flush()
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(f, fd)
            os.close(f)
    try:
        ret = record(_bound_to_numa(fn, numa_options, local_rank))(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    with open(ret_file + ".tmp", "wb") as fh:
        pickle.dump(ret, fh)
    os.replace(ret_file + ".tmp", ret_file)


class MultiprocessContext(PContext):
    """Workers running a Python function through ``multiprocessing`` (spawn/fork/forkserver)."""

    def __init__(
        self,
        name: str,
        entrypoint: Callable,
        args: dict[int, tuple],
        envs: dict[int, dict[str, str]],
        start_method: str,
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        numa_options: Any | None = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
        clock: Clock = REAL_CLOCK,
    ):
        allowed = mp.get_all_start_methods()
        if start_method not in allowed:
            raise ValueError(f"bad start_method {start_method!r}: expected one of {allowed}")
        _check_numa_options(numa_options)
        super().__init__(name, entrypoint, args, envs, logs_specs, log_line_prefixes, duplicate_stdout_filters,
                         duplicate_stderr_filters, clock=clock)
        self.start_method = start_method
        self._numa_options = numa_options
        # the name is free text ("role/trainer" is fine): only its path-safe form names the folder
        self._ret_dir = tempfile.mkdtemp(prefix=f"elastic_ret_{str(name).replace(os.sep, '_')}_")
        self._procs: dict[int, mp.process.BaseProcess] = {}
        self._running_local_ranks: set[int] = set()  # as the last _poll saw them; _wait_for_exit waits on these
        self._return_values: dict[int, Any] = {}
        self._worker_stdouts = self.stdouts
        self._worker_stderrs = self.stderrs

    def _ret_file(self, local_rank: int) -> str:
        return os.path.join(self._ret_dir, f"{local_rank}.pkl")

    def _start(self) -> None:
        if self._procs:
            raise ValueError("The process context already initialized. Most likely the start method got called twice.")
        ctx = mp.get_context(self.start_method)
        die_with = _parent_to_die_with()
        for local_rank in sorted(self.args):
            env = {**self.envs[local_rank], WORKER_GROUP_MARK_ENV: self._group_mark}
            p = ctx.Process(
                target=_wrap,
                args=(local_rank, self.entrypoint, self.args[local_rank], env,
                      self.stdouts.get(local_rank), self.stderrs.get(local_rank), self._ret_file(local_rank),
                      self.error_files.get(local_rank, ""), die_with, self._numa_options),
                name=f"{self.name}-{local_rank}",
            )
            p.start()
            self._procs[local_rank] = p
        self._running_local_ranks = set(self._procs)

    def _poll(self) -> RunProcsResult | None:
        if self._result is not None:
            return self._result
        failures: dict[int, ProcessFailure] = {}
        done = 0
        running = set()
        for local_rank, p in self._procs.items():
            if p.exitcode is None and p.is_alive():
                running.add(local_rank)
                continue
            done += 1
            if p.exitcode != 0:
                failures[local_rank] = self._failure(local_rank, p.pid or -1, p.exitcode or 1)
            elif local_rank not in self._return_values:
                try:
                    with open(self._ret_file(local_rank), "rb") as fh:
                        self._return_values[local_rank] = pickle.load(fh)
                except (OSError, EOFError, pickle.UnpicklingError) as e:
                    failures[local_rank] = self._failure(local_rank, p.pid or -1, 1)
                    failures[local_rank].message = f"worker exited 0 but its return value is unreadable: {e}"
        self._running_local_ranks = running
        if failures:
            if not self._closed:  # a poll after close() only reports: the group is stopped already
                logger.error("[%s] failed local ranks %s; stopping the others", self.name, sorted(failures))
                self.close(timeout=self.failure_close_timeout)  # type: ignore[arg-type]
            self._result = RunProcsResult(failures=failures, stdouts=self.stdouts, stderrs=self.stderrs)
        elif done == len(self._procs) and self._procs:
            self._result = RunProcsResult(return_values=dict(self._return_values), stdouts=self.stdouts,
                                          stderrs=self.stderrs)
        return self._result

    def _wait_for_exit(self, timeout: float) -> None:
        sentinels = [self._procs[r].sentinel for r in self._running_local_ranks]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout=timeout)
        else:
            self.clock.sleep(timeout)

    def pids(self) -> dict[int, int]:
        return {r: p.pid for r, p in self._procs.items() if p.pid is not None}

    def _reap_workers(self) -> None:
        for p in self._procs.values():
            p.exitcode  # noqa: B018 -- waitpid(WNOHANG) through the Process, which keeps the status

    def _close(self, death_sig: signal.Signals, timeout: float = 30) -> None:
        roots = {p.pid for p in self._procs.values() if p.pid is not None}
        if roots:
            self._kill_tree(roots, death_sig, timeout)
        for p in self._procs.values():
            p.join(timeout=1)
        shutil.rmtree(self._ret_dir, ignore_errors=True)


class SubprocessContext(PContext):
    """Workers running a binary or script via ``subprocess`` (one SubprocessHandler per local rank)."""

    def __init__(
        self,
        name: str,
        entrypoint: str,
        args: dict[int, tuple],
        envs: dict[int, dict[str, str]],
        logs_specs: LogsSpecs,
        log_line_prefixes: dict[int, str] | None = None,
        numa_options: Any | None = None,
        duplicate_stdout_filters: list[str] | None = None,
        duplicate_stderr_filters: list[str] | None = None,
        clock: Clock = REAL_CLOCK,
    ):
        _check_numa_options(numa_options)
        super().__init__(name, entrypoint, args, envs, logs_specs, log_line_prefixes, duplicate_stdout_filters,
                         duplicate_stderr_filters, clock=clock)
        self._numa_options = numa_options
        self._running_local_ranks: set[int] = set(range(self.nprocs))
        self._failures: dict[int, ProcessFailure] = {}
        self.subprocess_handlers: dict[int, SubprocessHandler] = {}
        self._pidfds: dict[int, int] = {}

    def _start(self) -> None:
        if self.subprocess_handlers:
            raise ValueError(
                "The subprocess handlers already initialized. Most likely the start method got called twice.")
        for local_rank in sorted(self.args):
            env = dict(self.envs[local_rank])
            env[WORKER_GROUP_MARK_ENV] = self._group_mark
            if self.error_files.get(local_rank):
                env["TORCHELASTIC_ERROR_FILE"] = self.error_files[local_rank]
            try:
                handler = get_subprocess_handler(
                    entrypoint=self.entrypoint,  # type: ignore[arg-type]
                    args=self.args[local_rank], env=env, stdout=self.stdouts.get(local_rank),
                    stderr=self.stderrs.get(local_rank), local_rank_id=local_rank, numa_options=self._numa_options)
            except OSError as e:
                self.close(timeout=5)
                raise _entrypoint_error(e, self.entrypoint) from None
            self.subprocess_handlers[local_rank] = handler
            if hasattr(os, "pidfd_open"):
                try:
                    self._pidfds[local_rank] = os.pidfd_open(handler.proc.pid)
                except OSError:
                    pass
        self._running_local_ranks = set(self.subprocess_handlers)

    def _poll(self) -> RunProcsResult | None:
        if self._result is not None:
            return self._result
        done = set()
        for local_rank in self._running_local_ranks:
            handler = self.subprocess_handlers[local_rank]
            exitcode = handler.proc.poll()
            if exitcode is not None:
                done.add(local_rank)
                if exitcode != 0:
                    self._failures[local_rank] = self._failure(local_rank, handler.proc.pid, exitcode)
        self._running_local_ranks.difference_update(done)
        if not self._running_local_ranks or self._failures:
            if not self._closed:  # a poll after close() only reports: the group is stopped already
                if self._failures:
                    logger.error("[%s] failed local ranks %s; stopping the others", self.name, sorted(self._failures))
                self.close(timeout=self.failure_close_timeout)  # type: ignore[arg-type]
            result = RunProcsResult(failures=dict(self._failures), stdouts=self.stdouts, stderrs=self.stderrs)
            if not result.is_failed():
                result.return_values = dict.fromkeys(self.subprocess_handlers)  # binaries return nothing
            self._result = result
            return result
        return None

    def _wait_for_exit(self, timeout: float) -> None:
        fds = [fd for r, fd in self._pidfds.items() if r in self._running_local_ranks]
        if fds and len(fds) == len(self._running_local_ranks):
            select.select(fds, [], [], timeout)
        else:
            self.clock.sleep(timeout)

    def pids(self) -> dict[int, int]:
        return {r: h.proc.pid for r, h in self.subprocess_handlers.items()}

    def _reap_workers(self) -> None:
        for h in self.subprocess_handlers.values():
            h.proc.poll()  # waitpid(WNOHANG) through the Popen, which keeps the status

    def _close(self, death_sig: signal.Signals, timeout: float = 30) -> None:
        if not self.subprocess_handlers:
            return
        roots = {h.proc.pid for h in self.subprocess_handlers.values()}
        self._kill_tree(roots, death_sig, timeout)
        for h in self.subprocess_handlers.values():
            try:
                h.proc.wait(timeout=1)
            except Exception:
                pass
            h.close(death_sig)  # closes log files; the process is gone by now
        for fd in self._pidfds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._pidfds.clear()


class EntrypointNotExecutableError(OSError, ValueError):
    """A binary entrypoint that cannot be executed: the OSError upstream raises (FileNotFoundError when it does not
    exist, PermissionError when it may not be run) and a ValueError, as this package always raised."""

    def __str__(self) -> str:
        # The message names the entrypoint and the reason; OSError's "[Errno N] " prefix would only repeat the
        # reason as a number (errno stays available as .errno).
        return str(self.strerror) if self.strerror else super().__str__()


class _EntrypointNotFoundError(EntrypointNotExecutableError, FileNotFoundError):
    pass


class _EntrypointPermissionError(EntrypointNotExecutableError, PermissionError):
    pass


def _entrypoint_error(e: OSError, entrypoint: Any) -> EntrypointNotExecutableError:
    cls = {FileNotFoundError: _EntrypointNotFoundError, PermissionError: _EntrypointPermissionError}.get(
        type(e), EntrypointNotExecutableError)
    return cls(e.errno, f"bad entrypoint {entrypoint!r}: cannot execute ({e.strerror})")


class LocalRankMappingError(RuntimeError, ValueError):
    """args/envs not keyed by exactly the local ranks 0..n-1: the RuntimeError upstream raises (with its wording), and
    a ValueError as this package always raised."""


def _check_local_ranks(d: dict, nprocs: int, what: str) -> None:
    expected, actual = set(range(nprocs)), set(d)
    if actual != expected:
        raise LocalRankMappingError(f"{what}, local rank mapping mismatch, expected: {expected}, actual: {actual}")


def _check_numa_options(numa_options: Any) -> None:
    if numa_options is not None:
        from elastic_impl.multiprocessing.numa_binding import affinity_mode_of

        affinity_mode_of(numa_options)  # ValueError naming a mode that does not exist


def start_processes(
    name: str,
    entrypoint: Union[Callable, str],
    args: dict[int, tuple],
    envs: dict[int, dict[str, str]],
    logs_specs: LogsSpecs,
    log_line_prefixes: dict[int, str] | None = None,
    start_method: str = "spawn",
    numa_options: Any | None = None,
    duplicate_stdout_filters: list[str] | None = None,
    duplicate_stderr_filters: list[str] | None = None,
) -> PContext:
    """Start one worker per local rank running ``entrypoint(*args[rank])`` with ``envs[rank]``; returns the PContext.

    A callable entrypoint runs through multiprocessing (its return value comes back); a str is run as a binary.
    """
    if not isinstance(args, dict) or not isinstance(envs, dict):
        raise ValueError(f"bad args/envs: expected dicts keyed by local rank, got {type(args).__name__}"
                         f"/{type(envs).__name__}")
    _check_local_ranks(args, len(args), "args")
    _check_local_ranks(envs, len(args), "envs")
    if not isinstance(logs_specs, LogsSpecs):
        raise ValueError(f"bad logs_specs {logs_specs!r}: expected a LogsSpecs (e.g. DefaultLogsSpecs())")
    context: PContext
    options = dict(numa_options=numa_options, duplicate_stdout_filters=duplicate_stdout_filters,
                   duplicate_stderr_filters=duplicate_stderr_filters)
    if isinstance(entrypoint, str):
        if not entrypoint:
            raise ValueError("bad entrypoint '': expected a binary path or a callable")
        context = SubprocessContext(name=name, entrypoint=entrypoint, args=args, envs=envs,
                                    logs_specs=logs_specs, log_line_prefixes=log_line_prefixes, **options)
    elif callable(entrypoint):
        context = MultiprocessContext(name=name, entrypoint=entrypoint, args=args, envs=envs,
                                      log_line_prefixes=log_line_prefixes, start_method=start_method,
                                      logs_specs=logs_specs, **options)
    else:
        raise ValueError(f"bad entrypoint {entrypoint!r}: expected a callable or a str (binary path)")
    try:
        context.start()
        return context
    except Exception:
        context.close(timeout=5)
        raise
