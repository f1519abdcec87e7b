"""Process faults: SIGKILL a worker, SIGKILL a whole node (agent + every descendant), SIGSTOP/SIGCONT an agent.

Process trees are read from ``/proc`` (Linux) by :mod:`elastic_impl.utils.proc_tree`. Workers of ``elastic_impl``
run in their own sessions, so a node is killed by walking the agent's descendants, not by ``killpg`` alone: every
process of the tree is first stopped (so nothing can fork or reap in between), then all are killed.

:func:`processes_with_env` finds every live process whose environment holds a marker variable: processes inherit
their environment, so a marker set on an agent also tags its workers and their children. The simulator uses it for
its orphan check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable

from elastic_impl.utils.proc_tree import descendants, is_alive, pids_with_env, process_table
from fault_injection.base import Fault, FaultError

__all__ = [
    "KillWorker",
    "KillAgent",
    "PauseAgent",
    "descendants",
    "is_alive",
    "kill_processes",
    "kill_session",
    "processes_with_env",
]


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes (of this user) whose initial environment has ``key=value``; see
    :func:`elastic_impl.utils.proc_tree.pids_with_env`."""
    return [pid for pid in pids_with_env(key, value) if is_alive(pid)]


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_session(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the process group ``proc`` leads (it was started with ``start_new_session=True``), reap ``proc`` and
    close its pipes. A crash, not a shutdown: for servers and nodes a test or the simulator owns."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def kill_processes(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Stop, then SIGKILL ``pids`` and all their descendants; wait until none is alive. Return the pids signalled."""
    roots = [p for p in pids if p > 1]
    seen: set[int] = set()
    # Freeze the whole tree first (repeat until no new descendant shows up) so nothing forks or re-parents
    # while we kill; SIGKILL works on stopped processes.
    for _ in range(20):
        tree = set(roots) | set(descendants(roots, process_table()))
        new = tree - seen
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        seen |= new
    for p in seen:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(is_alive(p) for p in seen):
        if time.monotonic() > deadline:
            alive = sorted(p for p in seen if is_alive(p))
            raise FaultError(f"processes {alive} still alive {timeout:g} s after SIGKILL")
        time.sleep(0.01)
    return sorted(seen)


class KillWorker(Fault):
    """SIGKILL one worker process (its agent sees the failure and restarts or fails the job)."""

    kind = "kill_worker"
    instant = True

    def __init__(self, pid: int, on_event=None, **labels) -> None:
        if not isinstance(pid, int) or pid <= 1:
            raise FaultError(f"kill_worker needs a worker pid > 1, got {pid!r}")
        super().__init__(on_event, pid=pid, **labels)
        self.pid = pid

    def _inject(self) -> int:
        if not _signal(self.pid, signal.SIGKILL):
            raise FaultError(f"kill_worker: worker pid {self.pid} does not exist")
        return self.pid


class KillAgent(Fault):
    """SIGKILL a node: the agent and every process below it (workers, their children), like a machine dying."""

    kind = "kill_agent"
    instant = True

    def __init__(self, pid: int, on_event=None, **labels) -> None:
        if not isinstance(pid, int) or pid <= 1:
            raise FaultError(f"kill_agent needs an agent pid > 1, got {pid!r}")
        super().__init__(on_event, pid=pid, **labels)
        self.pid = pid

    def _inject(self) -> list[int]:
        if not is_alive(self.pid):
            raise FaultError(f"kill_agent: agent pid {self.pid} is not running")
        return kill_processes([self.pid])

    def _result_detail(self):
        return {"killed": self.result}


class PauseAgent(Fault):
    """SIGSTOP the agent process (its workers keep running; its heartbeats and monitoring stop); heal: SIGCONT."""

    kind = "pause_agent"

    def __init__(self, pid: int, on_event=None, **labels) -> None:
        if not isinstance(pid, int) or pid <= 1:
            raise FaultError(f"pause_agent needs an agent pid > 1, got {pid!r}")
        super().__init__(on_event, pid=pid, **labels)
        self.pid = pid

    def _inject(self) -> int:
        if not _signal(self.pid, signal.SIGSTOP):
            raise FaultError(f"pause_agent: agent pid {self.pid} does not exist")
        return self.pid

    def _heal(self) -> None:
        _signal(self.pid, signal.SIGCONT)  # gone already: nothing left to resume
