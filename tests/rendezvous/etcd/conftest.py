"""Real etcd servers for the etcd tests: one per xdist worker (module-shared), plus private ones tests may kill."""

from __future__ import annotations

import pytest


def _etcd_binary_or_skip() -> str:
    from elastic_impl.rendezvous.etcd_server import find_etcd_binary

    try:
        return find_etcd_binary()
    except FileNotFoundError as e:
        pytest.skip(f"needs the etcd binary: {e}")


def _started_server():
    from elastic_impl.rendezvous.etcd_server import EtcdServer

    _etcd_binary_or_skip()
    server = EtcdServer()
    try:
        server.start(timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def etcd_server():
    """A real etcd (v2 enabled) on loopback, shared by the tests of this worker; always stopped at the end."""
    server = _started_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_etcd_server():
    """A real etcd this test alone uses (so it may stop it); always stopped at teardown."""
    server = _started_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def run_id(request) -> str:
    """A run id unique to the test, so tests sharing one etcd never see each other's state."""
    import uuid

    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "").replace("/", "-")
