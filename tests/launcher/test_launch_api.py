"""elastic_launch / launch_agent with a Python function entrypoint (workers are spawned processes)."""

from __future__ import annotations

import os

import pytest

from elastic_impl.launcher.api import LaunchConfig, LaunchConfigError, elastic_launch, split_endpoint
from tests.launcher.conftest import free_port, needs_runtime


def rank_times(factor: int) -> int:
    return int(os.environ["RANK"]) * factor + int(os.environ["WORLD_SIZE"])


def failing_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one refuses")


def _config(**overrides) -> LaunchConfig:
    kwargs = dict(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id="api-test",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        shutdown_timeout=2,
    )
    kwargs.update(overrides)
    return LaunchConfig(**kwargs)


@needs_runtime
def test_function_entrypoint_returns_values_by_global_rank():
    assert elastic_launch(_config(), rank_times)(10) == {0: 2, 1: 12}


@needs_runtime
def test_function_failure_raises_child_failed_error_naming_the_rank():
    from elastic_impl.multiprocessing.errors import ChildFailedError

    with pytest.raises(ChildFailedError) as info:
        elastic_launch(_config(), failing_on_rank_one)()
    rank, failure = info.value.get_first_failure()
    assert rank == 1
    assert "rank one refuses" in info.value.format_msg()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"min_nodes": 0}, "min_nodes: 0"),
        ({"min_nodes": 3, "max_nodes": 2}, "max_nodes: 2"),
        ({"nproc_per_node": 0}, "nproc_per_node: 0"),
        ({"max_restarts": -2}, "max_restarts: -2"),
        ({"monitor_interval": 0}, "monitor_interval: 0"),
        ({"start_method": "clone"}, "start_method: 'clone'"),
        # at construction, not at the agent's first event: an unknown one silently dropped every event of the run
        ({"event_log_handler": "consol"}, "event_log_handler: 'consol' (allowed: ['console',"),
    ],
)
def test_launch_config_validation(overrides, fragment):
    with pytest.raises(LaunchConfigError) as info:
        _config(**overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "endpoint, expected",
    [("host", ("host", None)), ("host:29400", ("host", 29400)), ("[::1]:5", ("::1", 5)), ("[fe80::1]", ("fe80::1", None))],
)
def test_split_endpoint(endpoint, expected):
    assert split_endpoint(endpoint, default_port=None) == expected


def test_heartbeat_spellings_map_to_torchruns_keep_alive_options():
    from elastic_impl.rendezvous.options import canonical_rdzv_configs

    assert canonical_rdzv_configs({"heartbeat": 1, "missed_heartbeats": 2, "join_timeout": 5}) == {
        "keep_alive_interval": 1, "keep_alive_max_attempt": 2, "join_timeout": 5,
    }
    with pytest.raises(ValueError, match="'keep_alive_interval' is given twice"):
        canonical_rdzv_configs({"heartbeat": 1, "keep_alive_interval": 2})


def test_a_node_that_loses_the_store_leaves_instead_of_closing_the_run(monkeypatch):
    """Its own lost connection is not the job's end: closing the run would fail every node that still reaches it."""
    from elastic_impl.rendezvous import RendezvousConnectionError, rendezvous_handler_registry

    released = []

    class LostStoreHandler:
        def next_rendezvous(self):
            raise RendezvousConnectionError("rendezvous store 127.0.0.1:1 is gone: no answer within 5.0 s")

        def get_run_id(self):
            return "api-test"

        def leave(self):
            released.append("leave")

        def shutdown(self):
            released.append("shutdown")

    monkeypatch.setattr(rendezvous_handler_registry, "create_handler", lambda params: LostStoreHandler())
    with pytest.raises(RendezvousConnectionError):
        elastic_launch(_config(), rank_times)(10)
    assert released == ["leave"]
