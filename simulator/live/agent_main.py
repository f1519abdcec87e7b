"""The agent process of a live simulated node: ``python -m simulator.live.agent_main <elastic-run options>``.

Exactly ``elastic-run`` (``elastic_impl.run.console_main``), plus two hooks:

- ``$ELASTIC_SIM_CLOCK_FILE``: the process's wall clock is shifted by the offset in that file
  (:func:`fault_injection.clock.install_skew`), so the nemesis can skew this node's clock while it runs.
- ``$ELASTIC_SIM_HOLD_FILE``: a spare node. It imports the launcher (and torch) first, then waits until that file
  exists before running ``elastic-run``. The simulator pre-starts the nodes a scenario adds later this way, so an
  ``add_node`` joins at the scheduled time instead of after an interpreter start-up whose length depends on the
  machine's load. Nothing of the agent runs before the release.
"""

from __future__ import annotations

import os
import sys
import time

from fault_injection.clock import install_skew


def _hold(path: str) -> None:
    import torch.distributed  # noqa: F401

    import elastic_impl.agent.server.local_elastic_agent  # noqa: F401  (warm-up only)
    import elastic_impl.rendezvous  # noqa: F401
    import elastic_impl.run  # noqa: F401

    while not os.path.exists(path):
        time.sleep(0.02)


def main() -> None:
    hold = os.environ.get("ELASTIC_SIM_HOLD_FILE")
    if hold:
        _hold(hold)
    install_skew()
    from elastic_impl.run import console_main

    console_main(sys.argv[1:])


if __name__ == "__main__":
    main()
