"""The worker program of a live simulated job: ``examples/train.py`` under a watchdog timer.

Run by the agent as ``python -u simulator/live/worker.py``. When ``$ELASTIC_SIM_TIMER_FILE`` names the FIFO of a
:class:`~elastic_impl.timer.FileTimerServer` (the simulator hosts one per node), the whole training run is guarded by
``expires(after=$ELASTIC_SIM_TIMER_AFTER)`` (default 3600 s), so the nemesis's ``expire_timer`` makes the server reap
this worker exactly as an overrun would. The training script is ``$ELASTIC_SIM_TRAIN_SCRIPT``.

``$ELASTIC_SIM_DAEMON`` (scenario ``job: {daemon: true}``): before training, the worker double-forks a daemon (a
``sleep`` in a session of its own, re-parented away from the worker) that would outlive the job unless the runtime
stops it; its pid is written to ``$MARKER_DIR/daemon.<pid>``. ``keep-environment``: the daemon inherits the worker's
environment, the runtime's worker-group mark included (what a real service started by a worker does).
``drop-group-mark``: the daemon is started without that mark, as if the runtime did not mark workers (the simulator's
tests use it to show the orphan check catches a daemon the runtime missed).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys

DAEMON_ENV = "ELASTIC_SIM_DAEMON"
DAEMON_MODES = ("keep-environment", "drop-group-mark")


def _spawn_daemon(mode: str) -> int:
    """Double-fork a setsid ``sleep 600``; return its pid once it runs."""
    if mode not in DAEMON_MODES:
        sys.stderr.write(f"simulator worker: {DAEMON_ENV}={mode!r} is invalid (allowed: {', '.join(DAEMON_MODES)})\n")
        sys.exit(2)
    env = dict(os.environ)
    if mode == "drop-group-mark":
        from elastic_impl.multiprocessing.api import WORKER_GROUP_MARK_ENV

        env.pop(WORKER_GROUP_MARK_ENV, None)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the intermediate: a new session, fork the daemon, report its pid, exit (orphaning it)
        try:
            os.close(read_end)
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.closerange(3, 1024)
                os.execve("/bin/sleep", ["sleep", "600"], env)
            os.write(write_end, str(daemon).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        pid = int(pipe.read())
    os.waitpid(child, 0)
    return pid


def main() -> None:
    daemon_mode = os.environ.get(DAEMON_ENV)
    if daemon_mode:
        pid = _spawn_daemon(daemon_mode)
        marker_dir = os.environ.get("MARKER_DIR")
        if marker_dir:
            with open(os.path.join(marker_dir, f"daemon.{pid}"), "w") as f:
                f.write(str(pid))
    script = os.environ.get("ELASTIC_SIM_TRAIN_SCRIPT")
    if not script or not os.path.isfile(script):
        sys.stderr.write(f"simulator worker: ELASTIC_SIM_TRAIN_SCRIPT={script!r} is not a file\n")
        sys.exit(2)
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    timer_file = os.environ.get("ELASTIC_SIM_TIMER_FILE")
    if timer_file:
        from elastic_impl.timer import FileTimerClient, expires

        after = float(os.environ.get("ELASTIC_SIM_TIMER_AFTER", "3600"))
        guard = expires(after=after, scope="train", client=FileTimerClient(timer_file))
    sys.argv = [script, *sys.argv[1:]]
    with guard:
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
