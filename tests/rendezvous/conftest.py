"""Fixtures for rendezvous tests: a manual clock, an in-memory backend, node processes (tcp_store: tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest


class ManualClock:
    """A Clock whose time only moves when a test (or a sleep) moves it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.now += seconds

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if not event.is_set() and timeout:
            self.now += timeout
        return event.is_set()

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["keyed", "blob"])
def memory_backend(request):
    """The in-memory backend twice: with keyed storage (c10d-like arrivals) and without (like etcd-v2)."""
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend

    backend = InMemoryRendezvousBackend()
    backend.keyed = request.param == "keyed"
    return backend


class NodeProcesses:
    """Starts tests/rendezvous/_node.py processes; kills every one still running at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_CPP_LOG_LEVEL="FATAL")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.rendezvous._node", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        from fault_injection.processes import kill_session

        for proc in self.procs:
            kill_session(proc, timeout=10)


@pytest.fixture
def node_procs():
    procs = NodeProcesses()
    yield procs
    procs.cleanup()
