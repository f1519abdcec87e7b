"""Timer expiry through a real FileTimerServer, clock skew and heartbeat delay on real processes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fault_injection import ClockSkew, ExpireTimer, FaultError, HeartbeatDelay, WorkerTimerServer
from fault_injection.clock import write_skew
from tests.fault_injection.conftest import read_line

WORKER = r"""
import sys, time
from elastic_impl.timer import FileTimerClient, expires
with expires(after=600, scope="train", client=FileTimerClient(sys.argv[1])):
    print("acquired", flush=True)
    time.sleep(600)
"""

SKEWED = r"""
import sys, time
from fault_injection.clock import install_skew
assert install_skew(sys.argv[1])
for line in sys.stdin:
    print(repr(time.time()), flush=True)
"""


def _with_args(code: str, *args: str) -> str:
    return f"import sys; sys.argv[1:] = {list(args)!r}\n" + code


def test_expire_timer_makes_the_server_reap_the_worker(spawn, tmp_path):
    server = WorkerTimerServer(str(tmp_path / "timer.fifo"), max_interval=0.1)
    try:
        proc = spawn(_with_args(WORKER, server.path), stdout=subprocess.PIPE, text=True)
        assert read_line(proc, 60) == "acquired"
        deadline = time.monotonic() + 10
        fault = None
        while fault is None:  # the acquire request may still be in the FIFO
            try:
                fault = ExpireTimer(server, proc.pid, node="node0").inject()
            except FaultError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert proc.wait(timeout=10) == -9
        assert server.expired == [(proc.pid, "train")]
        assert fault.records[0][2] == {"fault": "expire_timer", "pid": proc.pid, "node": "node0", "timers": 1}
    finally:
        server.stop()


def test_expire_timer_without_a_timer_fails_with_one_line(spawn, tmp_path):
    server = WorkerTimerServer(str(tmp_path / "timer.fifo"))
    try:
        proc = spawn("import time; time.sleep(600)")
        with pytest.raises(FaultError, match=rf"^expire_timer: worker pid {proc.pid} holds no timer$"):
            ExpireTimer(server, proc.pid).inject()
    finally:
        server.stop()


def test_clock_skew_shifts_the_wall_clock_of_the_process_and_heals(spawn, tmp_path):
    clock_file = str(tmp_path / "clock")
    write_skew(clock_file, 0.0)
    proc = spawn(_with_args(SKEWED, clock_file), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def offset() -> float:
        time.sleep(0.15)  # the process re-reads the offset at most every 0.1 s
        proc.stdin.write("\n")
        proc.stdin.flush()
        return float(read_line(proc, 60)) - time.time()

    assert abs(offset()) < 1.0
    fault = ClockSkew(clock_file, 100.0).inject()
    assert 99.0 < offset() < 101.0
    stacked = ClockSkew(clock_file, 5.0).inject()
    assert stacked.previous == 100.0 and 4.0 < offset() < 6.0  # what its heal restores, public for the simulator
    stacked.heal()
    assert 99.0 < offset() < 101.0
    fault.heal()
    assert abs(offset()) < 1.0
    assert [r[1] for r in fault.records] == ["fault_start", "fault_end"]


def test_heartbeat_delay_stops_the_process_periodically_until_healed(spawn):
    proc = spawn("import time\nwhile True: time.sleep(0.01)")

    def state() -> str:
        with open(f"/proc/{proc.pid}/stat") as f:
            data = f.read()
        return data[data.rfind(")") + 2]

    fault = HeartbeatDelay(proc.pid, stop_seconds=0.3, period=0.6).inject()
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and seen != {"T", "running"}:
        seen.add("T" if state() == "T" else "running")
        time.sleep(0.02)
    fault.heal()
    assert seen == {"T", "running"}
    time.sleep(0.1)
    assert state() != "T"
    with pytest.raises(FaultError, match=r"needs 0 < stop_seconds < period, got 1, 1"):
        HeartbeatDelay(os.getpid(), 1, 1)
