"""Unit tests of the agent's data types and rank assignment (real TCPStore, no worker processes)."""

from __future__ import annotations

import threading

import pytest

from elastic_impl.agent.server import (
    RunResult,
    SimpleElasticAgent,
    Worker,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)


class _NoRendezvous:
    """Placeholder handler for specs whose tests never rendezvous."""

    def get_run_id(self) -> str:
        return "test-run"


def _spec(**overrides) -> WorkerSpec:
    kwargs = dict(role="trainer", local_world_size=2, rdzv_handler=_NoRendezvous(), entrypoint="/bin/true")
    kwargs.update(overrides)
    return WorkerSpec(**kwargs)


class _RanksOnlyAgent(SimpleElasticAgent):
    """Concrete agent used only to call the (store-based) rank assignment."""

    def _start_workers(self, worker_group):
        raise AssertionError("not used")

    def _stop_workers(self, worker_group):
        pass

    def _monitor_workers(self, worker_group):
        raise AssertionError("not used")

    def _shutdown(self, death_sig=None, timeout=30):
        pass


def train_fn(x):
    return x


def test_worker_spec_defaults_match_upstream():
    spec = _spec()
    assert (spec.max_restarts, spec.monitor_interval, spec.event_log_handler) == (3, 0.1, "null")
    assert spec.master_addr is None and spec.master_port is None and spec.args == ()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"local_world_size": 0}, "local_world_size: 0"),
        ({"max_restarts": -1}, "max_restarts: -1"),
        ({"monitor_interval": 0}, "monitor_interval: 0"),
        ({"entrypoint": None}, "entrypoint"),
        ({"entrypoint": 42}, "entrypoint: 42"),
        ({"entrypoint": ""}, "entrypoint: ''"),
        ({"entrypoint": "  "}, "entrypoint: '  '"),
        ({"master_port": "abc"}, "master_port: 'abc'"),
        ({"master_port": 70000}, "master_port: 70000"),
        ({"master_port": True}, "master_port: True"),
    ],
)
def test_worker_spec_rejects_bad_values_with_one_line(overrides, fragment):
    with pytest.raises(ValueError) as info:
        _spec(**overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_entrypoint_name_for_command_and_function():
    assert _spec(entrypoint="/usr/bin/python3").get_entrypoint_name() == "python3"
    assert _spec(entrypoint=train_fn).get_entrypoint_name() == "train_fn"
    # ``fn`` is the deprecated alias of ``entrypoint``
    with pytest.warns(DeprecationWarning, match="WorkerSpec.fn"):
        assert _spec(entrypoint=None, fn=train_fn).entrypoint is train_fn


def test_entrypoint_name_of_partial_and_callable_object():
    """Beyond upstream (AttributeError there): named after the wrapped function, or the object's class."""
    import functools

    class Trainer:
        def __call__(self):
            return None

    assert _spec(entrypoint=functools.partial(functools.partial(train_fn, 1))).get_entrypoint_name() == "train_fn"
    assert _spec(entrypoint=Trainer()).get_entrypoint_name().endswith("Trainer")


def test_master_port_as_a_numeric_string_is_accepted():
    assert _spec(master_port="29500").master_port == "29500"


def test_remaining_restarts_set_to_zero_disables_restarts_under_a_job_wide_counter():
    """Upstream's LocalElasticAgent sets ``_remaining_restarts = 0`` to disable restarts; ours honours it even when
    the rendezvous keeps a job-wide restart count (which otherwise decides the budget)."""
    from elastic_impl.agent.server.decisions import Action, Ask
    from elastic_impl.utils.clock import REAL_CLOCK

    # the job-wide counter: this node claims the failure round and the count goes to 1 (of max_restarts=3)
    answers = {Ask.PEER_FAILED: False, Ask.CLAIM_FAILURE_ROUND: True, Ask.INCREMENT_RESTART_COUNT: 1}
    agent = _RanksOnlyAgent(_spec(max_restarts=3))
    assert agent._decisions.step("FAILED", REAL_CLOCK, answers.__getitem__).action == Action.RESTART
    agent = _RanksOnlyAgent(_spec(max_restarts=3))
    agent._remaining_restarts = 0
    assert agent._remaining_restarts == 0
    assert agent._decisions.step("FAILED", REAL_CLOCK, answers.__getitem__).action == Action.FAIL


def test_worker_state_is_running():
    running = {s for s in WorkerState if WorkerState.is_running(s)}
    assert running == {WorkerState.HEALTHY, WorkerState.UNHEALTHY}


def test_run_result_and_worker_group_basics():
    assert RunResult(state=WorkerState.FAILED).is_failed()
    assert not RunResult(state=WorkerState.SUCCEEDED).is_failed()
    group = WorkerGroup(_spec(local_world_size=3))
    assert [w.local_rank for w in group.workers] == [0, 1, 2]
    assert group.state == WorkerState.INIT and group.group_rank is None
    w = Worker(local_rank=1)
    assert (w.global_rank, w.role_rank, w.world_size, w.role_world_size, w.id) == (-1, -1, -1, -1, None)


def _assign_concurrently(store_port: int, nodes: list[tuple[str, int]]) -> dict[int, list[Worker]]:
    """Run one agent's rank assignment per node, concurrently, each with its own client of the real store."""
    from torch.distributed import TCPStore

    results: dict[int, list[Worker]] = {}
    errors: list[BaseException] = []

    def node(group_rank: int, role: str, lws: int) -> None:
        try:
            store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=__import__("datetime").timedelta(seconds=10))
            agent = _RanksOnlyAgent(_spec(role=role, local_world_size=lws))
            results[group_rank] = agent._assign_worker_ranks(store, group_rank, len(nodes), agent._worker_group.spec)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(r, role, lws)) for r, (role, lws) in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def test_assign_worker_ranks_heterogeneous_roles(tcp_store):
    nodes = [("trainer", 2), ("ps", 1), ("trainer", 3)]
    results = _assign_concurrently(tcp_store.port, nodes)
    ranks = {g: [(w.global_rank, w.role_rank, w.world_size, w.role_world_size) for w in ws] for g, ws in results.items()}
    assert ranks[0] == [(0, 0, 6, 5), (1, 1, 6, 5)]
    assert ranks[1] == [(2, 0, 6, 1)]
    assert ranks[2] == [(3, 2, 6, 5), (4, 3, 6, 5), (5, 4, 6, 5)]
    # every global rank used exactly once
    assert sorted(w.global_rank for ws in results.values() for w in ws) == list(range(6))


def test_advertised_address_never_an_unresolvable_name(monkeypatch):
    import socket

    import pytest

    from elastic_impl.agent.server import api

    assert socket.getaddrinfo(api._advertised_address(1), None)  # the real host: whatever it picks resolves
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "no-such-host.invalid")
    monkeypatch.setattr(socket, "gethostname", lambda: "no-such-host.invalid")
    assert api._advertised_address(1) == "127.0.0.1"  # one node: loopback reaches every worker
    with pytest.raises(RuntimeError, match="no-such-host.invalid.*--local-addr"):
        api._advertised_address(2)
