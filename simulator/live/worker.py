"""The worker program of a live simulated job: ``examples/train.py`` under a watchdog timer.

Run by the agent as ``python -u simulator/live/worker.py``. When ``$ELASTIC_SIM_TIMER_FILE`` names the FIFO of a
:class:`~elastic_impl.timer.FileTimerServer` (the simulator hosts one per node), the whole training run is guarded by
``expires(after=$ELASTIC_SIM_TIMER_AFTER)`` (default 3600 s), so the nemesis's ``expire_timer`` makes the server reap
this worker exactly as an overrun would. The training script is ``$ELASTIC_SIM_TRAIN_SCRIPT``.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys


def main() -> None:
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
