"""The generic elastic agent: worker specs, worker groups, and the rendezvous/monitor/restart run loop.

Public names and signatures follow ``torch.distributed.elastic.agent.server.api``. The implementation is our own.

Run loop of :class:`SimpleElasticAgent` (``_invoke_run``; its decisions are made by
:class:`~elastic_impl.agent.server.decisions.AgentStepper`, which the virtual simulator runs too, and the agent does
the I/O the stepper asks for)::

    rendezvous -> assign ranks -> start workers
    every monitor_interval, or AT ONCE when a worker exits (``_wait_for_worker_event``: the local agent blocks on
    the workers' exit events, so monitor_interval only paces the membership checks):
        SUCCEEDED            -> wait at the exit barrier (unless a peer already reported the job failed), done
        FAILED / UNHEALTHY   -> restart (re-rendezvous) while restarts remain, else publish the failure, done
                                (counted job-wide before restarting: while the counter's store does not answer,
                                wait for it, up to the store outage window)
        HEALTHY              -> if nodes wait to join, or a peer left/was evicted, restart to re-form the group
                                (membership restarts do not consume max_restarts)

Rendezvous handler extensions the agent uses when the handler has them (all optional; without them the agent
behaves like upstream):

- ``get_participants() -> iterable``: the current participants of the round. A change while workers are healthy
  (a peer left, or was evicted after missing heartbeats) makes the agent restart to re-form the group.
- ``get_round() -> int``: reported in the agent's events.
- ``get_restart_count() -> int`` / ``increment_restart_count()``: a job-wide restart counter kept in the
  rendezvous state. It is the restart BUDGET: a failed group restarts only while the job-wide count stays within
  ``max_restarts`` (so a node that leaves and rejoins cannot reset it), and it is TORCHELASTIC_RESTART_COUNT (the
  same on every node). Bumped at most once per round (by the first failing node).
- ``leave()``: the launcher calls it when the agent is stopped by a signal (this node goes, the others re-form);
  ``shutdown()`` closes the run and is called only when the job ends (success, or restarts exhausted).

Round-store keys the agents share (under the round's store namespace): ``torchelastic/agent/role_info/<group
rank>`` (rank assignment), ``master_addr``/``master_port`` (a fresh worker store per round), ``exit_barrier``,
``job_failed`` + ``failure/<group rank>`` + ``job_failed_ack`` (a node that failed for good tells its peers, which
stop at once and report its root cause instead of waiting out the exit barrier or a hung collective).
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any

from elastic_impl.agent.server.decisions import Action, AgentStepper, Ask, StoreUnavailable
from elastic_impl.events import Event, EventSource, record
from elastic_impl.metrics import prof, put_metric  # noqa: F401 -- upstream exposes them here
from elastic_impl.multiprocessing import ProcessFailure, SignalException  # noqa: F401 -- upstream exposes them here
from elastic_impl.multiprocessing.api import EntrypointNotExecutableError
from elastic_impl.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)
from elastic_impl.rendezvous.extensions import (
    LeavingHandler,
    RestartCountingHandler,
    RoundReportingHandler,
    detection_window,
)
from elastic_impl.utils.bounded_call import BoundedStore
from elastic_impl.utils.clock import REAL_CLOCK, Clock
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here

__all__ = [
    "WorkerSpec",
    "Worker",
    "WorkerState",
    "WorkerGroup",
    "RunResult",
    "ElasticAgent",
    "SimpleElasticAgent",
]

logger = logging.getLogger(__name__)

DEFAULT_ROLE = "default"

# Store keys the agents of one rendezvous round share (the rendezvous store is namespaced per run and round).
_ROLE_INFO_KEY = "torchelastic/agent/role_info/{group_rank}"
_MASTER_ADDR_KEY = "torchelastic/agent/master_addr"
_MASTER_PORT_KEY = "torchelastic/agent/master_port"
_EXIT_BARRIER_KEY = "torchelastic/agent/exit_barrier"
_JOB_FAILED_KEY = "torchelastic/agent/job_failed"
_FAILURE_KEY = "torchelastic/agent/failure/{group_rank}"
_FAILURE_ACK_KEY = "torchelastic/agent/job_failed_ack"
_RESTART_BUMP_KEY = "torchelastic/agent/restart_bump"
# Set to 1 when every node runs the same number of workers of one role: ranks are then computed without the store.
_WORKER_IDENTICAL_ENV = "TORCH_ELASTIC_WORKER_IDENTICAL"
# How long a node that failed the job keeps its store up for peers to read the root cause.
_FAILURE_ACK_TIMEOUT = 5.0
# How long a node that lost the race to count a failure round waits to see the winner's increment.
_RESTART_BUMP_WAIT = 5.0


def _validation_error(what: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"invalid {what}: {value!r} ({allowed})")


@dataclass
class WorkerSpec:
    """What to run on every node for one role: how many local workers, the entrypoint, restart policy."""

    role: str
    local_world_size: int
    rdzv_handler: Any
    fn: Callable | None = None
    entrypoint: Callable | str | None = None
    args: tuple = ()
    max_restarts: int = 3
    monitor_interval: float = 0.1
    master_port: int | None = None
    master_addr: str | None = None
    local_addr: str | None = None
    event_log_handler: str = "null"
    numa_options: Any = None
    duplicate_stdout_filters: list[str] | None = None
    duplicate_stderr_filters: list[str] | None = None
    virtual_local_rank: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.local_world_size, int) or isinstance(self.local_world_size, bool) or (
            self.local_world_size <= 0
        ):
            raise _validation_error("local_world_size", self.local_world_size, "must be an int >= 1")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise _validation_error("max_restarts", self.max_restarts, "must be an int >= 0")
        if not isinstance(self.monitor_interval, (int, float)) or self.monitor_interval <= 0:
            raise _validation_error("monitor_interval", self.monitor_interval, "must be a number > 0")
        if self.fn:
            # ``fn`` is the deprecated spelling of ``entrypoint``; like upstream it wins over ``entrypoint`` when both
            # are given, and it warns.
            warnings.warn(
                "WorkerSpec.fn will be deprecated, please use WorkerSpec.entrypoint instead",
                DeprecationWarning,
                stacklevel=2,
            )
            self.entrypoint = self.fn
        if self.entrypoint is None or isinstance(self.entrypoint, str) and not self.entrypoint.strip():
            raise _validation_error("entrypoint", self.entrypoint, "give a callable or a non-empty command string")
        if not (callable(self.entrypoint) or isinstance(self.entrypoint, str)):
            raise _validation_error("entrypoint", self.entrypoint, "must be a callable or a command string")
        if self.master_port is not None:
            try:
                port = int(self.master_port)
            except (TypeError, ValueError):
                port = -1
            if isinstance(self.master_port, bool) or not 0 <= port <= 65535:
                raise _validation_error("master_port", self.master_port, "must be a port number in 0..65535")

    def get_entrypoint_name(self) -> str:
        """The command's base name for a string entrypoint, the function's name for a callable."""
        if isinstance(self.entrypoint, str):
            return os.path.basename(self.entrypoint)
        entrypoint = self.entrypoint
        # Beyond upstream (which raises AttributeError for these): a functools.partial is named after the function
        # it wraps, any other callable object after its class.
        while isinstance(entrypoint, functools.partial):
            entrypoint = entrypoint.func
        name = getattr(entrypoint, "__qualname__", None)
        return name if isinstance(name, str) else type(entrypoint).__qualname__


class Worker:
    """One worker process slot: its local rank and the ranks it got in the current rendezvous round."""

    __slots__ = ["id", "local_rank", "global_rank", "role_rank", "world_size", "role_world_size"]

    def __init__(
        self,
        local_rank: int,
        global_rank: int = -1,
        role_rank: int = -1,
        world_size: int = -1,
        role_world_size: int = -1,
    ) -> None:
        # ``id`` is the process id once started (set by the agent implementation).
        self.id: Any = None
        self.local_rank = local_rank
        self.global_rank = global_rank
        self.role_rank = role_rank
        self.world_size = world_size
        self.role_world_size = role_world_size

    def __str__(self) -> str:
        return (
            f"local_rank={self.local_rank},global_rank={self.global_rank},role_rank={self.role_rank},"
            f"world_size={self.world_size},role_world_size={self.role_world_size}"
        )

    def __repr__(self) -> str:
        # the same text as str(), as upstream (logs and test expectations written for it compare it)
        return str(self)


class WorkerState(str, Enum):
    """State of a worker group as a whole (one failed worker makes the group FAILED)."""

    UNKNOWN = "UNKNOWN"
    INIT = "INIT"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @staticmethod
    def is_running(state: WorkerState) -> bool:
        """Whether workers in ``state`` are still executing (HEALTHY or UNHEALTHY)."""
        return state in {WorkerState.HEALTHY, WorkerState.UNHEALTHY}


class WorkerGroup:
    """The workers of one spec on this node, plus what the last rendezvous assigned to this node."""

    __slots__ = [
        "spec",
        "workers",
        "store",
        "group_rank",
        "group_world_size",
        "state",
        "master_addr",
        "master_port",
    ]

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.workers = [Worker(local_rank=i) for i in range(spec.local_world_size)]
        self.store = None
        self.group_rank: int | None = None
        self.group_world_size: int | None = None
        self.master_addr: str | None = None
        self.master_port: int | None = None
        self.state = WorkerState.INIT


@dataclass
class RunResult:
    """Outcome of a worker group: its state, per-global-rank return values, and per-global-rank failures."""

    state: WorkerState
    return_values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, Any] = field(default_factory=dict)

    def is_failed(self) -> bool:
        return self.state == WorkerState.FAILED


class ElasticAgent(abc.ABC):
    """Supervises the local workers of one or more roles and takes part in the job's rendezvous."""

    @abc.abstractmethod
    def run(self, role: str = DEFAULT_ROLE) -> RunResult:
        """Run the workers to completion (restarting them as the policy allows); return the final result."""

    @abc.abstractmethod
    def get_worker_group(self, role: str = DEFAULT_ROLE) -> WorkerGroup:
        """The worker group of ``role`` (mutable; it changes as the agent restarts workers)."""


