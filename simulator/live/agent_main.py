"""The agent process of a live simulated node: ``python -m simulator.live.agent_main <elastic-run options>``.

Exactly ``elastic-run`` (``elastic_impl.run.main``), plus one hook: when ``$ELASTIC_SIM_CLOCK_FILE`` is set, the
process's wall clock is shifted by the offset in that file (:func:`fault_injection.clock.install_skew`), so the
nemesis can skew this node's clock while it runs.
"""

from __future__ import annotations

import sys

from fault_injection.clock import install_skew


def main() -> None:
    install_skew()
    from elastic_impl.run import main as run_main

    run_main(sys.argv[1:])


if __name__ == "__main__":
    main()
