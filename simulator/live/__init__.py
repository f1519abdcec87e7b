"""Live mode: real agents (``elastic-run``) as processes on loopback, a real store behind per-node proxies, real
faults (see :mod:`simulator.live.cluster` and :mod:`simulator.live.runner`)."""

from simulator.live.cluster import Cluster, LiveError  # noqa: F401
from simulator.live.runner import cluster_for, run_scenario  # noqa: F401