class AgentSignalError(Exception):
    """The agent received a termination signal (SIGTERM/SIGINT/...) and stopped its workers."""

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval


def _get_free_port(host: str = "") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _last_round(rdzv_handler) -> tuple[int, int | None] | None:
    """The handler's (round, restart count) of the rendezvous that just completed, if it offers them (extension)."""
    if not isinstance(rdzv_handler, RoundReportingHandler):
        return None
    try:
        joined = rdzv_handler.last_round()
    except Exception as e:  # an optional extension: fall back to reading
        logger.debug("rendezvous last_round() unavailable: %s", e)
        return None
    return joined if joined is not None and joined[0] is not None else None


def _wait_for_keys(store, keys: list[str], clock: Clock, timeout: float, check: Callable[[], None] | None = None) -> None:
    """Poll until ``keys`` exist (non-blocking checks); ``check()`` runs between polls (it may raise to stop).

    The rendezvous store client is shared with the rendezvous keep-alive thread; a long blocking ``get``/``wait``
    on it stalls (and with some store versions wedges) the heartbeats, so peers' keys are polled instead.
    """
    deadline = clock.monotonic() + timeout
    while not store.check(keys):
        if check is not None:
            check()
        if clock.monotonic() > deadline:
            missing = [k for k in keys if not store.check([k])]
            raise TimeoutError(f"peers did not publish {missing} within {timeout:g}s")
        clock.sleep(0.05)


def _store_try_get(store, key: str) -> bytes | None:
    """Read ``key`` without blocking on a missing key (TCPStore.get waits until it appears)."""
    if store.check([key]):
        return store.get(key)
    return None


