"""Fixtures for timer tests: every process and server started here is stopped/killed at teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_impl import timer


class FakeClock:
    """A settable clock: timers expire only when the test advances it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def wait(self, event, timeout):
        if timeout:
            self.now += timeout
        return event.is_set()


@pytest.fixture
def fake_clock():
    saved = timer.get_clock()
    clock = FakeClock()
    timer.set_clock(clock)
    yield clock
    timer.set_clock(saved)


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def spawn():
    """Start ``python -c code`` (no torch import: fast); killed at teardown if still running."""
    procs: list[subprocess.Popen] = []

    def start(code: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


@pytest.fixture
def mp_procs():
    procs = []
    yield procs
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
