"""One worker binary in its own session, so a signal sent to its process group reaches its children too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

# The C library, loaded here at import: die_with_parent runs between fork and exec, where nothing may be imported.
from elastic_impl.multiprocessing.redirects import libc as _libc

__all__ = ["SubprocessHandler"]

IS_WINDOWS = sys.platform == "win32"


IS_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a just-started worker: be SIGKILLed when ``parent_pid`` (the agent) dies, so a SIGKILLed agent never
    leaves workers holding devices. Runs between fork and exec too, so it only calls into libc and os."""
    if not IS_LINUX:
        return
    try:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def _default_death_signal() -> signal.Signals:
    return signal.CTRL_C_EVENT if IS_WINDOWS else signal.SIGTERM  # type: ignore[attr-defined]


class SubprocessHandler:
    def __init__(
        self,
        entrypoint: str,
        args: tuple,
        env: dict[str, str],
        stdout: str | None,
        stderr: str | None,
        local_rank_id: int,
        numa_options: Any | None = None,
    ):
        # The CPUs are chosen here, in the agent (it needs torch.cuda and files, which a child between fork and exec
        # must not touch); the child only applies them. The binding outlives exec.
        self._numa_cpus: set[int] | None = None
        if numa_options is not None:
            from elastic_impl.multiprocessing.numa_binding import worker_cpus

            self._numa_cpus = worker_cpus(numa_options, local_rank_id)
        self._stdout = open(stdout, "w") if stdout else None  # noqa: SIM115 - closed in close()
        self._stderr = open(stderr, "w") if stderr else None  # noqa: SIM115
        env_vars = os.environ.copy()
        env_vars.update(env)
        args_str = (entrypoint, *[str(a) for a in args])
        self.local_rank_id = local_rank_id
        self.proc: subprocess.Popen = self._popen(args_str, env_vars)

    def _popen(self, args: tuple, env: dict[str, str]) -> subprocess.Popen:
        kwargs: dict[str, Any] = {}
        if not IS_WINDOWS:
            kwargs["start_new_session"] = True  # own session => own process group (pgid == pid)
        # (PR_SET_PDEATHSIG follows the starting thread, so only the main thread's workers get it.)
        parent = os.getpid() if IS_LINUX and threading.current_thread() is threading.main_thread() else None
        cpus = self._numa_cpus
        if parent is not None or cpus:
            def in_child() -> None:
                if cpus:
                    os.sched_setaffinity(0, cpus)
                if parent is not None:
                    die_with_parent(parent)

            kwargs["preexec_fn"] = in_child
        return subprocess.Popen(args=args, env=env, stdout=self._stdout, stderr=self._stderr, **kwargs)

    def close(self, death_sig: signal.Signals | None = None) -> None:
        if not death_sig:
            death_sig = _default_death_signal()
        if self.proc.poll() is None:
            try:
                if IS_WINDOWS:
                    self.proc.send_signal(death_sig)
                else:
                    os.killpg(self.proc.pid, death_sig)
            except (ProcessLookupError, PermissionError):
                pass
        if self._stdout:
            self._stdout.close()
        if self._stderr:
            self._stderr.close()
