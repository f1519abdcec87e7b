"""BoundedStore / BoundedCalls: the agent's own store calls, bounded, over any store."""

from __future__ import annotations

import threading
import time

import pytest

from elastic_impl.utils.bounded_call import BoundedCalls, StoreCallTimeout


def test_a_call_past_its_bound_is_abandoned_and_the_next_fails_at_once_until_it_returns():
    release = threading.Event()
    calls = BoundedCalls(0.3, "the test store")
    started = time.monotonic()
    with pytest.raises(StoreCallTimeout, match=r"^the test store: no answer within 0\.3 s$"):
        calls(release.wait)
    assert 0.3 <= time.monotonic() - started < 2.0 and calls.stuck
    with pytest.raises(StoreCallTimeout, match="an earlier call got no answer within 0.3 s"):
        calls(lambda: 1)
    release.set()
    deadline = time.monotonic() + 5
    while calls.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls(lambda: 7) == 7
    with pytest.raises(ValueError, match="positive seconds, got 0"):
        BoundedCalls(0, "x")
