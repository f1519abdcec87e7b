"""EtcdStore (v2) and EtcdV3Store: the c10d Store contract against a real etcd."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.etcd


def _v2_store(server, prefix, timeout):
    from elastic_impl.rendezvous._etcd_client import BoundedEtcdClient
    from elastic_impl.rendezvous.etcd_store import EtcdStore

    client = BoundedEtcdClient(server.get_host(), server.get_port(), read_timeout=10, connect_timeout=2)
    return EtcdStore(client, prefix, timeout=timeout)


def _v3_store(server, prefix, timeout):
    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client, EtcdV3Store

    return EtcdV3Store(EtcdV3Client(server.get_host(), server.get_port(), read_timeout=10, connect_timeout=2),
                       prefix, timeout=timeout)


@pytest.fixture(params=["v2", "v3"])
def make_store(request, etcd_server):
    factory = _v2_store if request.param == "v2" else _v3_store
    prefix = f"/test/store/{uuid.uuid4().hex[:8]}"

    def make(timeout=timedelta(seconds=5), server=etcd_server):
        return factory(server, prefix, timeout)

    return make


def test_set_get_overwrite_and_binary(make_store):
    store = make_store()
    assert isinstance(store, dist.Store)
    store.set("k", "first")
    store.set("k", b"second")
    assert store.get("k") == b"second"
    # Keys whose base64 holds '/' and '+' (b"\xff\xff\xff" -> "////" in standard base64) must round-trip.
    for key in (b"\xff\xff\xff", b"\xfb\xef\xbe", "with/slash"):
        store.set(key, b"\x00\x01\xff")
        assert store.get(key) == b"\x00\x01\xff"


def test_get_waits_for_a_late_key_and_times_out(make_store):
    store = make_store(timeout=timedelta(seconds=1))
    writer = make_store()
    timer = threading.Timer(0.3, lambda: writer.set("late", "v"))
    timer.start()
    try:
        assert store.get("late") == b"v"
    finally:
        timer.cancel()
    started = time.monotonic()
    with pytest.raises(LookupError, match="never"):
        store.get("never")
    assert 0.9 <= time.monotonic() - started < 5


def test_add_is_atomic_across_clients(make_store):
    stores = [make_store() for _ in range(4)]
    assert stores[0].add("counter", 3) == 3
    assert stores[1].add("counter", 4) == 7
    results: list[int] = []
    lock = threading.Lock()

    def bump(store):
        for _ in range(5):
            value = store.add("race", 1)
            with lock:
                results.append(value)

    threads = [threading.Thread(target=bump, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(1, 21))
    assert stores[0].get("race") == b"20"


def test_check_never_waits(make_store):
    store = make_store(timeout=timedelta(seconds=30))
    store.set("present", "x")
    started = time.monotonic()
    assert store.check(["present"]) is True
    assert store.check(["present", "absent"]) is False
    assert time.monotonic() - started < 5


def test_wait_for_several_keys_and_override_timeout(make_store):
    store = make_store(timeout=timedelta(seconds=30))
    writer = make_store()
    timers = [threading.Timer(0.2, lambda: writer.set("a", "1")), threading.Timer(0.5, lambda: writer.set("b", "2"))]
    for t in timers:
        t.start()
    try:
        store.wait(["a", "b"])
    finally:
        for t in timers:
            t.cancel()
    assert store.get("a") == b"1" and store.get("b") == b"2"
    started = time.monotonic()
    with pytest.raises(LookupError):
        store.wait(["a", "never"], timedelta(seconds=1))
    assert 0.9 <= time.monotonic() - started < 5


def test_prefix_store_over_it(make_store):
    base = make_store()  # keep the Python object alive: the C++ PrefixStore only holds its trampoline
    store = dist.PrefixStore("round.3", base)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert store.add("n", 2) == 2


def test_unreachable_etcd_is_a_fast_network_error_naming_the_endpoint(make_store, private_etcd_server):
    store = make_store(server=private_etcd_server)
    store.set("k", "v")
    endpoint = private_etcd_server.get_endpoint()
    private_etcd_server.stop()
    for op in (lambda: store.set("k", "v"), lambda: store.get("k"), lambda: store.add("n", 1)):
        started = time.monotonic()
        with pytest.raises(dist.DistNetworkError) as info:
            op()
        assert endpoint in str(info.value) and "\n" not in str(info.value)
        assert time.monotonic() - started < 5


def test_the_agents_bounded_round_store_works_over_an_etcd_store(etcd_server):
    """The agent bounds its own calls on the round's store and, over a TCPStore, uses a clone of it; torch's clone()
    of an etcd store raises "pure virtual function", which failed every call of the agent on etcd (the live cascade
    scenario on etcd: "could not be counted against max_restarts"). Such a store is used as it is."""
    from elastic_impl.utils.bounded_call import BoundedStore

    etcd_store = _v2_store(etcd_server, f"/bounded/{uuid.uuid4().hex}", timedelta(seconds=10))  # kept alive: the
    template = dist.PrefixStore("round1", etcd_store)  # prefix store calls back into this Python object
    with pytest.raises(RuntimeError, match="pure virtual"):
        template.clone()
    store = BoundedStore(template, 5.0, "the round's store")
    store.set("k", b"v")
    assert store.get("k") == b"v" and store.add("n", 2) == 2 and store.check(["k"])
    assert template.get("k") == b"v"  # the same store, not a copy


def test_v2_store_prefix_is_kept_as_given_and_must_be_a_str(etcd_server):
    """Upstream's attribute: the prefix as given plus '/'; a relative one still round-trips (upstream's does not)."""
    from elastic_impl.rendezvous.etcd_store import EtcdStore

    relative = _v2_store(etcd_server, f"test/relative/{uuid.uuid4().hex[:8]}", timedelta(seconds=2))
    assert relative.prefix.startswith("test/relative/") and relative.prefix.endswith("/")
    relative.set("k", "v")
    assert relative.get("k") == b"v" and relative.check(["k"])
    with pytest.raises(ValueError, match="etcd_store_prefix.*None"):
        EtcdStore(relative.client, None)


@pytest.mark.parametrize("amount", [1.5, "3", None])
def test_v2_store_add_refuses_a_non_integer_amount_without_writing(etcd_server, amount):
    store = _v2_store(etcd_server, f"/test/add/{uuid.uuid4().hex[:8]}", timedelta(seconds=0.2))
    with pytest.raises(ValueError, match="integer amount") as info:
        store.add("counter", amount)
    assert repr(amount) in str(info.value)
    assert not store.check(["counter"])
    assert store.add("counter", True) == 1  # an int-like bool counts, as in TCPStore.add


def test_v2_store_unreachable_etcd_is_also_python_etcds_connection_error(private_etcd_server):
    """Code written against upstream catches etcd.EtcdConnectionFailed; c10d code catches DistNetworkError."""
    import etcd

    store = _v2_store(private_etcd_server, "/test/unreachable", timedelta(seconds=0.2))
    private_etcd_server.stop()
    for call in (lambda: store.set("a", "b"), lambda: store.get("a"), lambda: store.add("a", 1)):
        with pytest.raises(etcd.EtcdConnectionFailed) as info:
            call()
        assert isinstance(info.value, dist.DistNetworkError)
