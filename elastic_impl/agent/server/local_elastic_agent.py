"""The local elastic agent: runs this node's workers as OS processes via ``elastic_impl.multiprocessing``.

Public name and signature follow ``torch.distributed.elastic.agent.server.local_elastic_agent``.

Health check (upstream's switch): with ``TORCHELASTIC_HEALTH_CHECK_PORT=<port>`` the agent serves ``GET /health`` on
that port, on every interface (the probe comes from outside the node), from its first worker start until it shuts
down (see ``health_check_server``).

Worker timer server (same switch as upstream; torchrun has no CLI flag for it): with
``TORCHELASTIC_ENABLE_FILE_TIMER=1`` in the agent's environment the agent runs a ``FileTimerServer`` on a named pipe
(``TORCHELASTIC_TIMER_FILE`` if set, else a fresh path in the temp dir) and passes the path to every worker as
``TORCHELASTIC_TIMER_FILE``. A worker that calls ``timer.configure(FileTimerClient(path))`` and overruns an
``expires(after=...)`` block is SIGKILLed by the agent; the group then fails/restarts like for any other crash.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import string
import tempfile
import threading
import time
import uuid
from typing import Any

from elastic_impl.agent.server.api import (
    RunResult,
    SimpleElasticAgent,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)
from elastic_impl.agent.server.health_check_server import (  # noqa: F401 -- upstream exposes them here
    HealthCheckServer,
    create_healthcheck_server,
)
from elastic_impl.metrics.api import prof  # noqa: F401 -- upstream exposes it here
from elastic_impl.multiprocessing import LogsSpecs, PContext, start_processes  # noqa: F401 -- upstream exposes them here
from elastic_impl.multiprocessing.api import signals_to_handle_from_env
from elastic_impl.multiprocessing.errors import ProcessFailure
from elastic_impl.multiprocessing.prewarm import (
    WorkerPool,
    pool_for,
    preload_from_env,
    prewarm_from_env,
    serving,
)
from elastic_impl.utils import macros  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.process_state import (  # noqa: F401 -- upstream exposes them here
    is_uninterruptible_state,
    read_proc_state,
)

__all__ = [
    "LocalElasticAgent",
    "DEFAULT_SHUTDOWN_GRACE",
    "shutdown_grace_from_env",
    "TORCHELASTIC_ENABLE_FILE_TIMER",
    "TORCHELASTIC_TIMER_FILE",
    "TORCHELASTIC_HEALTH_CHECK_PORT",
    "TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT",
]

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE = 30.0
SHUTDOWN_GRACE_ENV = "TORCHELASTIC_SHUTDOWN_GRACE"
# Environment variables the agent reads (upstream's names and values).
TORCHELASTIC_ENABLE_FILE_TIMER = "TORCHELASTIC_ENABLE_FILE_TIMER"
TORCHELASTIC_HEALTH_CHECK_PORT = "TORCHELASTIC_HEALTH_CHECK_PORT"
TORCHELASTIC_TIMER_FILE = "TORCHELASTIC_TIMER_FILE"
TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT = "TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT"
# How often the timer server looks for expired timers (upstream's agent uses the same 0.1 s).
_TIMER_SERVER_INTERVAL = 0.1
# Longest the monitor loop blocks before looking at a recorded termination signal.
_SIGNAL_CHECK_SLICE = 0.1
# Bound on waiting for the signal watcher's leave() when the run ends (leave is itself bounded by the close timeout).
_WATCHER_JOIN_TIMEOUT = 60.0



def shutdown_grace_from_env(default: float = DEFAULT_SHUTDOWN_GRACE) -> float:
    """Seconds between SIGTERM and SIGKILL when stopping workers, from ``TORCHELASTIC_SHUTDOWN_GRACE``."""
    raw = os.environ.get(SHUTDOWN_GRACE_ENV)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"invalid {SHUTDOWN_GRACE_ENV}: {raw!r} (must be a number of seconds >= 0)"
        ) from None
    if value < 0:
        raise ValueError(f"invalid {SHUTDOWN_GRACE_ENV}: {raw!r} (must be a number of seconds >= 0)")
    return value


def _substitute_local_rank(args: tuple, local_rank: int) -> tuple:
    # torchrun's "${local_rank}" macro in worker arguments.
    return tuple(a.replace("${local_rank}", str(local_rank)) if isinstance(a, str) else a for a in args)


def _uninterruptible_state_timeout(explicit: float | None) -> float:
    """Seconds a worker may stay in D state: the argument, else TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT, else 0.

    0 (and, as upstream, any non-positive value) disables the check. An unparsable variable disables it too, as
    upstream, but says so once: a typo must not silently turn a safety check off.
    """
    if explicit is not None:
        value = float(explicit)
        if math.isnan(value):
            raise ValueError(f"invalid uninterruptible_state_timeout: {explicit!r} (seconds; <= 0 disables)")
        return max(0.0, value)
    raw = os.environ.get(TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        logger.warning("%s=%r is not a number of seconds: the uninterruptible-state check is off",
                       TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT, raw)
        return 0.0
    return max(0.0, value)


class LocalElasticAgent(SimpleElasticAgent):
    """Starts ``spec.local_world_size`` worker processes per rendezvous round and supervises them.

    Workers get torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, ..., TORCHELASTIC_*); process
    creation, logs and error files are handled by ``elastic_impl.multiprocessing``. SIGTERM/SIGINT/SIGHUP/SIGQUIT
    received by the agent stop the workers (SIGTERM, SIGKILL after the shutdown grace) and make ``run`` raise.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        logs_specs,
        start_method: str = "spawn",
        exit_barrier_timeout: float = 300,
        log_line_prefix_template: str | None = None,
        shutdown_timeout: int | float | None = None,
        health_check_server: Any = None,
        uninterruptible_state_timeout: float | None = None,
        prewarm: bool | None = None,
    ) -> None:
        if start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(f"invalid start_method: {start_method!r} (allowed: spawn, fork, forkserver)")
        grace = shutdown_grace_from_env() if shutdown_timeout is None else float(shutdown_timeout)
        if grace < 0:
            raise ValueError(f"invalid shutdown_timeout: {shutdown_timeout!r} (must be >= 0)")
        super().__init__(spec, exit_barrier_timeout, shutdown_timeout=grace)
        self._start_method = start_method
        self._pcontext = None
        self._logs_specs = logs_specs
        self._log_line_prefix_template = log_line_prefix_template
        self._health_check_server = health_check_server
        self._previous_handlers: dict[int, Any] = {}
        self._terminating = False
        self._stop_now = False  # a second termination signal: no grace for the workers (see _on_signal)
        self._closing_pcontext = None  # the worker context being stopped, while it is
        self._signal_event = threading.Event()
        self._timer_server = None
        self._timer_file: str | None = None
        # Beyond upstream: pre-warmed worker interpreters (elastic_impl.multiprocessing.prewarm); None reads
        # ELASTIC_IMPL_PREWARM. Checked here so a bad value or preload list fails before the rendezvous.
        self._prewarm = prewarm_from_env() if prewarm is None else bool(prewarm)
        if self._prewarm:
            preload_from_env()
        self._pool: WorkerPool | None = None
        # How long a worker may stay in uninterruptible kernel sleep (D state: a hung driver, NFS or device) before
        # the group is UNHEALTHY with restarts disabled -- a fresh worker would contend for what the stuck one holds.
        self._stuck_timeout = _uninterruptible_state_timeout(uninterruptible_state_timeout)
        self._d_state_since: dict[int, float] = {}  # pid -> monotonic time it was first seen in D state
        self._stuck_failures: dict[int, ProcessFailure] = {}  # local rank -> the report of a worker stuck in D state

    # ------------------------------------------------------------------ signals

    def run(self, role: str = "default") -> RunResult:
        self._install_signal_handlers()
        self._signal_event.clear()
        watcher = threading.Thread(target=self._watch_signals, name="agent-signal-watcher", daemon=True)
        watcher.start()
        if self._prewarm and self._pool is None:
            # Started before the rendezvous (or taken over from the launcher, which starts it even earlier), so the
            # preload (import torch) overlaps it.
            self._pool = pool_for(self._worker_group.spec.entrypoint, self._worker_group.spec.args)
        try:
            return super().run(role)
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()
            self._restore_signal_handlers()
            self._signal_event.set()  # ends the watcher
            # Never return (and let the interpreter exit) while the watcher is inside a store call: a daemon thread
            # torn down in C++ store code at exit aborts the process ("terminate called without an active
            # exception").
            watcher.join(timeout=_WATCHER_JOIN_TIMEOUT)

    def _install_signal_handlers(self) -> None:
        """Route termination signals to ``_on_signal`` (again after each worker start: multiprocessing's
        ``start_processes`` installs its own raising handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; an embedding program handles signals itself
        # The signals that make the agent stop its workers and leave (the job goes on without this node):
        # TORCHELASTIC_SIGNALS_TO_HANDLE, which --signals-to-handle sets; SIGTERM, SIGINT, SIGHUP, SIGQUIT by default.
        for sig in signals_to_handle_from_env():
            try:
                previous = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                continue
            self._previous_handlers.setdefault(sig, previous)

    def _on_signal(self, signum, _frame) -> None:
        # Record only, never raise here (see SimpleElasticAgent._check_signal): the run loop acts on it within
        # one wait slice, and the watcher thread leaves the rendezvous at once (which also ends a join in progress).
        if self._terminating:
            # A second Ctrl-C (or SIGTERM) means "now": workers still spending their grace get SIGKILL.
            self._stop_now = True
            closing = self._closing_pcontext
            if closing is not None:
                closing.cut_grace_short()
            logger.warning("agent already stopping; %s again: stopping the workers now (SIGKILL)",
                           signal.Signals(signum).name)
            return
        self._terminating = True
        self._pending_signal = signal.Signals(signum)
        self._signal_event.set()

    def _watch_signals(self) -> None:
        self._signal_event.wait()
        if self._pending_signal is not None:
            logger.warning("agent received %s; leaving the rendezvous", self._pending_signal.name)
            self._leave_rendezvous()

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._previous_handlers.clear()

    # ------------------------------------------------------------------ lifecycle

    def _log_line_prefixes(self, worker_group: WorkerGroup) -> dict[int, str] | None:
        if self._log_line_prefix_template is None:
            return None  # the default "[<role><local_rank>]:" prefix; "" means no prefix at all
        template = string.Template(self._log_line_prefix_template)
        return {
            w.local_rank: template.safe_substitute(
                role_name=worker_group.spec.role, rank=w.global_rank, local_rank=w.local_rank
            )
            for w in worker_group.workers
        }

    def _worker_envs(self, worker_group: WorkerGroup) -> dict[int, dict[str, str]]:
        spec = worker_group.spec
        run_id = spec.rdzv_handler.get_run_id()
        envs: dict[int, dict[str, str]] = {}
        for worker in worker_group.workers:
            env = {
                **self._local_rank_env(spec, worker.local_rank),
                "RANK": str(worker.global_rank),
                "GROUP_RANK": str(worker_group.group_rank),
                "ROLE_RANK": str(worker.role_rank),
                "ROLE_NAME": spec.role,
                "LOCAL_WORLD_SIZE": str(spec.local_world_size),
                "WORLD_SIZE": str(worker.world_size),
                "GROUP_WORLD_SIZE": str(worker_group.group_world_size),
                "ROLE_WORLD_SIZE": str(worker.role_world_size),
                "MASTER_ADDR": str(worker_group.master_addr),
                "MASTER_PORT": str(worker_group.master_port),
                "TORCHELASTIC_RESTART_COUNT": str(self._restart_count),
                "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
                "TORCHELASTIC_RUN_ID": run_id,
                # Workers get a fresh store per round (see SimpleElasticAgent._resolve_master), never the agent's.
                "TORCHELASTIC_USE_AGENT_STORE": "False",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.getenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            }
            if "OMP_NUM_THREADS" in os.environ:
                env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
            envs[worker.local_rank] = env
        return envs

    @staticmethod
    def _local_rank_env(spec: WorkerSpec, local_rank: int) -> dict[str, str]:
        """LOCAL_RANK, and CUDA_VISIBLE_DEVICES where the agent has it or sets it.

        With ``spec.virtual_local_rank`` every worker is local rank 0 and sees only its own GPU (the local_rank-th
        of the agent's CUDA_VISIBLE_DEVICES, or GPU <local_rank> when that is unset) as device 0.
        """
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not spec.virtual_local_rank:
            return {"LOCAL_RANK": str(local_rank), **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible})}
        if visible is None:
            return {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": str(local_rank)}
        devices = visible.split(",")
        if local_rank >= len(devices):
            raise ValueError(f"bad CUDA_VISIBLE_DEVICES {visible!r} for virtual local ranks: local rank {local_rank} "
                             f"needs a device of its own, but it names {len(devices)} (one per local rank allowed)")
        return {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": devices[local_rank].strip()}

    def _setup_timer_server(self, envs: dict[int, dict[str, str]]) -> None:
        """Start the worker timer server once (see the module docstring) and tell every worker its pipe."""
        if os.environ.get(TORCHELASTIC_ENABLE_FILE_TIMER) == "1" and self._timer_server is None:
            from elastic_impl.timer import FileTimerServer

            path = os.environ.get(TORCHELASTIC_TIMER_FILE) or os.path.join(
                tempfile.gettempdir(), f"elastic_timer_{uuid.uuid4().hex}"
            )
            run_id = next(iter(envs.values()))["TORCHELASTIC_RUN_ID"] if envs else ""
            server = FileTimerServer(
                file_path=path, run_id=run_id, max_interval=_TIMER_SERVER_INTERVAL, daemon=True,
                log_event=self._on_timer_expired,
            )
            server.start()
            self._timer_server, self._timer_file = server, path
            logger.info("worker timer server listening on %s", path)
        path = self._timer_file or os.environ.get(TORCHELASTIC_TIMER_FILE)
        if path:
            for env in envs.values():
                env[TORCHELASTIC_TIMER_FILE] = path

    def _on_timer_expired(self, name: str, request: Any) -> None:
        pid = getattr(request, "worker_pid", None)
        scope = getattr(request, "scope_id", None)
        sig = getattr(request, "signal", None)
        if isinstance(sig, int) and sig <= 0:  # FileTimerClient's documented "do not kill" signal
            logger.error("worker pid %s overran its timer %r (signal %s: not killed)", pid, scope, sig)
        else:
            logger.error("worker pid %s overran its timer %r; the timer server kills it", pid, scope)
        self._emit("agent.timer_expired", pid=pid, scope=scope)

    def _setup_healthcheck(self) -> None:
        """With ``TORCHELASTIC_HEALTH_CHECK_PORT`` set, serve ``GET /health`` on that port (once, until shutdown).

        The agent counts as alive while the worker timer server sees progress (its last progress time), or, without
        a timer server and while at the exit barrier, always (the current time). A value that is not a port number,
        or a port that cannot be bound, is logged and the agent runs on without a health check server (it is an
        aid for the job scheduler, not a reason to fail the job).
        """
        raw = os.environ.get(TORCHELASTIC_HEALTH_CHECK_PORT)
        if raw is None or self._health_check_server is not None:
            return
        try:
            # Every interface, not loopback: the probe this port is for (a scheduler's, Kubernetes' httpGet) comes
            # from outside the node. It says only whether the agent is alive.
            server = HealthCheckServer(alive_callback=self._alive_time, port=int(raw), timeout=60, host="0.0.0.0")
            server.start()
        except (ValueError, OSError) as e:
            logger.warning("no health check server: %s=%r: %s", TORCHELASTIC_HEALTH_CHECK_PORT, raw, e)
            return
        self._health_check_server = server

    def _alive_time(self) -> int:
        """The health check's last-alive time (epoch seconds)."""
        server = self._timer_server
        if server is None or self._in_exit_barrier:
            return int(time.time())
        return server.get_last_progress_time()

    def _stop_timer_server(self) -> None:
        server, self._timer_server = self._timer_server, None
        if server is not None:
            try:
                server.stop()
            except Exception as e:
                logger.warning("timer server did not stop cleanly: %s", e)

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        spec = worker_group.spec
        envs = self._worker_envs(worker_group)
        self._setup_timer_server(envs)
        self._setup_healthcheck()
        args = {w.local_rank: _substitute_local_rank(tuple(spec.args), w.local_rank) for w in worker_group.workers}
        with serving(self._pool):
            self._pcontext = self._start_processes(spec, args, envs, worker_group)
        # When one worker fails the context stops the others itself: with our grace, not a fixed 30 s.
        self._pcontext.failure_close_timeout = self._shutdown_timeout
        self._install_signal_handlers()
        return self._pcontext.pids()

    def _start_processes(self, spec: WorkerSpec, args: dict, envs: dict, worker_group: WorkerGroup) -> PContext:
        return start_processes(
            name=spec.role,
            entrypoint=spec.entrypoint,
            args=args,
            envs=envs,
            logs_specs=self._logs_specs,
            log_line_prefixes=self._log_line_prefixes(worker_group),
            start_method=self._start_method,
            numa_options=spec.numa_options,
            duplicate_stdout_filters=spec.duplicate_stdout_filters,
            duplicate_stderr_filters=spec.duplicate_stderr_filters,
        )

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        self._close_pcontext(signal.SIGTERM, self._shutdown_timeout)
        # Beyond upstream: marks the end of the stop phase (the benchmarks' recovery breakdown reads it).
        self._emit("agent.workers_stopped", round=self._rdzv_round, restart_count=self._restart_count)

    def _close_pcontext(self, death_sig: signal.Signals, timeout: float) -> None:
        pcontext, self._pcontext = self._pcontext, None
        if pcontext is None:
            return
        self._closing_pcontext = pcontext
        if self._stop_now:
            pcontext.cut_grace_short()
        try:
            pcontext.close(death_sig, timeout)
        finally:
            self._closing_pcontext = None
        stuck, self._stuck_failures = self._stuck_failures, {}
        if stuck:
            # The stuck workers' reports said "stopped by the agent" before they were; now they have an exit status
            # (SIGKILL when the stop signal could not reach them in the kernel).
            try:
                ended = pcontext.wait(0)
            except Exception as e:  # noqa: BLE001 - the report keeps the stop signal it assumed
                logger.debug("exit status of the stuck workers unknown: %s", e)
                return
            for local_rank, failure in stuck.items():
                if ended is not None and local_rank in ended.failures:
                    failure.exitcode = ended.failures[local_rank].exitcode
                else:  # still alive after SIGKILL: the kernel holds it (see PContext's bounded stop)
                    failure.exitcode = -signal.SIGKILL
                    failure.message += ("; it was still alive after SIGKILL (held in the kernel): its exit code is "
                                        "the signal sent, not one it returned")

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
        server, self._health_check_server = self._health_check_server, None  # stopped once, like upstream
        if server is not None:
            try:
                server.stop()
            except Exception as e:
                logger.warning("health check server did not stop cleanly: %s", e)
        self._close_pcontext(death_sig, timeout)
        self._stop_timer_server()

    def _wait_for_worker_event(self, timeout: float) -> None:
        # Event-driven: the context blocks on the workers' pidfds/sentinels, so an exit ends the wait at once. The
        # wait is cut in slices so that a recorded signal is acted on within one slice even with a long interval.
        deadline = self._clock.monotonic() + timeout
        while self._pending_signal is None:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return
            pcontext = self._pcontext
            if pcontext is None:
                self._clock.sleep(min(remaining, _SIGNAL_CHECK_SLICE))
            elif pcontext.wait(min(remaining, _SIGNAL_CHECK_SLICE), period=_SIGNAL_CHECK_SLICE) is not None:
                return

    def _stuck_workers(self, worker_group: WorkerGroup) -> RunResult | None:
        """UNHEALTHY (restarts disabled) once a worker has stayed in D state for the uninterruptible-state timeout.

        The failure names the worker and why, so the job's report says what happened: the worker has not exited,
        and the exit code it gets is the agent's stop signal.
        """
        now = time.monotonic()
        live = {w.id: w for w in worker_group.workers if w.id is not None}
        for pid in [p for p in self._d_state_since if p not in live]:
            del self._d_state_since[pid]  # exited or restarted: a new worker starts with a clean slate
        stuck = []
        for pid, worker in live.items():
            if not is_uninterruptible_state(read_proc_state(pid)):
                self._d_state_since.pop(pid, None)
                continue
            since = self._d_state_since.setdefault(pid, now)
            if since == now:
                logger.warning("[%s] worker local_rank=%s (pid %s) is in uninterruptible sleep (D state); the group "
                               "is marked UNHEALTHY if it stays there %.1fs", worker_group.spec.role,
                               worker.local_rank, pid, self._stuck_timeout)
            elif now - since >= self._stuck_timeout:
                stuck.append((worker, now - since))
        if not stuck:
            return None
        self._remaining_restarts = 0
        failures = {}
        for worker, dwell in stuck:
            failure = ProcessFailure(local_rank=worker.local_rank, pid=worker.id, exitcode=-signal.SIGTERM,
                                     error_file=self._error_file_of(worker.local_rank))
            failure.message = (f"stuck in uninterruptible sleep (D state) for {dwell:.1f}s, at least the "
                               f"uninterruptible-state timeout of {self._stuck_timeout:g}s: the agent stopped the "
                               "group and disabled restarts (a new worker would contend for what this one holds)")
            failures[worker.global_rank] = failure
            self._stuck_failures[worker.local_rank] = failure
            logger.error("[%s] worker local_rank=%s (pid %s) %s", worker_group.spec.role, worker.local_rank,
                         worker.id, failure.message)
        return RunResult(state=WorkerState.UNHEALTHY, failures=failures)

    def _error_file_of(self, local_rank: int) -> str:
        pcontext = self._pcontext
        error_files = getattr(pcontext, "error_files", None) or {}
        return str(error_files.get(local_rank, ""))

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        role = worker_group.spec.role
        pcontext = self._pcontext
        if pcontext is None:
            return RunResult(state=WorkerState.UNKNOWN)
        expected = {w.id for w in worker_group.workers}
        actual = set(pcontext.pids().values())
        if expected != actual:
            logger.error("[%s] worker pids %s do not match the started ones %s", role, actual, expected)
            return RunResult(state=WorkerState.UNKNOWN)
        result = pcontext.wait(0)
        if result is None:
            stuck = self._stuck_workers(worker_group) if self._stuck_timeout > 0 else None
            return stuck or RunResult(state=WorkerState.HEALTHY)
        by_local = {w.local_rank: w for w in worker_group.workers}
        if result.is_failed():
            failures = {by_local[lr].global_rank: f for lr, f in result.failures.items()}
            return RunResult(state=WorkerState.FAILED, failures=failures)
        return_values = {by_local[lr].global_rank: v for lr, v in result.return_values.items()}
        return RunResult(state=WorkerState.SUCCEEDED, return_values=return_values)
