"""LocalElasticAgent with real worker processes: event-driven failure detection and the worker timer server."""

from __future__ import annotations

import sys
import time

from elastic_impl.agent.server import WorkerSpec, WorkerState
from tests.agent.test_run_loop import RoundStoreHandler


def _agent(tcp_store, tmp_path, code: str, monitor_interval: float):
    from elastic_impl.agent.server.local_elastic_agent import LocalElasticAgent
    from elastic_impl.multiprocessing import DefaultLogsSpecs

    spec = WorkerSpec(
        role="trainer",
        local_world_size=1,
        rdzv_handler=RoundStoreHandler(tcp_store),
        entrypoint=sys.executable,
        args=("-c", code),
        max_restarts=0,
        monitor_interval=monitor_interval,
        master_addr="127.0.0.1",
        master_port=29999,
    )
    return LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs")),
                             shutdown_timeout=2)


def test_worker_exit_is_noticed_before_the_monitor_interval(tcp_store, tmp_path):
    # monitor_interval 60 s: a loop that sleeps between polls would return only after a minute
    agent = _agent(tcp_store, tmp_path, "import time, sys; time.sleep(0.5); sys.exit(3)", monitor_interval=60)
    start = time.monotonic()
    result = agent.run()
    took = time.monotonic() - start
    assert result.state == WorkerState.FAILED and result.failures[0].exitcode == 3
    assert took < 30, f"failure noticed after {took:.1f}s"


def test_successful_workers_end_the_run_before_the_monitor_interval(tcp_store, tmp_path):
    agent = _agent(tcp_store, tmp_path, "pass", monitor_interval=60)
    start = time.monotonic()
    assert agent.run().state == WorkerState.SUCCEEDED
    assert time.monotonic() - start < 30


def test_health_check_port_env_serves_health_while_workers_run(tcp_store, tmp_path, monkeypatch):
    """TORCHELASTIC_HEALTH_CHECK_PORT (upstream's switch) starts our health check server with the workers; it answers
    200 while they run and is stopped at shutdown. A value that is not a port is logged and ignored."""
    import json
    import urllib.request

    monkeypatch.setenv("TORCHELASTIC_HEALTH_CHECK_PORT", "0")
    agent = _agent(tcp_store, tmp_path, "import time; time.sleep(1)", monitor_interval=0.1)
    answers = []
    monitor = agent._monitor_workers

    def monitor_and_probe(worker_group):
        if not answers:
            url = f"http://127.0.0.1:{agent._health_check_server.port}/health"
            with urllib.request.urlopen(url, timeout=5) as reply:
                answers.append((reply.status, json.loads(reply.read())["alive"]))
        return monitor(worker_group)

    agent._monitor_workers = monitor_and_probe
    assert agent.run().state == WorkerState.SUCCEEDED
    assert answers == [(200, True)] and agent._health_check_server is None

    monkeypatch.setenv("TORCHELASTIC_HEALTH_CHECK_PORT", "not-a-port")
    agent = _agent(tcp_store, tmp_path, "pass", monitor_interval=0.1)
    assert agent.run().state == WorkerState.SUCCEEDED


# A worker really stuck in uninterruptible sleep (D state): posix_spawn's child blocks opening a FIFO nobody writes,
# and until it gets past that the parent (the worker) waits for it in the kernel (vfork), in state D.
_STUCK_IN_D_STATE = """import os, sys
os.posix_spawn("/bin/true", ["true"], {{}}, file_actions=[(os.POSIX_SPAWN_OPEN, 3, {fifo!r}, os.O_RDONLY, 0)])
"""


def _stuck_agent(tcp_store, tmp_path, **kwargs):
    import os

    from elastic_impl.agent.server.local_elastic_agent import LocalElasticAgent
    from elastic_impl.multiprocessing import DefaultLogsSpecs

    fifo = tmp_path / "nobody-writes"
    os.mkfifo(fifo)
    spec = WorkerSpec(role="trainer", local_world_size=1, rdzv_handler=RoundStoreHandler(tcp_store),
                      entrypoint=sys.executable, args=("-c", _STUCK_IN_D_STATE.format(fifo=str(fifo))),
                      max_restarts=3, monitor_interval=0.1, master_addr="127.0.0.1", master_port=29999)
    return LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs")), shutdown_timeout=2,
                             **kwargs)


def test_a_worker_stuck_in_d_state_makes_the_group_unhealthy_without_restarts(tcp_store, tmp_path):
    from elastic_impl.utils.proc_tree import read_stat

    agent = _stuck_agent(tcp_store, tmp_path, uninterruptible_state_timeout=1.0)
    start = time.monotonic()
    result = agent.run()
    took = time.monotonic() - start
    assert result.state == WorkerState.UNHEALTHY, result
    assert agent._restart_count == 0  # a fresh worker would contend for what the stuck one holds: no restart
    (failure,) = result.failures.values()
    assert "uninterruptible sleep (D state)" in failure.message and "1s" in failure.message, failure.message
    assert 1.0 <= took < 30, took
    # The stuck worker was stopped: posix_spawn blocks every signal but SIGKILL while it waits for its child, so the
    # agent's SIGTERM could not reach it and SIGKILL after the grace did; the report says so, not the assumed SIGTERM.
    assert read_stat(failure.pid) is None
    assert failure.exitcode == -9 and failure.signal_name() == "SIGKILL", failure.exitcode


def test_the_d_state_check_is_off_by_default_and_reads_upstreams_variable(tcp_store, tmp_path, monkeypatch):
    from elastic_impl.agent.server import local_elastic_agent

    monkeypatch.delenv("TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT", raising=False)
    assert local_elastic_agent._uninterruptible_state_timeout(None) == 0.0
    assert local_elastic_agent._uninterruptible_state_timeout(-5) == 0.0  # as upstream: non-positive disables
    monkeypatch.setenv("TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT", "2.5")
    assert local_elastic_agent._uninterruptible_state_timeout(None) == 2.5
    assert local_elastic_agent._uninterruptible_state_timeout(7) == 7.0  # the argument wins
    monkeypatch.setenv("TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT", "soon")
    assert local_elastic_agent._uninterruptible_state_timeout(None) == 0.0
    import pytest

    with pytest.raises(ValueError, match="uninterruptible_state_timeout"):
        local_elastic_agent._uninterruptible_state_timeout(float("nan"))
