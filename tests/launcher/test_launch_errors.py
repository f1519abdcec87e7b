"""launch_agent tells a node that leaves from a job that ends by the exception's type (subclasses included), not by
its class name: a backend's own RendezvousConnectionError subclass must not close the run for every node."""

from __future__ import annotations

import pytest

from elastic_impl.launcher.api import LaunchConfig, launch_agent
from elastic_impl.rendezvous import rendezvous_handler_registry
from elastic_impl.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousGracefulExitError,
    RendezvousHandler,
)

pytestmark = pytest.mark.timeout(60)


class LostTheStoreError(RendezvousConnectionError):
    """A backend's own, more precise connection error."""


class LeavingNowError(RendezvousGracefulExitError):
    pass


class FailingHandler(RendezvousHandler):
    """A backend whose rendezvous fails with a given error; records whether the node left or closed the run."""

    error: Exception = RuntimeError("unset")
    released: list[str] = []

    def __init__(self, params) -> None:
        self._run_id = params.run_id

    def get_backend(self) -> str:
        return "test-failing"

    def next_rendezvous(self):
        raise type(self).error

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        FailingHandler.released.append("set_closed")

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self._run_id

    def shutdown(self) -> bool:
        FailingHandler.released.append("shutdown")
        return True

    def leave(self) -> None:
        FailingHandler.released.append("leave")


rendezvous_handler_registry.register("test-failing", FailingHandler)


@pytest.mark.parametrize("error", [LostTheStoreError("store gone"), LeavingNowError("bye")],
                         ids=["connection-subclass", "graceful-exit-subclass"])
def test_a_subclass_of_a_leaving_error_leaves_without_closing_the_run(error):
    FailingHandler.error, FailingHandler.released = error, []
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, run_id="r", rdzv_backend="test-failing",
                          max_restarts=0)
    with pytest.raises(type(error)):
        launch_agent(config, "true", [])
    # Before: matched by class name, so a subclass counted as the job's end and shut the run down for every node.
    assert FailingHandler.released == ["leave"]


def test_another_error_ends_the_job_and_closes_the_run():
    FailingHandler.error, FailingHandler.released = RuntimeError("broken"), []
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, run_id="r", rdzv_backend="test-failing",
                          max_restarts=0)
    with pytest.raises(RuntimeError):
        launch_agent(config, "true", [])
    assert FailingHandler.released == ["shutdown"]
