"""Fixtures for agent tests: a real TCPStore server on a free loopback port, closed after each test."""

from __future__ import annotations

from datetime import timedelta

import pytest


@pytest.fixture
def tcp_store():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield store
    del store
