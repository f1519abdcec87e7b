"""pytest fixtures for live cluster tests (registered by :mod:`simulator.pytest_plugin`).

``cluster``: a :class:`simulator.live.Cluster` under the test's tmp dir, closed at teardown (every process stopped,
orphan check recorded in ``cluster.history``)::

    @pytest.mark.cluster(max_restarts=1, job={"steps": 4, "step_seconds": 0.5})   # optional settings
    def test_worker_crash_is_survived(cluster):
        cluster.start(nodes=2, workers=2)
        cluster.kill_worker(node=1, rank=0)
        assert cluster.wait() == "succeeded"
        assert cluster.history.filter("worker_failed", "node1")

``cluster_factory(**settings)``: more than one cluster in a test (all closed at teardown).

Nothing here imports torch or the runtime until a fixture is used, so loading the plugin stays cheap.
"""

from __future__ import annotations

import pytest

__all__ = ["cluster", "cluster_factory"]


def _settings(request) -> dict:
    marker = request.node.get_closest_marker("cluster")
    if marker is None:
        return {}
    if marker.args:
        raise pytest.UsageError(f"@pytest.mark.cluster takes keyword settings only, got positional {marker.args!r}")
    return dict(marker.kwargs)


@pytest.fixture
def cluster_factory(request, tmp_path_factory):
    from simulator.live import Cluster

    made = []

    def make(**settings):
        out = tmp_path_factory.mktemp("cluster")
        c = Cluster(out, **{**_settings(request), **settings})
        made.append(c)
        return c

    yield make
    errors = []
    for c in reversed(made):
        try:
            c.close()
        except Exception as e:  # close every cluster even if one fails to
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory()
