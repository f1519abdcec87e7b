"""Helpers for fault-injection tests: real child processes that are always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fault_injection.processes import is_alive, kill_processes


@pytest.fixture
def spawn():
    """``spawn(code, **popen_kwargs)`` runs ``python -c code``; every process (and descendant) is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(code: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([sys.executable, "-c", code], **kwargs)
        procs.append(proc)
        return proc

    yield start
    live = [p.pid for p in procs if p.poll() is None]
    for pid in live:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    if live:
        kill_processes(live)
    for p in procs:
        p.wait(timeout=10)
    assert not [p.pid for p in procs if is_alive(p.pid)]


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One stdout line of ``proc`` (its stdout must be a text pipe), or fail after ``timeout``."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from pid {proc.pid} within {timeout} s"
    return proc.stdout.readline().strip()