class SimpleElasticAgent(ElasticAgent):
    """An agent for a single worker spec; subclasses say how workers start, stop and are monitored."""

    def __init__(self, spec: WorkerSpec, exit_barrier_timeout: float = 300, shutdown_timeout: int = 30) -> None:
        self._worker_group = WorkerGroup(spec)
        # Every decision of the run loop (restart, re-form, exit barrier, fail) and the restart budget live in this
        # stepper; the agent does the I/O it asks for (see _answer).
        self._decisions = AgentStepper(
            spec.max_restarts, spec.monitor_interval, store_outage_window=detection_window(spec.rdzv_handler) or 0.0
        )
        self._store = None
        self._exit_barrier_timeout = exit_barrier_timeout
        self._shutdown_timeout = shutdown_timeout
        self._total_execution_time = 0
        # True while this agent waits at the exit barrier (its workers are done; a health check must not take the
        # stale worker progress for a hang).
        self._in_exit_barrier = False
        # Protocol timing goes through the clock seam (tests/simulator may inject their own).
        self._clock: Clock = REAL_CLOCK
        self._node_id = f"{socket.gethostname()}_{os.getpid()}"
        self._last_failure_published = False
        self._remote_failures: dict[int, dict[str, Any]] = {}
        self._failed_by_peer = False
        self._acked_peer_failure = False
        # Bound on waiting for peers' keys right after a rendezvous (they are a few store round trips behind).
        self._store_wait_timeout = 300.0
        # A termination signal the agent received but has not acted on yet (see _check_signal).
        self._pending_signal: signal.Signals | None = None
        self._leave_lock = threading.Lock()
        self._left_rendezvous = False

    # The decision state, as the names the rest of the agent (and its subclasses) read.
    @property
    def _remaining_restarts(self) -> int:
        return self._decisions.remaining_restarts

    @_remaining_restarts.setter
    def _remaining_restarts(self, value: int) -> None:
        # Subclasses may set it (upstream's LocalElasticAgent sets 0 to disable restarts): at 0 the next failure
        # fails the group instead of restarting it, also under a job-wide restart counter.
        self._decisions.remaining_restarts = value
        self._decisions.restarts_disabled = value <= 0

    @property
    def _restart_count(self) -> int:
        """The job-wide restart count of the running attempt (TORCHELASTIC_RESTART_COUNT)."""
        return self._decisions.restart_count

    @property
    def _rdzv_round(self) -> int | None:
        return self._decisions.round

    # ------------------------------------------------------------------ public API

    def get_worker_group(self, role: str = DEFAULT_ROLE) -> WorkerGroup:
        return self._worker_group

    def run(self, role: str = DEFAULT_ROLE) -> RunResult:
        start = self._clock.monotonic()
        shutdown_called = False
        try:
            result = self._invoke_run(role)
            self._total_execution_time = int(self._clock.monotonic() - start)
            self._record_metrics(result)
            self._record_worker_events(result)
            self._emit("agent.exit", state=result.state.value)
            return result
        except Exception as e:
            sigval = getattr(e, "sigval", None)  # ours or elastic_impl.multiprocessing's SignalException
            if sigval is None and self._pending_signal is not None:
                # Whatever broke off the run (e.g. the rendezvous we left on the signal) happened because of it.
                logger.info("run ended by %s after the signal %s", type(e).__name__, self._pending_signal.name)
                sigval = self._pending_signal
            if sigval is None:
                self._emit("agent.exit", state="ERROR", error=f"{type(e).__name__}: {e}")
                if not _is_rendezvous_error_of(e, RendezvousGracefulExitError, RendezvousConnectionError,
                                               RendezvousClosedError):
                    # The job ends here (the launcher closes the run): without a published root cause a peer
                    # waiting at its exit barrier would take the closed run for a finished job and exit 0.
                    # A worker program that cannot be executed is the user's input, and a rendezvous that timed out
                    # (the peers never came) an outcome, each said in one line; anything else is our failure and
                    # keeps its traceback.
                    said_in_full = isinstance(e, EntrypointNotExecutableError) or _is_rendezvous_error_of(
                        e, RendezvousTimeoutError)
                    logger.error("the elastic agent failed: %s: %s", type(e).__name__, e, exc_info=not said_in_full)
                    self._publish_agent_error(e)
                raise
            sigval = signal.Signals(sigval)
            logger.warning("agent received %s, stopping workers", sigval.name)
            shutdown_called = True
            self._emit("agent.exit", state="TERMINATED", signal=sigval.name)
            # Leave BEFORE stopping the workers: the other nodes re-form at once instead of waiting out this node's
            # shutdown grace (its workers may spend it checkpointing) with their collectives hung on it.
            self._leave_rendezvous()
            self._shutdown(sigval, timeout=self._shutdown_timeout)
            if getattr(e, "sigval", None) is None:
                # The run broke off because of the signal (the join ended by the leave above, say): what the caller
                # learns is the signal, not the error it caused (the launcher exits with 128 + its number).
                raise AgentSignalError(f"agent received {sigval.name}", sigval) from e
            raise
        finally:
            if not shutdown_called:
                self._shutdown(timeout=self._shutdown_timeout)

    def _check_signal(self) -> None:
        """Raise AgentSignalError if a termination signal arrived.

        Signal handlers only record the signal; the agent acts on it here, at points where unwinding is safe.
        (An exception raised from a handler can land anywhere, e.g. inside ``threading.Thread.start`` of a store
        call with the interpreter's thread-list lock held: the next thread start deadlocks and the agent hangs.)
        """
        sig = self._pending_signal
        if sig is not None:
            raise AgentSignalError(f"agent received {sig.name}", sig)

    def _leave_rendezvous(self) -> None:
        """This node goes away but the job goes on: ``leave()`` where the rendezvous handler offers it (once; a
        second caller waits for the first to finish)."""
        rdzv_handler = self._worker_group.spec.rdzv_handler
        if not isinstance(rdzv_handler, LeavingHandler):
            return  # the launcher decides what a handler without leave() gets
        with self._leave_lock:
            if self._left_rendezvous:
                return
            self._left_rendezvous = True
            try:
                rdzv_handler.leave()
            except Exception as e:  # the store may be gone; stopping the workers matters more
                logger.warning("could not leave the rendezvous: %s", e)

    # ------------------------------------------------------------------ to implement in subclasses

    @abc.abstractmethod
    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        """Start ``worker_group.spec.local_world_size`` workers; return ``{local_rank: worker id}``."""

    @abc.abstractmethod
    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        """Stop all workers of the group (idempotent)."""

    @abc.abstractmethod
    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        """Check the workers once; never blocks for long."""

    @abc.abstractmethod
    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        """Release everything the agent holds (workers, servers) when it is done."""

    def _wait_for_worker_event(self, timeout: float) -> None:
        """Block until a worker may have exited, or ``timeout`` seconds passed.

        This generic version just sleeps (like upstream's loop); agents that can wait on process exits override it
        so a failure is handled at once rather than at the next monitor_interval tick.
        """
        self._clock.sleep(timeout)

    # ------------------------------------------------------------------ lifecycle steps

    def _next_rendezvous(self, rdzv_handler: Any) -> Any:
        """``rdzv_handler.next_rendezvous()``, given up on a termination signal.

        A handler that can be left (ours: the signal's leave ends the join) is called directly. Any other may block
        where no signal reaches Python (the static backend's node waits in TCPStore's C++ connect for its master,
        up to the rendezvous timeout): it joins on a daemon thread while this one acts on a signal within a tenth of
        a second (AgentSignalError; the abandoned join ends with the process)."""
        if isinstance(rdzv_handler, LeavingHandler):
            return rdzv_handler.next_rendezvous()
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def join() -> None:
            try:
                outcome["info"] = rdzv_handler.next_rendezvous()
            except BaseException as e:  # noqa: BLE001 -- re-raised in the agent's thread
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=join, name="rendezvous-join", daemon=True).start()
        while not done.wait(0.1):
            self._check_signal()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["info"]

    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        """Join the next rendezvous round and take this node's group rank, store and master address from it."""
        spec = worker_group.spec
        info = self._next_rendezvous(spec.rdzv_handler)
        if isinstance(info, tuple):  # older handlers return (store, rank, world_size)
            store, group_rank, group_world_size = info
            bootstrap = None
        else:
            store, group_rank, group_world_size = info.store, info.rank, info.world_size
            bootstrap = getattr(info, "bootstrap_store_info", None)
        # The agent's own calls on the round's store (peer failures, the restart claim, the exit barrier) are bounded
        # by the handler's detection window: on a store host gone silent an unbounded call hung the monitor loop, so
        # it never reached the rendezvous calls that fail over to a successor (seen: live netns_store_host_isolated
        # ended at world size 3 when the cut landed on that call), and a store gone for good would hang it forever.
        window = detection_window(spec.rdzv_handler)
        self._store = BoundedStore(store, window, "the round's store") if store is not None and window else store
        # Round and job-wide restart count as the join saw them (our handler's extension: no store read, which
        # would move the whole O(N) state to every node once per round); otherwise read them.
        joined = _last_round(spec.rdzv_handler)
        rdzv_round = joined[0] if joined else self._read_round(spec.rdzv_handler)
        workers = self._assign_worker_ranks(store, group_rank, group_world_size, spec)
        worker_group.workers = workers
        worker_group.store = store
        worker_group.group_rank = group_rank
        worker_group.group_world_size = group_world_size
        worker_group.master_addr, worker_group.master_port = self._resolve_master(
            spec, store, group_rank, bootstrap
        )
        restart_count = joined[1] if joined and joined[1] is not None else self._read_job_restart_count(spec.rdzv_handler)
        # A completed round's participants can only shrink (newcomers wait outside it), so with the round known the
        # count alone reveals a change: no participant list to read now.
        self._decisions.joined(
            rdzv_round, group_world_size, restart_count,
            members=None if joined else self._read_members(spec.rdzv_handler), members_by_count=bool(joined),
        )
        self._emit(
            "agent.rendezvous",
            round=self._rdzv_round,
            group_rank=group_rank,
            group_world_size=group_world_size,
            restart_count=self._restart_count,
            detection_window_s=detection_window(spec.rdzv_handler),
        )
        logger.info(
            "[%s] rendezvous complete: group_rank=%s group_world_size=%s master=%s:%s",
            spec.role,
            group_rank,
            group_world_size,
            worker_group.master_addr,
            worker_group.master_port,
        )

    def _resolve_master(self, spec: WorkerSpec, store, group_rank: int, bootstrap) -> tuple[str, int]:
        if spec.master_addr is not None and spec.master_port is not None:
            return spec.master_addr, int(spec.master_port)
        # No fixed address: node 0 picks a FRESH port every round and tells the others through the round's store.
        # We deliberately do not hand the rendezvous store (bootstrap_store_info) to the workers: their process
        # group keys would live under /worker/attempt_<restart count>, which a membership restart does not change,
        # so re-formed workers would read the previous round's stale addresses (gloo "connection refused").
        if group_rank == 0:
            addr = spec.master_addr or spec.local_addr or _advertised_address(worker_group_size=self._worker_group.group_world_size)
            port = int(spec.master_port) if spec.master_port else _get_free_port()
            store.set(_MASTER_ADDR_KEY, addr.encode())
            store.set(_MASTER_PORT_KEY, str(port).encode())
            return addr, port
        _wait_for_keys(
            store, [_MASTER_ADDR_KEY, _MASTER_PORT_KEY], self._clock, self._store_wait_timeout, self._check_signal
        )
        return store.get(_MASTER_ADDR_KEY).decode(), int(store.get(_MASTER_PORT_KEY).decode())

    def _assign_worker_ranks(self, store, group_rank: int, group_world_size: int, spec: WorkerSpec) -> list[Worker]:
        """Assign global ranks, role ranks and role world sizes to this node's workers.

        Every agent publishes ``(role, local_world_size)`` under its group rank and reads everyone's; each then
        computes the same answer: nodes are ordered by group rank; a node's global ranks start after all workers of
        lower group ranks, its role ranks after all workers of the same role on lower group ranks. Deterministic
        for a given rendezvous outcome, O(N) store reads per agent.

        With ``TORCH_ELASTIC_WORKER_IDENTICAL=1`` (every node runs the same number of workers of the same role) the
        store is not used: global rank = group rank * local_world_size + local rank, and the role ranks and sizes
        are the global ones.
        """
        if os.environ.get(_WORKER_IDENTICAL_ENV, "0") == "1":
            # Every node runs local_world_size workers of this one role (the user vouches for it): the ranks follow
            # from the group rank alone, without a store round trip.
            world_size = group_world_size * spec.local_world_size
            base = group_rank * spec.local_world_size
            return [
                Worker(local_rank=lr, global_rank=base + lr, role_rank=base + lr, world_size=world_size,
                       role_world_size=world_size)
                for lr in range(spec.local_world_size)
            ]
        my_info = {"role": spec.role, "local_world_size": spec.local_world_size, "host": socket.gethostname()}
        store.set(_ROLE_INFO_KEY.format(group_rank=group_rank), json.dumps(my_info).encode())
        keys = [_ROLE_INFO_KEY.format(group_rank=r) for r in range(group_world_size)]
        _wait_for_keys(store, keys, self._clock, self._store_wait_timeout, self._check_signal)
        if hasattr(store, "multi_get"):
            raw = store.multi_get(keys)
        else:
            raw = [store.get(k) for k in keys]
        infos = [json.loads(bytes(v).decode()) for v in raw]
        world_size = sum(i["local_world_size"] for i in infos)
        global_base = sum(i["local_world_size"] for i in infos[:group_rank])
        same_role = [i for i in infos if i["role"] == spec.role]
        role_world_size = sum(i["local_world_size"] for i in same_role)
        role_base = sum(i["local_world_size"] for i in infos[:group_rank] if i["role"] == spec.role)
        return [
            Worker(
                local_rank=lr,
                global_rank=global_base + lr,
                role_rank=role_base + lr,
                world_size=world_size,
                role_world_size=role_world_size,
            )
            for lr in range(spec.local_world_size)
        ]

    def _initialize_workers(self, worker_group: WorkerGroup) -> None:
        """Rendezvous, then start the workers; leaves the group HEALTHY."""
        role = worker_group.spec.role
        logger.info("[%s] rendezvous for workers (restart_count=%s)", role, self._restart_count)
        self._rendezvous(worker_group)
        worker_ids = self._start_workers(worker_group)
        # ``{local_rank: id}`` for the workers that have an id (a worker left out keeps id None)
        for local_rank, worker_id in worker_ids.items():
            worker_group.workers[local_rank].id = worker_id
            self._record_worker_event("START", worker_group.workers[local_rank])
        worker_group.state = WorkerState.HEALTHY
        self._emit(
            "agent.workers_started",
            round=self._rdzv_round,
            group_rank=worker_group.group_rank,
            group_world_size=worker_group.group_world_size,
            restart_count=self._restart_count,
            ranks=[w.global_rank for w in worker_group.workers],
            pids=[w.id for w in worker_group.workers],
        )

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        """Stop the workers, re-rendezvous and start them again."""
        role = worker_group.spec.role
        logger.info("[%s] stopping workers for restart", role)
        self._stop_workers(worker_group)
        worker_group.state = WorkerState.STOPPED
        self._check_signal()
        self._initialize_workers(worker_group)

    def _exit_barrier(self) -> None:
        """Wait until every node's workers succeeded (so no node tears down the store under the others).

        Beyond upstream: the wait ends early when a peer published that the job failed, or (checked about once a
        second) when the run was closed, since the missing nodes will never arrive. ``_in_exit_barrier`` is True
        while it waits.
        """
        self._in_exit_barrier = True
        try:
            self._wait_at_exit_barrier()
        finally:
            self._in_exit_barrier = False

    def _wait_at_exit_barrier(self) -> None:
        rdzv_handler = self._worker_group.spec.rdzv_handler
        store = self._store
        group_world_size = self._worker_group.group_world_size
        if store is None or not group_world_size:
            return
        start = self._clock.monotonic()
        closed_checked_at = start
        try:
            store.add(_EXIT_BARRIER_KEY, 1)
            while True:
                arrived = store.add(_EXIT_BARRIER_KEY, 0)
                if arrived >= group_world_size:
                    logger.info("exit barrier passed (%s nodes)", arrived)
                    return
                if store.check([_JOB_FAILED_KEY]):
                    logger.warning("exit barrier skipped: a peer reported the job failed")
                    self._failed_by_peer = True
                    self._ack_peer_failure(store)
                    return
                self._check_signal()
                if self._clock.monotonic() - closed_checked_at >= 1.0:
                    closed_checked_at = self._clock.monotonic()
                    if self._run_closed(rdzv_handler):
                        if store.check([_JOB_FAILED_KEY]):  # published just before the failing node closed the run
                            logger.warning("exit barrier ended: a peer failed the job and closed the run")
                            self._failed_by_peer = True
                            self._ack_peer_failure(store)
                            return
                        logger.warning("exit barrier ended: the run was closed (%s of %s nodes arrived)", arrived,
                                       group_world_size)
                        return
                if self._clock.monotonic() - start > self._exit_barrier_timeout:
                    logger.error(
                        "exit barrier timed out after %ss (%s of %s nodes arrived)",
                        self._exit_barrier_timeout,
                        arrived,
                        group_world_size,
                    )
                    return
                self._clock.sleep(min(0.1, self._worker_group.spec.monitor_interval))
        except AgentSignalError:
            raise
        except Exception as e:
            # The store host may already be gone once everybody else left: nothing left to wait for.
            logger.warning("exit barrier ended by store error: %s", e)

    # ------------------------------------------------------------------ the loop

    def _invoke_run(self, role: str = DEFAULT_ROLE) -> RunResult:
        spec = self._worker_group.spec
        role = spec.role
        logger.info("[%s] starting workers for entrypoint: %s", role, spec.get_entrypoint_name())
        self._initialize_workers(self._worker_group)
        failure_pending = False  # the last decision left a failure waiting to be counted (RETRY_LATER)
        while True:
            self._check_signal()
            if not failure_pending:  # a failed group's exit event stays set: waiting on it would return at once
                self._wait_for_worker_event(spec.monitor_interval)
            self._check_signal()
            run_result = self._monitor_workers(self._worker_group)
            state = run_result.state
            self._worker_group.state = state
            self._put_metric(f"workers.{role}.remaining_restarts", self._remaining_restarts)
            self._put_metric(f"workers.{role}.{state.name.lower()}", 1)
            if state not in {WorkerState.SUCCEEDED, WorkerState.FAILED, WorkerState.UNHEALTHY, WorkerState.HEALTHY}:
                raise Exception(f"[{role}] Worker group in {state.name} state")  # upstream's wording
            if state in {WorkerState.UNHEALTHY, WorkerState.FAILED} and not failure_pending:
                self._emit_worker_failures(run_result)
            decision = self._decisions.step(state.value, self._clock, self._answer)
            action = decision.action
            if action == Action.RETRY_LATER:
                if not failure_pending:
                    logger.warning("[%s] %s", role, decision.reason)
                failure_pending = True
                self._clock.sleep(decision.retry_in)
                continue
            failure_pending = False
            if action == Action.KEEP_RUNNING:
                if decision.reason:  # riding out a store outage
                    logger.warning("[%s] rendezvous %s", role, decision.reason)
                continue
            if action == Action.REFORM:
                # WARNING: restarting loses the workers' progress since their last checkpoint; the default log level
                # must say why it happened.
                logger.warning("[%s] membership change (%s); restarting workers", role, decision.reason)
                self._emit("agent.membership_change", reason=decision.reason, restart_count=self._restart_count)
                self._restart_workers(self._worker_group)
                continue
            if action == Action.RESTART:
                self._emit("agent.restart", restart_count=self._restart_count + 1, reason="worker_failed")
                logger.info("[%s] worker group failed; restarting (%s/%s restarts left)", role,
                            self._remaining_restarts, spec.max_restarts)
                self._restart_workers(self._worker_group)
                continue
            if action == Action.SUCCEED:
                if decision.reason:
                    logger.warning("[%s] workers succeeded, but %s", role, decision.reason)
                return run_result
            if action == Action.STORE_LOST:
                raise decision.error  # type: ignore[misc]
            if action == Action.FAIL:
                logger.error("[%s] %s (job-wide restart count %s)", role, decision.reason, self._restart_count)
                self._stop_workers(self._worker_group)
                self._worker_group.state = WorkerState.FAILED
                self._publish_failure(run_result)
                return run_result
            # Action.PEER_FAILED_JOB: a job that failed elsewhere is never reported as a success here (the launcher
            # reports the peer's root cause).
            logger.error("[%s] %s; stopping", role, decision.reason)
            if state != WorkerState.SUCCEEDED:
                self._stop_workers(self._worker_group)
            self._worker_group.state = WorkerState.FAILED
            return run_result if state in {WorkerState.FAILED, WorkerState.UNHEALTHY} else RunResult(state=WorkerState.FAILED)

    # ------------------------------------------------------------------ answers to the decision stepper's asks

    def _answer(self, ask: Ask) -> Any:
        rdzv_handler = self._worker_group.spec.rdzv_handler
        if ask == Ask.PEER_FAILED:
            return self._peer_failed_job()
        if ask == Ask.CURRENT_ROUND:
            return self._read_round(rdzv_handler)
        if ask == Ask.RUN_CLOSED:
            return self._run_closed(rdzv_handler)
        if ask == Ask.EXIT_BARRIER:
            logger.info("[%s] workers succeeded; waiting at the exit barrier", self._worker_group.spec.role)
            self._exit_barrier()
            return self._failed_by_peer
        if ask == Ask.NODES_WAITING:
            try:
                return rdzv_handler.num_nodes_waiting()
            except Exception as e:
                # A connection error is an outage the healthy workers may ride out; anything else ends the agent.
                if not _is_rendezvous_connection_error(e):
                    raise
                return StoreUnavailable(e)
        if ask == Ask.PARTICIPANTS:
            return self._read_members(rdzv_handler)
        if ask == Ask.CLAIM_FAILURE_ROUND:
            return self._claim_failure_round(rdzv_handler)
        if ask == Ask.INCREMENT_RESTART_COUNT:
            return self._job_restart_counter_call(lambda: _incremented_count(rdzv_handler))
        if ask == Ask.RESTART_COUNT_ABOVE:
            return self._job_restart_counter_call(lambda: self._wait_for_restart_count_above(rdzv_handler))
        raise ValueError(f"unknown decision ask: {ask!r}")

    @staticmethod
    def _run_closed(rdzv_handler) -> bool:
        try:
            return bool(rdzv_handler.is_closed())
        except Exception as e:  # unknown: keep upstream's behaviour (wait at the barrier)
            logger.debug("could not read whether the run is closed: %s", e)
            return False

    @staticmethod
    def _read_members(rdzv_handler) -> tuple | None:
        # Optional rendezvous extension: the current participants, to notice a peer that left or died.
        if not isinstance(rdzv_handler, RoundReportingHandler):
            return None
        try:
            members = rdzv_handler.get_participants()
        except Exception as e:  # a transient store error is not a membership change
            logger.debug("could not read participants: %s", e)
            return None
        return tuple(members) if members is not None else None

    @staticmethod
    def _read_round(rdzv_handler) -> int | None:
        if not isinstance(rdzv_handler, RoundReportingHandler):
            return None
        try:
            return rdzv_handler.get_round()
        except Exception:
            return None

    def _read_job_restart_count(self, rdzv_handler) -> int | None:
        # A rendezvous-wide counter keeps every node's TORCHELASTIC_RESTART_COUNT equal and survives nodes
        # leaving and rejoining; without one (None) the stepper counts our own restarts like upstream.
        if not isinstance(rdzv_handler, RestartCountingHandler):
            return None
        try:
            return int(rdzv_handler.get_restart_count())
        except Exception as e:
            logger.warning("rendezvous restart counter unavailable (%s); using the local count", e)
            return None

    def _claim_failure_round(self, rdzv_handler) -> bool | None:
        """Whether this node is the first of its round to count a failure (None: no job-wide counter to count in)."""
        if not isinstance(rdzv_handler, RestartCountingHandler):
            return None
        return self._job_restart_counter_call(lambda: self._store is None or self._store.add(_RESTART_BUMP_KEY, 1) == 1)

    @staticmethod
    def _job_restart_counter_call(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:
            # The decision stepper waits for the counter (within the store outage window) rather than count locally.
            logger.debug("the rendezvous restart counter did not answer: %s", e)
            return StoreUnavailable(e)

    def _wait_for_restart_count_above(self, rdzv_handler) -> int:
        """The job-wide count once the round's claimant has bumped it past ours, or as it is after a short wait."""
        deadline = self._clock.monotonic() + _RESTART_BUMP_WAIT
        while True:
            count = int(rdzv_handler.get_restart_count())
            if count > self._restart_count or self._clock.monotonic() > deadline:
                return count
            self._clock.sleep(0.05)

    def _publish_failure(self, run_result: RunResult) -> None:
        """Tell the peers this node failed for good, with its root-cause failure (for their reports)."""
        root = _earliest_failure(run_result.failures)
        self._publish_failure_record(_failure_to_dict(*root) if root is not None else None)

    def _publish_failure_record(self, failure: dict[str, Any] | None) -> None:
        store = self._store
        if store is None:
            return
        try:
            if failure is not None:
                store.set(_FAILURE_KEY.format(group_rank=self._worker_group.group_rank), json.dumps(failure).encode())
            store.set(_JOB_FAILED_KEY, str(self._worker_group.group_rank).encode())
            self._last_failure_published = True
            # This node may host the store: give the peers a moment to read the root cause before it goes away.
            peers = (self._worker_group.group_world_size or 1) - 1
            deadline = self._clock.monotonic() + _FAILURE_ACK_TIMEOUT
            while peers > 0 and store.add(_FAILURE_ACK_KEY, 0) < peers and self._clock.monotonic() < deadline:
                self._clock.sleep(0.1)
        except Exception as e:
            logger.warning("could not publish the failure to peers: %s", e)

    def _publish_agent_error(self, error: BaseException) -> None:
        """Publish an error of this agent itself (not of its workers) as the job's failure, like a worker's."""
        if self._store is None or self._last_failure_published:
            return
        ranks = [w.global_rank for w in self._worker_group.workers if w.global_rank is not None and w.global_rank >= 0]
        rank = min(ranks) if ranks else -1 - (self._worker_group.group_rank or 0)
        agent = SimpleNamespace(  # the agent process itself, described like a failed worker
            pid=os.getpid(), exitcode=1,
            message=f"the elastic agent on {socket.getfqdn()} failed: {type(error).__name__}: {error}",
        )
        self._publish_failure_record(_failure_to_dict(rank, agent))

    def _peer_failed_job(self) -> bool:
        """Whether another node published that the job failed (the decision stepper paces these checks)."""
        store = self._store
        if store is None or self._last_failure_published:
            return False
        try:
            failed = store.check([_JOB_FAILED_KEY])
        except Exception as e:
            logger.debug("peer failure check failed: %s", e)
            return False
        if failed:
            self._failed_by_peer = True
            self._ack_peer_failure(store)
        return failed

    def _ack_peer_failure(self, store) -> None:
        if self._acked_peer_failure:
            return
        self._acked_peer_failure = True
        try:
            self.get_peer_failures()  # read the reports before acknowledging (the host may leave after)
            store.add(_FAILURE_ACK_KEY, 1)
        except Exception as e:
            logger.debug("could not acknowledge the peer failure: %s", e)

    def get_peer_failures(self) -> dict[int, dict[str, Any]]:
        """Root-cause failures other nodes published in this round: ``{global_rank: failure dict}``."""
        store = self._store
        group_world_size = self._worker_group.group_world_size or 0
        out = self._remote_failures  # cached: the store that held them may be gone by the time we report
        if store is None:
            return out
        for group_rank in range(group_world_size):
            if group_rank == self._worker_group.group_rank:
                continue
            try:
                raw = _store_try_get(store, _FAILURE_KEY.format(group_rank=group_rank))
            except Exception:
                break  # store gone: report what we have
            if raw:
                info = json.loads(bytes(raw).decode())
                out[int(info["rank"])] = info
        return out

    # ------------------------------------------------------------------ events and metrics

    def _emit(self, name: str, **metadata: Any) -> None:
        spec = self._worker_group.spec
        md: dict[str, Any] = {
            "run_id": _safe_run_id(spec.rdzv_handler),
            "node_id": self._node_id,
            "role": spec.role,
        }
        md.update(metadata)
        try:
            from elastic_impl import events

            event = events.Event(name=name, source=events.EventSource.AGENT, metadata=md)
            events.record(event, spec.event_log_handler)
        except ImportError:
            logger.debug("events module unavailable; event %s not recorded", name)
        except Exception as e:  # an event sink must never break the agent
            logger.warning("could not record event %s: %s", name, e)

    def _emit_worker_failures(self, run_result: RunResult) -> None:
        for rank, failure in sorted(run_result.failures.items()):
            exitcode = getattr(failure, "exitcode", None)
            sig = None
            if exitcode is not None and exitcode < 0:
                try:
                    sig = signal.Signals(-exitcode).name
                except ValueError:
                    sig = str(-exitcode)
            self._emit(
                "agent.worker_failed",
                round=self._rdzv_round,
                group_rank=self._worker_group.group_rank,
                restart_count=self._restart_count,
                rank=rank,
                local_rank=getattr(failure, "local_rank", None),
                exitcode=exitcode,
                signal=sig,
            )

    def get_event_failed(self) -> Event:
        """This agent's ``torchelastic.worker.status.FAILED`` event; its raw_error is the traceback of the exception
        being handled (the launcher calls it from its ``except`` block)."""
        return self._status_event("FAILED", raw_error=traceback.format_exc())

    def get_event_succeeded(self) -> Event:
        """This agent's ``torchelastic.worker.status.SUCCEEDED`` event."""
        return self._status_event("SUCCEEDED")

    @contextmanager
    def record_duration(self, state: str) -> Iterator[None]:
        """Time the block and record a ``torchelastic.worker.status.<state>`` agent event whose ``duration_ms`` says how
        long it took, to the spec's event log handler; recorded also when the block raises."""
        start = self._clock.monotonic()
        try:
            yield
        finally:
            duration_ms = (self._clock.monotonic() - start) * 1000
            try:  # never replace the block's own exception (or fail a block that succeeded) over an event sink
                record(self._status_event(state, duration_ms=duration_ms), self._worker_group.spec.event_log_handler)
            except Exception as e:
                logger.warning("event torchelastic.worker.status.%s not recorded: %s", state, e)

    def _record_worker_events(self, result: RunResult) -> None:
        """One ``torchelastic.worker.status.<STATE>`` event per worker of the final result (source WORKER), as
        upstream records them (and START for each worker started): exit code, pid and error file for a failed
        worker; TERMINATED for one the agent stopped because of another's failure. Never fails the run."""
        for worker in self._worker_group.workers:
            failure = result.failures.get(worker.global_rank)
            if failure is not None:
                state = result.state.value
            elif result.state in {WorkerState.UNHEALTHY, WorkerState.FAILED}:
                state = "TERMINATED"  # stopped by the agent, not failed on its own
            else:
                state = result.state.value
            self._record_worker_event(state, worker, failure)

    def _record_worker_event(self, state: str, worker: Worker, failure: Any = None) -> None:
        """A ``torchelastic.worker.status.<state>`` event of ``worker`` (source WORKER) to the event log handler."""
        try:
            event = self._status_event(
                state, source=EventSource.WORKER, worker=worker,
                raw_error=json.dumps(failure.error_file_data) if failure is not None else None,
                exit_code=failure.exitcode if failure is not None else None,
                worker_pid=failure.pid if failure is not None else None,
            )
            record(event, self._worker_group.spec.event_log_handler)
        except Exception as e:  # an event sink must never break the agent
            logger.warning("event torchelastic.worker.status.%s of rank %s not recorded: %s", state,
                           worker.global_rank, e)

    def _status_event(self, state: str, raw_error: str | None = None, duration_ms: float | None = None,
                      source: EventSource = EventSource.AGENT, worker: Worker | None = None,
                      exit_code: int | None = None, worker_pid: int | None = None) -> Event:
        # The status event (upstream's field set, so event consumers written for torchrun read it). Per-worker
        # fields are one-element lists in the JSON details, as upstream writes them.
        group = self._worker_group
        spec = group.spec
        details: dict[str, Any] = {"group_world_size": group.group_world_size,
                                   "entry_point": spec.get_entrypoint_name()}
        if worker is not None:
            details.update(local_rank=[worker.local_rank], role_rank=[worker.role_rank],
                           role_world_size=[worker.role_world_size], exit_code=[exit_code], worker_pid=[worker_pid])
        metadata = {
            "run_id": _safe_run_id(spec.rdzv_handler),
            "global_rank": worker.global_rank if worker is not None else None,
            "group_rank": group.group_rank,
            "worker_id": str(worker.id) if worker is not None else None,
            "role": spec.role,
            "hostname": _fq_hostname(),
            "state": state,
            "total_run_time": self._total_execution_time,
            "rdzv_backend": spec.rdzv_handler.get_backend(),
            "raw_error": raw_error,
            "metadata": json.dumps(details),
            "agent_restarts": spec.max_restarts - self._remaining_restarts,
            "duration_ms": duration_ms,
        }
        return Event(f"torchelastic.worker.status.{state}", source=source, metadata=metadata)

    def _put_metric(self, name: str, value: int) -> None:
        try:
            from elastic_impl.metrics import put_metric

            put_metric(name, value)
        except ImportError:
            pass
        except Exception as e:
            logger.debug("could not put metric %s: %s", name, e)

    def _record_metrics(self, group_results: RunResult) -> None:
        role = self._worker_group.spec.role
        failed = group_results.is_failed()
        restarted = self._remaining_restarts != self._worker_group.spec.max_restarts
        self._put_metric(f"workers.{role}.run_success_with_retries", int(not failed and restarted))
        self._put_metric(f"workers.{role}.run_success_no_retries", int(not failed and not restarted))
        self._put_metric(f"workers.{role}.run_failed_with_retries", int(failed and restarted))
        self._put_metric(f"workers.{role}.run_failed_no_retries", int(failed and not restarted))


def _is_rendezvous_error_of(error: BaseException, *classes: type) -> bool:
    """``isinstance(error, classes)``, also for upstream's rendezvous errors of the same names (matched by class name,
    as this package must not import upstream's), which its own handlers raise when the agent runs with one of them,
    and for subclasses of either."""
    if isinstance(error, classes):
        return True
    names = {c.__name__ for c in classes}
    return any(cls.__name__ in names for cls in type(error).__mro__)


def _is_rendezvous_connection_error(error: BaseException) -> bool:
    """Whether ``error`` says the rendezvous store cannot be reached (ours or upstream's class)."""
    return _is_rendezvous_error_of(error, RendezvousConnectionError)


def _advertised_address(worker_group_size: int | None) -> str:
    """This node's address for the workers' MASTER_ADDR: the FQDN like upstream, but only if it resolves.

    A host whose FQDN does not resolve (common in containers) would make every worker fail to connect; then the
    plain hostname is tried, and for a single-node job loopback, which its workers can always reach.
    """
    for name in (socket.getfqdn(), socket.gethostname()):
        try:
            if name and socket.getaddrinfo(name, None):
                return name
        except OSError:
            continue
    if (worker_group_size or 1) == 1:
        return "127.0.0.1"
    raise RuntimeError(
        f"cannot advertise an address for the workers: neither {socket.getfqdn()!r} nor {socket.gethostname()!r} "
        "resolves; pass --local-addr with an address the other nodes can reach"
    )


def _incremented_count(rdzv_handler) -> int:
    bumped = rdzv_handler.increment_restart_count()
    return bumped if isinstance(bumped, int) else int(rdzv_handler.get_restart_count())


def _safe_run_id(rdzv_handler) -> str:
    try:
        return rdzv_handler.get_run_id()
    except Exception:
        return ""


def _earliest_failure(failures: dict[int, Any]):
    if not failures:
        return None
    return min(failures.items(), key=lambda kv: (getattr(kv[1], "timestamp", 0) or 0, kv[0]))


def _failure_to_dict(rank: int, failure: Any) -> dict[str, Any]:
    message = getattr(failure, "message", "")
    if isinstance(message, dict):  # error-file contents: prefer the worker's traceback
        extra = message.get("extraInfo") or {}
        message = extra.get("py_callstack") or message.get("message") or json.dumps(message)
    return {
        "rank": rank,
        "local_rank": getattr(failure, "local_rank", None),
        "pid": getattr(failure, "pid", None),
        "exitcode": getattr(failure, "exitcode", None),
        "timestamp": getattr(failure, "timestamp", None) or int(time.time()),
        "message": str(message),
        "host": socket.getfqdn(),
        "error_file": getattr(failure, "error_file", "") or "",
        "stderr_file": getattr(failure, "stderr_file", None),
        # the last lines of the worker's stderr travel with the report: the peer cannot read our files
        "stderr_tail": list(getattr(failure, "stderr_tail", None) or [])[-20:],
    }


@functools.lru_cache(maxsize=1)
def _fq_hostname() -> str:
    """This host's fully qualified name, resolved once: getfqdn can block on a reverse DNS lookup, and status events
    are recorded for every worker at every start."""
    return socket.getfqdn(socket.gethostname())
