"""elastic_impl.utils.store helpers over a real TCPStore, with several clients on threads."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from elastic_impl.utils.store import barrier, get_all, synchronize


def clients(store, count):
    return [TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=5)) for _ in range(count)]


def test_synchronize_gathers_in_rank_order(tcp_store):
    stores = clients(tcp_store, 3)
    results = {}

    def run(rank):
        results[rank] = synchronize(stores[rank], f"d{rank}".encode(), rank, 3, "sync/", timeout=10)

    threads = [threading.Thread(target=run, args=(r,)) for r in (2, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == {r: [b"d0", b"d1", b"d2"] for r in range(3)}
    assert get_all(tcp_store, 0, "sync/", 3) == [b"d0", b"d1", b"d2"]


def test_barrier_releases_everyone(tcp_store):
    stores = clients(tcp_store, 3)
    passed = []
    threads = [threading.Thread(target=lambda s=s: (barrier(s, 3, "b1", barrier_timeout=10), passed.append(1))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(passed) == 3


def test_barrier_timeout_names_missing_ranks(tcp_store):
    with pytest.raises(RuntimeError) as excinfo:
        barrier(tcp_store, 3, "b2", barrier_timeout=0.5, rank=1, rank_tracing_decoder=lambda r: f"node{r}")
    message = str(excinfo.value)
    assert "1 of 3 arrived" in message and "node0, node2" in message
