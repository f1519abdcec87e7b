"""The guardian: stops what an agent's workers left running once the agent itself is gone (Linux only).

Why a separate process. A worker's double-forked ``setsid`` daemon is in no worker's session and, after its
intermediate parent exits, is re-parented to the agent (a child subreaper); the agent finds it by the worker-group
mark in its environment (``ELASTIC_IMPL_WORKER_GROUP``) when it stops the group. If the agent is SIGKILLed it stops
nothing: the workers started from its main thread die of their parent-death signal, but the daemon has none (the
kernel clears it across fork, and its parent was the intermediate anyway) and is re-parented again, to init. Nothing
in the kernel reaches such a process without cgroups or a PID namespace, so a process outside the agent has to:
this one, started by the agent (:func:`elastic_impl.multiprocessing.api._ensure_guardian`) in a session of its own.

It waits for the agent to end (a pidfd, or polling its parent pid where pidfds do not exist), or for SIGTERM (the
agent's normal exit), then SIGKILLs every process whose initial environment carries a group mark of that agent
(``<agent pid>.<agent token>.``) until a scan finds none, and exits. It uses the standard library only and is run as
a script (``python -I -S _guardian.py AGENT_PID MARK_PREFIX``), so it starts in a few milliseconds.

Limits: a process that wiped or replaced its environment when it exec'd carries no mark; a process in
uninterruptible sleep dies when the kernel lets go of it; a guardian SIGKILLed together with its agent (e.g. by a
kill of every process of the user) cannot act.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

MARK_KEY = b"ELASTIC_IMPL_WORKER_GROUP="
SWEEP_DEADLINE_S = 10.0


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Stop


def marked(prefix: bytes) -> list[int]:
    """Processes (but this one) whose initial environment has a group mark starting with ``prefix``. A zombie has
    no environment left to read, so it is never returned."""
    needle = MARK_KEY + prefix
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or another user's
            continue
        if needle in env and any(entry.startswith(needle) for entry in env.split(b"\0")):
            found.append(int(name))
    return found


def sweep(prefix: bytes) -> set[int]:
    """SIGKILL every marked process until two scans in a row find none (what forks meanwhile inherits the mark and
    is found by the next scan); give up after SWEEP_DEADLINE_S (a process stuck in the kernel)."""
    killed: set[int] = set()
    clean_scans = 0
    deadline = time.monotonic() + SWEEP_DEADLINE_S
    while clean_scans < 2 and time.monotonic() < deadline:
        found = marked(prefix)
        if not found:
            clean_scans += 1
            continue
        clean_scans = 0
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.01)
    return killed


def wait_for_exit(agent: int) -> None:
    """Return once ``agent`` (this process's parent) has ended."""
    fd = None
    try:
        fd = os.pidfd_open(agent)
    except (AttributeError, OSError):
        pass
    try:
        # Checked after the pidfd is open: if the agent is still our parent now, the pidfd is the agent's (not a
        # reused pid's), and its exit makes it readable.
        if os.getppid() != agent:
            return
        if fd is not None:
            select.select([fd], [], [])
            return
        while os.getppid() == agent:
            time.sleep(0.1)
    finally:
        if fd is not None:
            os.close(fd)


def main(argv: list[str]) -> int:
    agent, prefix = int(argv[1]), argv[2].encode()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        wait_for_exit(agent)
        how = "died"  # ended without telling us: SIGKILLed, or exited past its exit handlers
    except _Stop:
        how = "exited"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the sweep runs to its end
    killed = sweep(prefix)
    if killed:
        try:
            sys.stderr.write(f"elastic_impl: agent {agent} {how} leaving {len(killed)} process(es) of its workers "
                             f"running; stopped them (SIGKILL): pids {' '.join(map(str, sorted(killed)))}\n")
            sys.stderr.flush()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
