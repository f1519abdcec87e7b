"""Differential edge cases of ``agent.server.*`` and ``control_plane.worker_main`` (issue 17.10).

Every case runs on both implementations (see ``harness.py``); observations are plain values. Agents built here use
a stub rendezvous handler over an in-process ``HashStore`` (a world of one, or several agents in threads), with
tiny timeouts; agents that start real workers run ``/bin/sh`` commands and are shut down in ``finally``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tests.differential.harness import case, module, outcome, same_behaviour_test

# ---------------------------------------------------------------------------------------------- helpers


def _store(timeout: float = 2.0):
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=timeout))
    return store


class _Handler:
    """A rendezvous handler stub: every next_rendezvous() gives ``rank``/``world_size`` over ``store``."""

    def __init__(self, root: str, store, rank: int = 0, world_size: int = 1, waiting: list[int] | None = None,
                 raise_on_next: BaseException | None = None):
        api = module(root, "rendezvous.api")
        self._info = lambda: api.RendezvousInfo(store, rank, world_size, api.RendezvousStoreInfo("10.9.8.7", 29123))
        self.waiting = list(waiting or [])
        self.raise_on_next = raise_on_next
        self.calls: list[str] = []

    def next_rendezvous(self):
        self.calls.append("next_rendezvous")
        if self.raise_on_next is not None:
            raise self.raise_on_next
        return self._info()

    def get_run_id(self) -> str:
        return "run"

    def get_backend(self) -> str:
        return "stub"

    def num_nodes_waiting(self) -> int:
        self.calls.append("num_nodes_waiting")
        return self.waiting.pop(0) if self.waiting else 0

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        self.calls.append("set_closed")

    def shutdown(self) -> bool:
        self.calls.append("shutdown")
        return True

    @property
    def use_agent_store(self) -> bool:
        return True


def _entry(x=None):
    return x


def _spec(root: str, handler: Any = None, **overrides):
    api = module(root, "agent.server.api")
    args = {"role": "trainer", "local_world_size": 2, "rdzv_handler": handler, "entrypoint": "/bin/true", **overrides}
    return api.WorkerSpec(**args)


def _stub_agent(root: str, spec, states: list[str] | None = None, ids: dict | None = None, **kwargs):
    """A SimpleElasticAgent whose workers are fake: _monitor_workers reports ``states`` in turn (then SUCCEEDED)."""
    api = module(root, "agent.server.api")
    script = list(states or [])

    class StubAgent(api.SimpleElasticAgent):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.log: list[Any] = []

        def _start_workers(self, worker_group):
            self.log.append(("start", worker_group.state.value, worker_group.group_rank))
            return dict(ids) if ids is not None else {w.local_rank: 1000 + w.local_rank for w in worker_group.workers}

        def _stop_workers(self, worker_group):
            self.log.append(("stop", worker_group.state.value))

        def _monitor_workers(self, worker_group):
            state = script.pop(0) if script else "SUCCEEDED"
            self.log.append(("monitor", state))
            if state == "SIGTERM":
                raise module(root, "multiprocessing.api").SignalException("sig", signal.SIGTERM)
            if state == "FAILED_NO_MORE_RESTARTS":  # upstream LocalElasticAgent's way to disable restarts
                self._remaining_restarts = 0
                state = "FAILED"
            if state == "SUCCEEDED_NO_VALUES":
                return api.RunResult(state=api.WorkerState.SUCCEEDED)
            if state == "FAILED_RANK1":  # rank 1 failed on its own (exit 3, no error file); rank 0 was stopped
                errors = module(root, "multiprocessing.errors")
                failure = errors.ProcessFailure(local_rank=1, pid=4242, exitcode=3, error_file="/nonexistent/e.json")
                return api.RunResult(state=api.WorkerState.FAILED, failures={1: failure})
            values = {w.global_rank: f"r{w.global_rank}" for w in worker_group.workers} if state == "SUCCEEDED" else {}
            return api.RunResult(state=api.WorkerState(state), return_values=values)

        def _shutdown(self, death_sig=signal.SIGTERM, timeout=30):
            self.log.append(("shutdown", signal.Signals(death_sig).name, timeout))

    return StubAgent(spec, **kwargs)


def _workers(workers) -> list[str]:
    return [str(w) for w in workers]


# ---------------------------------------------------------------------------------------------- WorkerSpec


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_defaults(root, tmp):
    spec = _spec(root)
    names = [f.name for f in dataclasses.fields(spec)]
    return names, {n: getattr(spec, n) for n in names if n != "rdzv_handler"}


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_repr_and_equality(root, tmp):
    a, b = _spec(root, "h", args=("x",)), _spec(root, "h", args=("x",))
    return repr(a).replace(root, "ROOT"), a == b, a == _spec(root, "h", args=("y",))


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_rejects_nonpositive_sizes(root, tmp):
    return [
        outcome(lambda kw=kw: _spec(root, **kw), compare_message=False)
        for kw in ({"local_world_size": 0}, {"local_world_size": -1}, {"monitor_interval": 0},
                   {"monitor_interval": -0.5}, {"entrypoint": None}, {"entrypoint": ""})
    ]


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_negative_max_restarts(root, tmp):
    return outcome(lambda: _spec(root, max_restarts=-1).max_restarts, compare_message=False)


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_zero_max_restarts(root, tmp):
    return outcome(lambda: _spec(root, max_restarts=0).max_restarts)


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_entrypoint_neither_callable_nor_str(root, tmp):
    return outcome(lambda: _spec(root, entrypoint=42).get_entrypoint_name(), compare_message=False)


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_master_port_out_of_range(root, tmp):
    return [outcome(lambda p=p: _spec(root, master_port=p).master_port, compare_message=False) for p in (-1, 70000)]


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_fn_is_deprecated_alias(root, tmp):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = _spec(root, entrypoint=None, fn=_entry)
    return (spec.entrypoint is _entry, spec.fn is _entry,
            [(w.category.__name__, str(w.message), Path(w.filename).name) for w in caught])


@case("agent.server.WorkerSpec")
def case_agent_worker_spec_fn_overrides_entrypoint(root, tmp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = _spec(root, entrypoint="/bin/echo", fn=_entry)
    return spec.entrypoint is _entry, spec.get_entrypoint_name()


@case("agent.server.WorkerSpec", "agent.server.WorkerSpec.get_entrypoint_name")
def case_agent_worker_spec_entrypoint_name_of_str(root, tmp):
    return [_spec(root, entrypoint=e).get_entrypoint_name()
            for e in ("/usr/bin/python3", "train.py", "bin/", "a b/c d", "python -u x.py")]


class _Entrypoints:
    def method(self):
        return None

    @staticmethod
    def static():
        return None


@case("agent.server.WorkerSpec", "agent.server.WorkerSpec.get_entrypoint_name")
def case_agent_worker_spec_entrypoint_name_of_callables(root, tmp):
    def local():
        return None

    return [_spec(root, entrypoint=e).get_entrypoint_name()
            for e in (_entry, local, _Entrypoints.method, _Entrypoints().method, _Entrypoints.static, print,
                      lambda: None, _Entrypoints)]


@case("agent.server.WorkerSpec", "agent.server.WorkerSpec.get_entrypoint_name")
def case_agent_worker_spec_entrypoint_name_without_qualname(root, tmp):
    class Callable:
        def __call__(self):
            return None

    return [outcome(lambda e=e: _spec(root, entrypoint=e).get_entrypoint_name(), compare_message=False)
            for e in (functools.partial(_entry, 1), Callable())]


# ---------------------------------------------------------------------------------------------- Worker, WorkerState


@case("agent.server.Worker")
def case_agent_worker_defaults_and_str(root, tmp):
    api = module(root, "agent.server.api")
    worker = api.Worker(local_rank=3)
    return (worker.id, worker.local_rank, worker.global_rank, worker.role_rank, worker.world_size,
            worker.role_world_size, str(worker), repr(worker))


@case("agent.server.Worker")
def case_agent_worker_explicit_ranks_repr(root, tmp):
    api = module(root, "agent.server.api")
    worker = api.Worker(1, global_rank=5, role_rank=2, world_size=8, role_world_size=4)
    worker.id = 4242
    return str(worker), repr(worker), f"{[worker]}"


@case("agent.server.Worker")
def case_agent_worker_slots_and_equality(root, tmp):
    api = module(root, "agent.server.api")
    a, b = api.Worker(0), api.Worker(0)

    def set_unknown():
        a.pid = 1

    return sorted(api.Worker.__slots__), a == b, a == a, outcome(set_unknown, compare_message=False)


@case("agent.server.WorkerState", "agent.server.WorkerState.is_running")
def case_agent_worker_state_members_and_is_running(root, tmp):
    state = module(root, "agent.server.api").WorkerState
    return [(s.name, s.value, state.is_running(s), s == s.value, f"{s}", str(s)) for s in state]


@case("agent.server.WorkerState", "agent.server.WorkerState.is_running")
def case_agent_worker_state_lookup_and_odd_inputs(root, tmp):
    state = module(root, "agent.server.api").WorkerState
    return (outcome(lambda: state("FAILED").name), outcome(lambda: state("failed")), outcome(lambda: state["HEALTHY"]),
            state.is_running("HEALTHY"), state.is_running(None), state.is_running("bogus"))


# ---------------------------------------------------------------------------------------------- WorkerGroup, RunResult


@case("agent.server.WorkerGroup")
def case_agent_worker_group_initial_state(root, tmp):
    api = module(root, "agent.server.api")
    spec = _spec(root, local_world_size=3)
    group = api.WorkerGroup(spec)
    return (group.spec is spec, _workers(group.workers), group.store, group.group_rank, group.group_world_size,
            group.master_addr, group.master_port, group.state.value, sorted(api.WorkerGroup.__slots__))


@case("agent.server.WorkerGroup")
def case_agent_worker_group_workers_are_fresh(root, tmp):
    api = module(root, "agent.server.api")
    spec = _spec(root)
    a, b = api.WorkerGroup(spec), api.WorkerGroup(spec)
    return a.workers[0] is b.workers[0], a.workers is b.workers, [w.id for w in a.workers]


@case("agent.server.api.RunResult")
def case_agent_run_result_defaults_and_is_failed(root, tmp):
    api = module(root, "agent.server.api")
    results = [api.RunResult(state=s) for s in api.WorkerState]
    first, second = api.RunResult(api.WorkerState.FAILED), api.RunResult(api.WorkerState.FAILED)
    first.return_values[0] = "x"
    return ([(r.state.value, r.is_failed(), r.return_values, r.failures) for r in results],
            second.return_values, first == api.RunResult(api.WorkerState.FAILED, {0: "x"}),
            repr(api.RunResult(api.WorkerState.SUCCEEDED, {0: 1})),
            [f.name for f in dataclasses.fields(api.RunResult)])


@case("agent.server.api.RunResult")
def case_agent_run_result_state_required(root, tmp):
    api = module(root, "agent.server.api")
    return outcome(lambda: api.RunResult())


# ---------------------------------------------------------------------------------------------- ElasticAgent


@case("agent.server.ElasticAgent", "agent.server.ElasticAgent.run", "agent.server.ElasticAgent.get_worker_group")
def case_agent_elastic_agent_is_abstract(root, tmp):
    api = module(root, "agent.server.api")
    def parameters(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    return (outcome(lambda: api.ElasticAgent()), sorted(api.ElasticAgent.__abstractmethods__),
            parameters(api.ElasticAgent.run), parameters(api.ElasticAgent.get_worker_group))


@case("agent.server.ElasticAgent", "agent.server.ElasticAgent.run", "agent.server.ElasticAgent.get_worker_group")
def case_agent_elastic_agent_minimal_subclass(root, tmp):
    api = module(root, "agent.server.api")

    class Agent(api.ElasticAgent):
        def run(self, role="default"):
            return api.RunResult(api.WorkerState.SUCCEEDED, {0: role})

        def get_worker_group(self, role="default"):
            return role

    agent = Agent()
    return agent.run().return_values, agent.get_worker_group("x"), isinstance(agent, api.ElasticAgent)


@case("agent.server.SimpleElasticAgent")
def case_agent_simple_agent_is_abstract(root, tmp):
    api = module(root, "agent.server.api")
    return outcome(lambda: api.SimpleElasticAgent(_spec(root))), sorted(api.SimpleElasticAgent.__abstractmethods__)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.get_worker_group")
def case_agent_simple_agent_after_construction(root, tmp):
    spec = _spec(root, max_restarts=5)
    agent = _stub_agent(root, spec)
    group = agent.get_worker_group()
    return (group.spec is spec, group is agent.get_worker_group("another-role"), group.state.value,
            agent._remaining_restarts, agent._store, agent._exit_barrier_timeout, agent._shutdown_timeout,
            agent._total_execution_time, agent._in_exit_barrier)


@case("agent.server.SimpleElasticAgent")
def case_agent_simple_agent_constructor_arguments(root, tmp):
    agent = _stub_agent(root, _spec(root), exit_barrier_timeout=0.5, shutdown_timeout=2)
    return agent._exit_barrier_timeout, agent._shutdown_timeout


@case("agent.server.SimpleElasticAgent")
def case_agent_simple_agent_remaining_restarts_assignable(root, tmp):
    agent = _stub_agent(root, _spec(root, max_restarts=3))

    def disable():
        agent._remaining_restarts = 0
        return agent._remaining_restarts

    return outcome(disable)


# ---------------------------------------------------------------------------------------------- rank assignment


def _assign_in_threads(root: str, roles_and_sizes: list[tuple[str, int]]) -> list[list[str]]:
    store = _store(timeout=5)
    results: list[Any] = [None] * len(roles_and_sizes)

    def one(rank: int, role: str, size: int) -> None:
        spec = _spec(root, role=role, local_world_size=size)
        agent = _stub_agent(root, spec)
        results[rank] = outcome(lambda: _workers(agent._assign_worker_ranks(store, rank, len(roles_and_sizes), spec)))

    threads = [threading.Thread(target=one, args=(r, role, size)) for r, (role, size) in enumerate(roles_and_sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


@case("agent.server.SimpleElasticAgent._assign_worker_ranks")
def case_agent_assign_worker_ranks_world_of_one(root, tmp):
    spec = _spec(root, local_world_size=3)
    agent = _stub_agent(root, spec)
    return _workers(agent._assign_worker_ranks(_store(), 0, 1, spec))


@case("agent.server.SimpleElasticAgent._assign_worker_ranks")
def case_agent_assign_worker_ranks_uneven_nodes(root, tmp):
    return _assign_in_threads(root, [("trainer", 1), ("trainer", 3), ("trainer", 2)])


@case("agent.server.SimpleElasticAgent._assign_worker_ranks")
def case_agent_assign_worker_ranks_multi_role(root, tmp):
    return _assign_in_threads(root, [("b", 2), ("a", 1), ("b", 3), ("a", 2)])


@case("agent.server.SimpleElasticAgent._assign_worker_ranks")
def case_agent_assign_worker_ranks_identical_fast_path(root, tmp):
    spec = _spec(root, local_world_size=2)
    agent = _stub_agent(root, spec)
    old = os.environ.get("TORCH_ELASTIC_WORKER_IDENTICAL")
    os.environ["TORCH_ELASTIC_WORKER_IDENTICAL"] = "1"
    try:
        # the fast path uses no store: the group rank and world size alone give the ranks
        return outcome(lambda: _workers(agent._assign_worker_ranks(None, 2, 4, spec)))
    finally:
        if old is None:
            del os.environ["TORCH_ELASTIC_WORKER_IDENTICAL"]
        else:
            os.environ["TORCH_ELASTIC_WORKER_IDENTICAL"] = old


# ---------------------------------------------------------------------------------------------- lifecycle steps


def _group_view(group) -> tuple:
    return (group.state.value, group.group_rank, group.group_world_size, group.master_addr, group.master_port,
            _workers(group.workers), [w.id for w in group.workers])


@case("agent.server.SimpleElasticAgent._rendezvous")
def case_agent_rendezvous_fixed_master(root, tmp):
    store = _store()
    handler = _Handler(root, store)
    spec = _spec(root, handler, master_addr="127.0.0.1", master_port=29555)
    agent = _stub_agent(root, spec)
    group = agent.get_worker_group()
    agent._rendezvous(group)
    return _group_view(group), group.store is store, agent._store is store, handler.calls


@case("agent.server.SimpleElasticAgent._rendezvous")
def case_agent_rendezvous_master_from_bootstrap_store_info(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler))
    group = agent.get_worker_group()
    agent._rendezvous(group)
    return group.master_addr == "10.9.8.7", group.master_port == 29123


@case("agent.server.SimpleElasticAgent._rendezvous")
def case_agent_rendezvous_handler_raises(root, tmp):
    rdzv = module(root, "rendezvous.api")
    handler = _Handler(root, _store(), raise_on_next=rdzv.RendezvousTimeoutError("too slow"))
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555))
    group = agent.get_worker_group()
    return outcome(lambda: agent._rendezvous(group)), _group_view(group)


@case("agent.server.SimpleElasticAgent._initialize_workers", "agent.server.SimpleElasticAgent._start_workers")
def case_agent_initialize_workers(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555))
    group = agent.get_worker_group()
    agent._initialize_workers(group)
    return _group_view(group), agent.log


@case("agent.server.SimpleElasticAgent._initialize_workers", "agent.server.SimpleElasticAgent._start_workers")
def case_agent_initialize_workers_start_returns_no_ids(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555), ids={})
    group = agent.get_worker_group()
    return outcome(lambda: agent._initialize_workers(group)), _group_view(group)


@case("agent.server.SimpleElasticAgent._initialize_workers", "agent.server.SimpleElasticAgent._start_workers")
def case_agent_initialize_workers_start_returns_some_ids(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555), ids={1: "b"})
    group = agent.get_worker_group()
    return outcome(lambda: agent._initialize_workers(group)), _group_view(group)


@case("agent.server.SimpleElasticAgent._restart_workers", "agent.server.SimpleElasticAgent._stop_workers")
def case_agent_restart_workers(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555))
    group = agent.get_worker_group()
    agent._initialize_workers(group)
    agent._restart_workers(group)
    return _group_view(group), agent.log, handler.calls.count("next_rendezvous"), agent._remaining_restarts


@case("agent.server.SimpleElasticAgent._exit_barrier")
def case_agent_exit_barrier_without_rendezvous(root, tmp):
    agent = _stub_agent(root, _spec(root, _Handler(root, _store())), exit_barrier_timeout=0.2)
    start = time.monotonic()
    return outcome(agent._exit_barrier), time.monotonic() - start < 1.0, agent._in_exit_barrier


@case("agent.server.SimpleElasticAgent._exit_barrier")
def case_agent_exit_barrier_world_of_one(root, tmp):
    handler = _Handler(root, _store())
    agent = _stub_agent(root, _spec(root, handler, master_addr="127.0.0.1", master_port=29555),
                        exit_barrier_timeout=0.2)
    agent._rendezvous(agent.get_worker_group())
    start = time.monotonic()
    return outcome(agent._exit_barrier), time.monotonic() - start < 1.0, agent._in_exit_barrier


@case("agent.server.SimpleElasticAgent._exit_barrier")
def case_agent_exit_barrier_peer_never_arrives(root, tmp):
    store = _store()
    handler = _Handler(root, store, rank=0, world_size=2)
    spec = _spec(root, handler, master_addr="127.0.0.1", master_port=29555)
    agent = _stub_agent(root, spec, exit_barrier_timeout=0.3)
    group = agent.get_worker_group()
    # the other agent published its rank info (so rank assignment completes) but never reaches the barrier
    other = _stub_agent(root, spec)
    peer = threading.Thread(target=lambda: outcome(lambda: other._assign_worker_ranks(store, 1, 2, spec)))
    peer.start()
    agent._rendezvous(group)
    peer.join(5)
    seen: list[bool] = []
    done = threading.Event()

    def watch():  # whether _in_exit_barrier was ever True while the barrier waited (sampled, so load cannot skip it)
        while not done.is_set():
            seen.append(agent._in_exit_barrier)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    result = outcome(agent._exit_barrier)
    elapsed = time.monotonic() - start
    done.set()
    watcher.join(5)
    # waits out its timeout, and returns (a generous bound: the point is that it does not hang on a loaded machine)
    return result, 0.25 <= elapsed < 15.0, any(seen), agent._in_exit_barrier


# ---------------------------------------------------------------------------------------------- run loop


def _run(root: str, states: list[str], waiting: list[int] | None = None, **spec_overrides) -> tuple:
    handler = _Handler(root, _store(), waiting=waiting)
    spec_args = {"master_addr": "127.0.0.1", "master_port": 29555, "monitor_interval": 0.01, **spec_overrides}
    agent = _stub_agent(root, _spec(root, handler, **spec_args), states, exit_barrier_timeout=1)
    result = outcome(lambda: agent.run())
    if result[0] == "ok":
        value = result[1]
        result = ("ok", None if value is None else (value.state.value, value.return_values, value.failures))
    return result, agent.log, handler.calls.count("next_rendezvous"), agent.get_worker_group().state.value


def _worker_events(root: str, states: list[str], **spec_overrides) -> list[tuple]:
    """The per-worker torchelastic.worker.status.<STATE> events a run records to its event log handler ("null")."""
    events = module(root, "events")
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    events_logger = events._get_or_create_logger("null")
    capture = Capture()
    events_logger.addHandler(capture)
    try:
        _run(root, states, **spec_overrides)
    finally:
        events_logger.removeHandler(capture)
    observed = []
    for message in seen:
        event = json.loads(message)
        md = event["metadata"]
        if event["source"] != "WORKER":
            continue
        observed.append((event["name"], md["state"], md["global_rank"], md["worker_id"], md["raw_error"],
                         json.loads(md["metadata"]), md["run_id"], md["rdzv_backend"], md["role"]))
    return sorted(observed, key=lambda e: e[2])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run")
def case_agent_run_records_an_event_per_worker_on_success(root, tmp):
    return _worker_events(root, ["SUCCEEDED"])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run")
def case_agent_run_records_failed_and_terminated_workers(root, tmp):
    return _worker_events(root, ["FAILED_RANK1"], max_restarts=0)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers",
      "agent.server.SimpleElasticAgent._shutdown")
def case_agent_run_succeeds_at_once(root, tmp):
    return _run(root, ["SUCCEEDED"])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers",
      "agent.server.SimpleElasticAgent._restart_workers")
def case_agent_run_failure_restarts_then_fails(root, tmp):
    return _run(root, ["HEALTHY", "FAILED", "FAILED"], max_restarts=1)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_no_restarts(root, tmp):
    return _run(root, ["UNHEALTHY"], max_restarts=0)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_restart_then_succeed(root, tmp):
    return _run(root, ["FAILED", "SUCCEEDED"], max_restarts=2)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_membership_change_is_not_a_retry(root, tmp):
    return _run(root, ["HEALTHY", "HEALTHY", "SUCCEEDED"], waiting=[0, 1], max_restarts=0)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_subclass_disables_restarts(root, tmp):
    return _run(root, ["FAILED", "FAILED_NO_MORE_RESTARTS"], max_restarts=3)


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_succeeded_without_return_values(root, tmp):
    return _run(root, ["SUCCEEDED_NO_VALUES"])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_run_unknown_state(root, tmp):
    return _run(root, ["UNKNOWN"])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._shutdown")
def case_agent_run_signal_shuts_down_with_it(root, tmp):
    return _run(root, ["SIGTERM"])


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._shutdown")
def case_agent_run_rendezvous_graceful_exit(root, tmp):
    handler = _Handler(root, _store(), raise_on_next=module(root, "rendezvous.api").RendezvousGracefulExitError("bye"))
    agent = _stub_agent(root, _spec(root, handler, monitor_interval=0.01))
    result = outcome(lambda: agent.run(), compare_message=False)
    return result, agent.log


@case("agent.server.SimpleElasticAgent", "agent.server.ElasticAgent.run", "agent.server.SimpleElasticAgent._shutdown")
def case_agent_run_rendezvous_error(root, tmp):
    handler = _Handler(root, _store(), raise_on_next=module(root, "rendezvous.api").RendezvousClosedError("closed"))
    agent = _stub_agent(root, _spec(root, handler, monitor_interval=0.01))
    return outcome(lambda: agent.run()), agent.log


# ---------------------------------------------------------------------------------------------- LocalElasticAgent


def _local_agent(root: str, tmp: Path, entrypoint: str, args: tuple = (), **kwargs):
    local = module(root, "agent.server.local_elastic_agent")
    logs = module(root, "multiprocessing").DefaultLogsSpecs(log_dir=str(tmp / "logs"))
    handler = _Handler(root, _store())
    spec = _spec(root, handler, local_world_size=1, entrypoint=entrypoint, args=args, max_restarts=0,
                 monitor_interval=0.01, master_addr="127.0.0.1", master_port=29555)
    return local.LocalElasticAgent(spec, logs, **kwargs), handler


@case("agent.server.local_elastic_agent.LocalElasticAgent")
def case_agent_local_agent_after_construction(root, tmp):
    agent, _ = _local_agent(root, tmp, "/bin/true")
    return (agent._start_method, agent._pcontext, agent._health_check_server, agent._shutdown_timeout,
            agent._exit_barrier_timeout, agent._log_line_prefix_template, agent._remaining_restarts,
            agent.get_worker_group().state.value)


@case("agent.server.local_elastic_agent.LocalElasticAgent")
def case_agent_local_agent_unknown_start_method(root, tmp):
    return outcome(lambda: type(_local_agent(root, tmp, "/bin/true", start_method="bogus")[0]).__name__,
                   compare_message=False)


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.SimpleElasticAgent._stop_workers",
      "agent.server.SimpleElasticAgent._shutdown")
def case_agent_local_agent_stop_and_shutdown_before_start(root, tmp):
    agent, _ = _local_agent(root, tmp, "/bin/true")
    group = agent.get_worker_group()
    return outcome(lambda: agent._stop_workers(group)), outcome(agent._shutdown), outcome(agent._shutdown)


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.SimpleElasticAgent._monitor_workers")
def case_agent_local_agent_monitor_before_start(root, tmp):
    agent, _ = _local_agent(root, tmp, "/bin/true")
    result = outcome(lambda: agent._monitor_workers(agent.get_worker_group()).state.value, compare_message=False)
    return result


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.SimpleElasticAgent._shutdown")
def case_agent_local_agent_shutdown_stops_health_check_server_once(root, tmp):
    stops: list[int] = []

    class Server:
        def stop(self):
            stops.append(1)

    agent, _ = _local_agent(root, tmp, "/bin/true", health_check_server=Server())
    agent._shutdown()
    agent._shutdown()
    return len(stops), agent._health_check_server


def _health_check_during_run(root: str, tmp: Path, port: str) -> tuple:
    local = module(root, "agent.server.local_elastic_agent")
    seen: list[Any] = []

    class Agent(local.LocalElasticAgent):
        def _monitor_workers(self, worker_group):
            server = self._health_check_server
            seen.append((type(server).__name__, None if server is None else int(server.alive_callback()) > 0))
            return super()._monitor_workers(worker_group)

    logs = module(root, "multiprocessing").DefaultLogsSpecs(log_dir=str(tmp / "logs"))
    spec = _spec(root, _Handler(root, _store()), local_world_size=1, entrypoint="/bin/sh", args=("-c", "sleep 0.2"),
                 max_restarts=0, monitor_interval=0.05, master_addr="127.0.0.1", master_port=29555)
    agent = Agent(spec, logs)
    old = os.environ.get("TORCHELASTIC_HEALTH_CHECK_PORT")
    os.environ["TORCHELASTIC_HEALTH_CHECK_PORT"] = port
    try:
        return _run_local(agent), seen[0], agent._health_check_server
    finally:
        if old is None:
            del os.environ["TORCHELASTIC_HEALTH_CHECK_PORT"]
        else:
            os.environ["TORCHELASTIC_HEALTH_CHECK_PORT"] = old


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.health_check_server.HealthCheckServer.start",
      "agent.server.health_check_server.HealthCheckServer.stop")
def case_agent_local_agent_health_check_port_env(root, tmp):
    return _health_check_during_run(root, tmp, "0")


@case("agent.server.local_elastic_agent.LocalElasticAgent")
def case_agent_local_agent_health_check_port_env_not_a_number(root, tmp):
    return _health_check_during_run(root, tmp, "not-a-port")


def _run_local(agent) -> tuple:
    try:
        result = agent.run()
        return (result.state.value, sorted(result.return_values),
                {rank: (f.local_rank, f.exitcode) for rank, f in result.failures.items()})
    finally:
        agent._shutdown(timeout=1)


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.ElasticAgent.run")
def case_agent_local_agent_binary_fails(root, tmp):
    agent, _ = _local_agent(root, tmp, "/bin/sh", ("-c", "exit 3"))
    return _run_local(agent)


@case("agent.server.local_elastic_agent.LocalElasticAgent", "agent.server.ElasticAgent.run")
def case_agent_local_agent_binary_succeeds_with_worker_env(root, tmp):
    out = tmp / "env.txt"
    agent, _ = _local_agent(root, tmp, "/bin/sh", ("-c", f"env > {out}; echo ${{local_rank}} >> {out}.args"))
    result = _run_local(agent)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
            "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    return result, {k: env.get(k) for k in keys}, Path(f"{out}.args").read_text()


# ---------------------------------------------------------------------------------------------- health check server


def _health(root: str):
    return module(root, "agent.server.health_check_server")


@case("agent.server.health_check_server.create_healthcheck_server", "agent.server.health_check_server.HealthCheckServer")
def case_agent_create_healthcheck_server(root, tmp):
    def alive():
        return 7

    server = _health(root).create_healthcheck_server(alive, 0, 60)
    return (type(server).__name__, isinstance(server, _health(root).HealthCheckServer), server.alive_callback is alive,
            server._port, server._timeout)


@case("agent.server.health_check_server.create_healthcheck_server")
def case_agent_create_healthcheck_server_keyword_arguments(root, tmp):
    server = _health(root).create_healthcheck_server(alive_callback=int, port=0, timeout=1)
    return server.alive_callback is int, outcome(lambda: _health(root).create_healthcheck_server(int, 0))


@case("agent.server.health_check_server.HealthCheckServer", "agent.server.health_check_server.HealthCheckServer.start",
      "agent.server.health_check_server.HealthCheckServer.stop")
def case_agent_healthcheck_server_stop_before_start(root, tmp):
    server = _health(root).HealthCheckServer(int, 0, 60)
    return outcome(server.stop), outcome(server.stop)


@case("agent.server.health_check_server.HealthCheckServer.start",
      "agent.server.health_check_server.HealthCheckServer.stop")
def case_agent_healthcheck_server_start_stop_twice(root, tmp):
    server = _health(root).HealthCheckServer(int, 0, 60)
    try:
        return outcome(server.start), outcome(server.stop), outcome(server.stop), outcome(server.start)
    finally:
        server.stop()


@case("agent.server.health_check_server.HealthCheckServer.start")
def case_agent_healthcheck_server_started_twice(root, tmp):
    server = _health(root).HealthCheckServer(int, 0, 60)
    try:
        return outcome(server.start), outcome(server.start, compare_message=False)
    finally:
        server.stop()


@case("agent.server.health_check_server.HealthCheckServer")
def case_agent_healthcheck_server_invalid_arguments(root, tmp):
    server = _health(root).HealthCheckServer
    return [outcome(lambda a=a: type(server(*a)).__name__, compare_message=False)
            for a in ((int, -1, 60), (int, 70000, 60), (int, "8080", 60), (int, 0, 0), (int, 0, -1), (None, 0, 60))]


# ---------------------------------------------------------------------------------------------- control_plane


def _with_socket_env(path: str | None):
    old = os.environ.get("TORCH_WORKER_SERVER_SOCKET")

    def restore():
        if old is None:
            os.environ.pop("TORCH_WORKER_SERVER_SOCKET", None)
        else:
            os.environ["TORCH_WORKER_SERVER_SOCKET"] = old

    if path is None:
        os.environ.pop("TORCH_WORKER_SERVER_SOCKET", None)
    else:
        os.environ["TORCH_WORKER_SERVER_SOCKET"] = path
    return restore


@case("control_plane.worker_main")
def case_agent_worker_main_without_socket(root, tmp):
    control_plane = module(root, "control_plane")
    restore = _with_socket_env(None)
    try:
        with control_plane.worker_main() as value:
            inside = value

        @control_plane.worker_main()
        def main(x):
            return x * 2

        def raising():
            with control_plane.worker_main():
                raise KeyError("k")

        return inside, main(21), outcome(raising), sorted(os.listdir(tmp))
    finally:
        restore()


@case("control_plane.worker_main")
def case_agent_worker_main_serves_on_socket(root, tmp):
    control_plane = module(root, "control_plane")
    # A unix socket path has at most 107 bytes: pytest's tmp paths under xdist are longer.
    short = tempfile.mkdtemp(prefix="cp-", dir="/tmp")
    path = os.path.join(short, "worker.sock")
    restore = _with_socket_env(path)
    try:
        with control_plane.worker_main():
            exists = os.path.exists(path)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(path)
                client.sendall(b"POST /handler/ping HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
                reply = b""
                while b"pong" not in reply:
                    chunk = client.recv(1000)
                    if not chunk:
                        break
                    reply += chunk
        with socket.socket(socket.AF_UNIX) as client:
            after = outcome(lambda: client.connect(path), compare_message=False)
        return exists, reply.split(b"\r\n")[0], reply.endswith(b"pong"), after
    finally:
        restore()
        shutil.rmtree(short, ignore_errors=True)


@case("control_plane.worker_main")
def case_agent_worker_main_unusable_socket_path(root, tmp):
    control_plane = module(root, "control_plane")
    restore = _with_socket_env(str(tmp / "missing-dir" / "worker.sock"))
    try:
        def enter():
            with control_plane.worker_main():
                return "entered"

        return outcome(enter, compare_message=False)
    finally:
        restore()


@case("control_plane.worker_main")
def case_agent_worker_main_does_not_record_body_errors(root, tmp):
    control_plane = module(root, "control_plane")
    error_file = tmp / "error.json"
    restore = _with_socket_env(None)
    old = os.environ.get("TORCHELASTIC_ERROR_FILE")
    os.environ["TORCHELASTIC_ERROR_FILE"] = str(error_file)
    try:
        def body():
            with control_plane.worker_main():
                raise ValueError("boom")

        return outcome(body), error_file.exists()
    finally:
        restore()
        if old is None:
            os.environ.pop("TORCHELASTIC_ERROR_FILE", None)
        else:
            os.environ["TORCHELASTIC_ERROR_FILE"] = old


test_same_observable_behaviour = same_behaviour_test(__name__)
