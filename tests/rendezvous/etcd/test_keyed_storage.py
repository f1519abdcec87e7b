"""The keyed-storage part of the backend seam, one contract for every backend that offers it: in-memory, c10d (a
real TCPStore) and etcd-v3 (a real etcd). The dynamic rendezvous's O(N)-bytes rounds rest on these semantics."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

KEYED_BACKENDS = ["in-memory", "c10d", "etcd-v3"]


@pytest.fixture
def make_backend(request, run_id):
    """Factory for backends of the run ``run_id`` (several calls: several clients of the same run)."""
    kind = request.param
    made = []
    if kind == "in-memory":
        from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend

        shared = InMemoryRendezvousBackend()

        def make():
            return shared
    elif kind == "c10d":
        from torch.distributed import TCPStore

        from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

        server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), use_libuv=True)
        made.append(server)

        def make():
            client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
            made.append(client)
            return C10dRendezvousBackend(client, run_id)
    else:
        from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client, EtcdV3RendezvousBackend

        server = request.getfixturevalue("etcd_server")

        def make():
            client = EtcdV3Client(server.get_host(), server.get_port())
            made.append(client)
            return EtcdV3RendezvousBackend(client, run_id, ttl=60)
    yield make
    for thing in made:
        if hasattr(thing, "close"):
            thing.close()


pytestmark = pytest.mark.parametrize("make_backend", KEYED_BACKENDS, indirect=True)


def test_set_get_many_and_delete_many(make_backend):
    backend = make_backend()
    assert backend.supports_keys()
    names = [f"k{i}" for i in range(300)]  # more than etcd's 128 operations in one transaction
    assert backend.key_get_many(names[:3]) == [None, None, None]
    for i in (0, 1, 150, 299):
        backend.key_set(names[i], f"v{i}\x00\xff".encode("latin-1"))
    got = backend.key_get_many(names)
    assert len(got) == 300
    assert {i: v for i, v in enumerate(got) if v is not None} == {
        i: f"v{i}\x00\xff".encode("latin-1") for i in (0, 1, 150, 299)}
    assert backend.key_get_many([]) == []
    backend.key_delete_many(names + ["never-set"])
    assert backend.key_get_many([names[0], names[150], names[299]]) == [None, None, None]


def test_compare_set(make_backend):
    backend = make_backend()
    # None expected: only if the key is missing.
    assert backend.key_compare_set("claim", None, b"a|1") == b"a|1"
    assert backend.key_compare_set("claim", None, b"b|2") == b"a|1"
    # A matching value is replaced; a stale one is not, and the current value comes back.
    assert backend.key_compare_set("claim", b"a|1", b"b|2") == b"b|2"
    assert backend.key_compare_set("claim", b"a|1", b"c|3") == b"b|2"
    assert backend.key_get_many(["claim"]) == [b"b|2"]


def test_counter_gives_every_concurrent_add_its_own_slot(make_backend):
    """16 clients adding 1 at once get 16 distinct slots 1..16: the arrival counter of a round."""
    clients = [make_backend() for _ in range(16)]
    assert clients[0].key_add("n", 0) == 0
    slots, errors = [], []
    start = threading.Barrier(len(clients))

    def arrive(backend):
        try:
            start.wait()
            slots.append(backend.key_add("n", 1))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=arrive, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(slots) == list(range(1, 17))
    assert clients[0].key_add("n", 0) == 16
    assert clients[0].key_add("n", 2) == 18
    clients[0].key_delete_many(["n"])
    assert clients[0].key_add("n", 0) == 0  # a deleted counter starts again from zero
