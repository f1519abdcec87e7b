"""Top-level test configuration. Area fixtures live in tests/<area>/conftest.py; fixtures two areas share live here."""

from __future__ import annotations

from datetime import timedelta

import pytest

# How long a fixture's server may take to come up. The TCPStore constructor returns once its own client has connected
# and been answered, i.e. when the server is ready; on the shared 2-core machine that took over 5 s under load (a
# fixed 5 s timeout failed tests in their fixture), so the wait is generous and only the operations get a short one.
SERVER_READY_TIMEOUT = timedelta(seconds=120)
# A store operation that cannot complete (a get of a key nobody sets) fails after this, so a broken test fails fast.
STORE_OP_TIMEOUT = timedelta(seconds=10)


@pytest.fixture
def tcp_store():
    """A real TCPStore server on a free loopback port, ready when the test starts; deleted at the end."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=SERVER_READY_TIMEOUT,
                     multi_tenant=False, use_libuv=True)
    store.set_timeout(STORE_OP_TIMEOUT)
    yield store
    del store


def pytest_sessionfinish(session, exitstatus):
    """Let store calls that tests abandoned finish before this process exits.

    A rendezvous store call abandoned on a cut-off store (a daemon thread blocked in TCPStore's C++ code) that
    returns while the interpreter tears down aborts the process (SIGABRT): pytest, or an xdist worker, would exit
    134 after every test passed. Tests close their proxies and stores, which ends such calls within the stores'
    own timeouts; this waits (bounded) for them.
    """
    import threading
    import time

    deadline = time.monotonic() + 20.0
    for thread in threading.enumerate():
        if thread.name.startswith(("rdzv-store-call", "rdzv-store-reconnect", "agent-store-call")):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
