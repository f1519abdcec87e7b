"""Programmatic launcher: ``LaunchConfig``, ``elastic_launch`` and ``launch_agent``.

Public names and signatures follow ``torch.distributed.launcher.api``.

Rendezvous lifetime: a job that ENDS (success, or failure after the restarts ran out) closes the rendezvous so
every node stops; an agent stopped by a signal only LEAVES it, so the surviving nodes re-form without it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elastic_impl.agent.server.api import WorkerSpec
from elastic_impl.agent.server.local_elastic_agent import LocalElasticAgent, shutdown_grace_from_env
from elastic_impl.multiprocessing.api import SIGNALS_TO_HANDLE_ENV, parse_signals_to_handle
from elastic_impl.multiprocessing.errors import ChildFailedError
from elastic_impl.multiprocessing.numa_binding import affinity_mode_of
from elastic_impl.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousGracefulExitError,
)
from elastic_impl.rendezvous.extensions import LeavingHandler, detection_window
from elastic_impl.rendezvous.options import RendezvousOptions, node_count_problem

__all__ = ["LaunchConfig", "elastic_launch", "launch_agent", "LaunchConfigError"]

logger = logging.getLogger(__name__)

_DEFAULT_RDZV_TIMEOUT = 900


class LaunchConfigError(ValueError):
    """The launch configuration is invalid (the CLI reports it on one line and exits with code 2)."""


@dataclass
class LaunchConfig:
    """Everything ``launch_agent`` needs to start one node's agent (see torchrun's options for meanings)."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    logs_specs: Any = None
    run_id: str = ""
    role: str = "default_role"
    rdzv_endpoint: str = ""
    rdzv_backend: str = "etcd"
    rdzv_configs: dict[str, Any] = field(default_factory=dict)
    rdzv_timeout: int = -1
    max_restarts: int = 3
    monitor_interval: float = 0.1
    start_method: str = "spawn"
    log_line_prefix_template: str | None = None
    metrics_cfg: dict[str, str] = field(default_factory=dict)
    local_addr: str | None = None
    event_log_handler: str = "null"
    numa_options: Any = None
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    duplicate_stdout_filters: list[str] | None = None
    duplicate_stderr_filters: list[str] | None = None
    virtual_local_rank: bool = False
    shutdown_timeout: float | None = None
    prewarm: bool | None = None  # beyond upstream: pre-warmed worker interpreters (None: ELASTIC_IMPL_PREWARM)

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> LaunchConfigError:
            return LaunchConfigError(f"invalid {name}: {value!r} ({allowed})")

        for name in ("min_nodes", "max_nodes", "nproc_per_node", "max_restarts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(name, value, "must be an int")
        problem = node_count_problem(self.min_nodes, self.max_nodes)
        if problem:
            raise bad(problem[0], getattr(self, problem[0]), problem[1])
        if self.nproc_per_node < 1:
            raise bad("nproc_per_node", self.nproc_per_node, "must be >= 1")
        if self.max_restarts < 0:
            raise bad("max_restarts", self.max_restarts, "must be >= 0")
        if not isinstance(self.monitor_interval, (int, float)) or self.monitor_interval <= 0:
            raise bad("monitor_interval", self.monitor_interval, "must be a number of seconds > 0")
        if self.start_method not in ("spawn", "fork", "forkserver"):
            raise bad("start_method", self.start_method, "allowed: spawn, fork, forkserver")
        if not self.role:
            raise bad("role", self.role, "must be a non-empty string")
        if self.shutdown_timeout is not None and self.shutdown_timeout < 0:
            raise bad("shutdown_timeout", self.shutdown_timeout, "must be >= 0 seconds")
        try:
            parse_signals_to_handle(self.signals_to_handle)
            if self.numa_options is not None:
                affinity_mode_of(self.numa_options)
        except ValueError as e:
            raise LaunchConfigError(str(e)) from None
        for name in ("duplicate_stdout_filters", "duplicate_stderr_filters"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise bad(name, value, "must be a list of strings, or None")
        from elastic_impl.events.handlers import known_destinations

        # here, not at the agent's first event: an unknown one would silently drop every event of the run
        if self.event_log_handler not in known_destinations():
            raise bad("event_log_handler", self.event_log_handler, f"allowed: {known_destinations()}")
        if not isinstance(self.virtual_local_rank, bool):
            raise bad("virtual_local_rank", self.virtual_local_rank, "must be True or False")
        if self.rdzv_timeout != -1:
            self.rdzv_configs["timeout"] = self.rdzv_timeout
        else:
            self.rdzv_configs.setdefault("timeout", _DEFAULT_RDZV_TIMEOUT)
        if self.logs_specs is None:
            from elastic_impl.multiprocessing import DefaultLogsSpecs

            self.logs_specs = DefaultLogsSpecs()


class elastic_launch:  # noqa: N801  (lower-case name kept from upstream)
    """Launch ``entrypoint`` on this node under an elastic agent: ``elastic_launch(config, fn)(*args)``.

    Returns ``{global_rank: return value}`` of this node's workers (None values for command entrypoints).
    """

    def __init__(self, config: LaunchConfig, entrypoint: Callable | str | None, health_check_server: Any = None):
        self._config = config
        self._entrypoint = entrypoint
        self._health_check_server = health_check_server

    def __call__(self, *args):
        return launch_agent(self._config, self._entrypoint, list(args), self._health_check_server)


def _entrypoint_name(entrypoint: Callable | str | None, args: list[Any]) -> str:
    """The name to show in failure reports: the script for ``python script.py``, else the command/function."""
    if isinstance(entrypoint, Callable):  # type: ignore[arg-type]
        return getattr(entrypoint, "__name__", str(entrypoint))
    if isinstance(entrypoint, str):
        if entrypoint == sys.executable:
            return next((a for a in args if isinstance(a, str) and not a.startswith("-")), "")
        return entrypoint
    return ""


def _static_master(params) -> tuple[str | None, int | None]:
    # For the static backend the endpoint IS the master address; dynamic backends pick one at rendezvous.
    if params.backend != "static":
        return None, None
    from elastic_impl.rendezvous.static_tcp_rendezvous import static_master

    try:
        return static_master(params.endpoint)
    except ValueError as e:
        raise LaunchConfigError(str(e)) from None


def split_endpoint(endpoint: str, default_port: int | None) -> tuple[str, int | None]:
    """``parse_rendezvous_endpoint`` (the one endpoint parser) with its error as a LaunchConfigError."""
    from elastic_impl.rendezvous.utils import parse_rendezvous_endpoint

    try:
        return parse_rendezvous_endpoint(endpoint, default_port)
    except ValueError as e:
        raise LaunchConfigError(str(e)) from None


# Options the launcher itself puts into every rendezvous config; a backend may have no use for them.
_LAUNCHER_RDZV_OPTIONS = frozenset({"timeout", "rank"})


def _warn_unread_rdzv_options(params) -> None:
    """Name the --rdzv-conf options the backend never asked for: torchrun ignores them silently, so a misspelt
    option (``join_timout=600``) quietly runs with the default."""
    from elastic_impl.rendezvous.api import unread_options

    unread = [key for key in unread_options(params) if key not in _LAUNCHER_RDZV_OPTIONS]
    if unread:
        logger.warning("rendezvous backend %r does not use --rdzv-conf option(s) %s; they have no effect (misspelt?)",
                       params.backend, ", ".join(repr(k) for k in unread))


_ALLOWED_BY_KIND = {"boolean": "1/0, true/false, t/f, yes/no, y/n", "integer": "an integer"}


def _with_bad_value(message: str, params) -> str:
    """The API's error for a bad option value is upstream's wording, which names neither the value nor what is
    allowed; the CLI adds both."""
    match = re.search(r"option '([^']+)' does not represent a valid (boolean|integer) value", message)
    if not match:
        return message
    key, kind = match.groups()
    return f"{message.rstrip('.')}: got {params.config.get(key)!r} (allowed: {_ALLOWED_BY_KIND[kind]})"


def _peer_failures_as_process_failures(agent: LocalElasticAgent) -> dict[int, Any]:
    """Turn the root-cause failures published by other nodes into ProcessFailure objects for the report."""
    out: dict[int, Any] = {}
    try:
        peers = agent.get_peer_failures()
    except Exception as e:
        logger.debug("could not read peer failures: %s", e)
        return out
    if not peers:
        return out
    from elastic_impl.multiprocessing.errors import ProcessFailure

    for rank, info in peers.items():
        failure = ProcessFailure(
            local_rank=info.get("local_rank") or 0,
            pid=info.get("pid") or -1,
            exitcode=info.get("exitcode") if info.get("exitcode") is not None else 1,
            error_file="",
        )
        failure.timestamp = int(info.get("timestamp") or failure.timestamp)
        failure.message = str(info.get("message") or "")
        failure.host = info.get("host")  # type: ignore[attr-defined]  (the report names the node it happened on)
        failure.stderr_file = info.get("stderr_file")
        failure.stderr_tail = list(info.get("stderr_tail") or [])
        if info.get("error_file") and info["error_file"] != "<N/A>":  # "<N/A>": the worker wrote no error file
            failure.error_file = f"{info['error_file']} (on {info.get('host')})"
            failure.error_file_data = {"message": failure.message}  # read there, carried here
        out[rank] = failure
    return out


def _job_failed_error(name: str, agent: LocalElasticAgent, local_failures: dict[int, Any]):
    """The ChildFailedError for a failed job, with the JOB's root cause (which may be another node's).

    Every node that fails for good publishes its earliest failure in the round's store (see the agent). When a
    peer ended the job, that peer's failure is the root cause here too: our own workers' failures (a broken
    collective, or being stopped) came after it, even where whole-second timestamps tie.
    """
    from elastic_impl.multiprocessing.errors import ProcessFailure

    peer_failures = _peer_failures_as_process_failures(agent)
    failures = dict(local_failures)
    for rank, failure in peer_failures.items():
        failures.setdefault(rank, failure)
    root_rank = None
    if getattr(agent, "_failed_by_peer", False) and peer_failures:
        root_rank = min(peer_failures, key=lambda r: (peer_failures[r].timestamp, r))
    if not failures:
        failure = ProcessFailure(local_rank=0, pid=-1, exitcode=1, error_file="")
        failure.message = "another node ended the job as failed, and its failure report could not be read"
        failures[-1] = failure
    return JobFailedError(name=name, failures=failures, root_rank=root_rank)


class JobFailedError(ChildFailedError):
    """A ChildFailedError whose root cause may be fixed to a given rank (another node's failure)."""

    def __init__(self, name: str, failures: dict[int, Any], root_rank: int | None = None):
        self.root_rank = root_rank  # set first: the base class formats the message in its __init__
        super().__init__(name=name, failures=failures)

    def get_first_failure(self):
        if self.root_rank is not None and self.root_rank in self.failures:
            return self.root_rank, self.failures[self.root_rank]
        return super().get_first_failure()


def launch_agent(
    config: LaunchConfig,
    entrypoint: Callable | str | None,
    args: list[Any],
    health_check_server: Any = None,
) -> dict[int, Any]:
    """Run one node's agent for ``entrypoint(*args)`` to the end; raise ChildFailedError if the job failed."""
    from elastic_impl.rendezvous import rendezvous_handler_registry

    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
        logger.warning("config has no run_id; generated a random one: %s", config.run_id)
    entrypoint_name = _entrypoint_name(entrypoint, args)
    try:
        # Built once, here, for the CLI and the API alike: every bad option is found before anything starts.
        rdzv_parameters = RendezvousOptions.build(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            local_addr=config.local_addr,
            config=config.rdzv_configs,
        ).parameters()
    except ValueError as e:
        raise LaunchConfigError(str(e)) from None
    master_addr, master_port = _static_master(rdzv_parameters)
    try:
        rdzv_handler = rendezvous_handler_registry.create_handler(rdzv_parameters)
    except (ValueError, KeyError) as e:
        raise LaunchConfigError(_with_bad_value(str(e).strip("'\""), rdzv_parameters)) from None
    _warn_unread_rdzv_options(rdzv_parameters)
    window = detection_window(rdzv_handler)
    if window is not None:
        logger.info("rendezvous %s: a node silent for %.3g s is dropped and the others re-form", config.run_id, window)

    spec = WorkerSpec(
        role=config.role,
        local_world_size=config.nproc_per_node,
        entrypoint=entrypoint,
        args=tuple(args),
        rdzv_handler=rdzv_handler,
        max_restarts=config.max_restarts,
        monitor_interval=config.monitor_interval,
        master_addr=master_addr,
        master_port=master_port,
        local_addr=config.local_addr,
        event_log_handler=config.event_log_handler,
        numa_options=config.numa_options,
        duplicate_stdout_filters=config.duplicate_stdout_filters,
        duplicate_stderr_filters=config.duplicate_stderr_filters,
        virtual_local_rank=config.virtual_local_rank,
    )
    # The agent and its worker contexts read the signals to handle from the environment (the workers inherit it,
    # as under torchrun).
    os.environ[SIGNALS_TO_HANDLE_ENV] = config.signals_to_handle
    grace = config.shutdown_timeout if config.shutdown_timeout is not None else shutdown_grace_from_env()
    agent = LocalElasticAgent(
        spec=spec,
        logs_specs=config.logs_specs,
        start_method=config.start_method,
        log_line_prefix_template=config.log_line_prefix_template,
        shutdown_timeout=grace,
        health_check_server=health_check_server,
        prewarm=config.prewarm,
    )
    job_ended = True
    try:
        result = agent.run()
        if result.is_failed():
            raise _job_failed_error(entrypoint_name, agent, result.failures)
        return result.return_values
    except ChildFailedError:
        raise
    except Exception as e:
        if getattr(e, "sigval", None) is not None:
            job_ended = False  # this node leaves; the job goes on without it
            raise
        if isinstance(e, (RendezvousGracefulExitError, RendezvousConnectionError)):
            # Leaving, or this node lost the store: not the job's end. Closing the run on a connection error would
            # end the job for every node that can still reach the store (it may be this node's network alone).
            job_ended = False
            raise
        if isinstance(e, RendezvousClosedError):
            # A peer ended the job while we were re-forming: report its root cause if it left one.
            if _peer_failures_as_process_failures(agent):
                raise _job_failed_error(entrypoint_name, agent, {}) from None
        raise
    finally:
        _release_rendezvous(rdzv_handler, close=job_ended)


def _release_rendezvous(rdzv_handler, close: bool) -> None:
    """End this node's part in the rendezvous.

    ``close``: the job ended (success, or restarts exhausted): ``shutdown()`` closes the run for every node, as
    upstream's does. Otherwise this node leaves (agent stopped by a signal): ``leave()`` where the handler offers
    it (a :class:`LeavingHandler`; ours: the others re-form without this node), else ``shutdown()`` (a handler
    without ``leave`` has nothing finer to offer; the static one, for instance).
    """
    try:
        if close or not isinstance(rdzv_handler, LeavingHandler):
            rdzv_handler.shutdown()
        else:
            rdzv_handler.leave()
    except Exception as e:  # the store host may be gone already; nothing more to release
        logger.debug("rendezvous release (close=%s) failed: %s", close, e)

