"""The process tree as Linux's ``/proc`` shows it: one reader of ``/proc/<pid>/stat``, the table of every process,
descendants by parent links, liveness, and processes by an environment entry.

The runtime uses it to find a worker group's stray processes (``multiprocessing.api``); the fault injector and the
benchmarks use it to kill whole process trees. Where ``/proc`` does not exist, the table is empty and nothing is
found (liveness falls back to ``kill(pid, 0)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ProcStat", "descendants", "is_alive", "pid_exists", "pids_with_env", "process_table", "read_stat"]

# Past their exit: a zombie waits for its parent to reap it; X (dead) is seen for an instant at most.
_EXITED_STATES = ("Z", "X")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    state: str  # one letter: R, S, D, T, Z, ...
    ppid: int
    session: int
    start_time: str | None  # clock ticks after boot: with the pid, names one process even after pid reuse

    @property
    def exited(self) -> bool:
        return self.state in _EXITED_STATES


def read_stat(pid: int | str) -> ProcStat | None:
    """``/proc/<pid>/stat`` of ``pid``; None when it is gone, cannot be read or is malformed."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')': the fields after it start
    # after the LAST ')'.
    _, paren, after_comm = data.rpartition(")")
    fields = after_comm.split()
    if not paren or len(fields) < 4:
        return None
    try:
        ppid, session = int(fields[1]), int(fields[3])
    except ValueError:
        return None
    return ProcStat(fields[0], ppid, session, fields[19] if len(fields) > 19 else None)


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc (not Linux)
        return []


def process_table() -> dict[int, ProcStat]:
    """pid -> stat of every live (not exited) process visible in ``/proc``."""
    table: dict[int, ProcStat] = {}
    for pid in _pids():
        stat = read_stat(pid)
        if stat is not None and not stat.exited:
            table[pid] = stat
    return table


def descendants(root: int | Iterable[int], table: dict[int, ProcStat] | None = None) -> list[int]:
    """Live descendants of ``root`` (or of any of several roots), each once: children, grandchildren, ... by parent
    links, whatever session or process group they moved to; from one root, parents come before their children.
    ``table`` is a :func:`process_table` already read."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    roots = [root] if isinstance(root, int) else list(root)
    found: list[int] = []
    seen: set[int] = set()  # roots may descend from one another: each process once
    stack = [child for r in roots for child in children.get(r, [])]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has; ``kill(pid, 0)`` would still call it alive)."""
    stat = read_stat(pid)
    if stat is not None:
        return not stat.exited
    return pid_exists(pid)  # gone, or no /proc to ask


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (``kill(pid, 0)``: a zombie does; another user's process does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes (other than this one; of this user: others' environments are not readable) whose initial
    environment has ``key=value``. Processes inherit their environment, so a marker set on a parent tags its whole
    tree, including children that moved to sessions of their own. A process in the middle of exec has no
    environment to read yet: it is found by the next call."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or another user's process
            continue
        if needle in env.split(b"\0"):
            found.append(pid)
    return sorted(found)
