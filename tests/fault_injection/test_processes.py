"""Process faults against real processes: SIGKILL a worker, kill a whole node tree, pause/resume."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fault_injection import FaultError, KillAgent, KillWorker, PauseAgent
from fault_injection.processes import descendants, is_alive, processes_with_env
from tests.fault_injection.conftest import read_line

# A "node": an agent-like parent that starts a worker in its own session (as elastic_impl does), and the worker
# starts a grandchild. killpg(parent) alone would miss both.
NODE = r"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(g.pid, flush=True)
time.sleep(600)
'''], start_new_session=True, stdout=subprocess.PIPE, text=True)
grandchild = worker.stdout.readline().strip()
print(worker.pid, grandchild, flush=True)
time.sleep(600)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rfind(")") + 2]


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


def test_kill_worker_sigkills_the_process_and_records_it(spawn):
    proc = spawn("import time; time.sleep(600)")
    seen = []
    fault = KillWorker(proc.pid, on_event=lambda name, detail: seen.append((name, detail)), node="node1")
    fault.inject()
    assert proc.wait(timeout=10) == -9
    assert [name for name, _ in seen] == ["fault_start", "fault_end"]
    assert seen[0][1] == {"fault": "kill_worker", "pid": proc.pid, "node": "node1"}
    assert [r[1] for r in fault.records] == ["fault_start", "fault_end"]
    assert not fault.active
    fault.heal()  # instant: nothing to undo, nothing recorded
    assert len(fault.records) == 2


def test_kill_worker_of_a_missing_pid_fails_with_one_line(spawn):
    proc = spawn("pass")
    proc.wait(timeout=30)
    with pytest.raises(FaultError, match=rf"^kill_worker: worker pid {proc.pid} does not exist$"):
        KillWorker(proc.pid).inject()
    with pytest.raises(FaultError, match="kill_worker needs a worker pid > 1, got 'x'"):
        KillWorker("x")


def test_kill_agent_kills_the_whole_tree_across_sessions(spawn):
    proc = spawn(NODE, stdout=subprocess.PIPE, text=True)
    worker, grandchild = (int(x) for x in read_line(proc).split())
    assert {worker, grandchild} <= set(descendants(proc.pid))
    assert os.getsid(worker) != os.getsid(proc.pid)  # the worker escaped the agent's session
    fault = KillAgent(proc.pid).inject()
    assert proc.wait(timeout=10) == -9
    for pid in (worker, grandchild):
        _wait_dead(pid)
    assert set(fault.result) == {proc.pid, worker, grandchild}
    assert fault.records[0][2]["killed"] == fault.result


def test_pause_agent_stops_until_healed(spawn):
    proc = spawn("import time\nwhile True: time.sleep(0.01)")
    fault = PauseAgent(proc.pid).inject()
    assert fault.active
    deadline = time.monotonic() + 5
    while _state(proc.pid) != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fault.heal()
    deadline = time.monotonic() + 5
    while _state(proc.pid) == "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [r[1] for r in fault.records] == ["fault_start", "fault_end"]


def test_processes_with_env_finds_marked_descendants(spawn):
    token = f"t{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, SIM_TEST_MARK=token)
    proc = spawn(NODE, stdout=subprocess.PIPE, text=True, env=env)
    worker, grandchild = (int(x) for x in read_line(proc).split())
    expected = sorted([proc.pid, worker, grandchild])
    # Popen returns when exec has closed its close-on-exec pipe, which the kernel does before it lays out the new
    # program's environment: for a moment a just-started process shows an empty /proc/<pid>/environ (CI caught the
    # grandchild there once). Look again until it has one.
    deadline = time.monotonic() + 10
    while (found := processes_with_env("SIM_TEST_MARK", token)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found == expected
    assert processes_with_env("SIM_TEST_MARK", token + "x") == []
