"""pytest plugin registered through the ``pytest11`` entry point: the ``cluster`` / ``cluster_factory`` fixtures
(see :mod:`simulator.fixtures`) and the ``cluster`` marker for their settings. Importing it loads no torch."""

from simulator.fixtures import cluster, cluster_factory  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cluster(**settings): settings for the live `cluster` fixture (workers_per_node, max_restarts, min_nodes, "
        "max_nodes, backend, timeouts, job, env, ...)",
    )
