"""etcd-v2 and etcd-v3 backends: compare-and-set, TTL, parameters and errors, against a real etcd."""

from __future__ import annotations

import time

import pytest

from elastic_impl.rendezvous import (
    RendezvousConnectionError,
    RendezvousParameters,
    RendezvousStateError,
    rendezvous_handler_registry,
)

pytestmark = pytest.mark.etcd

BACKENDS = ["etcd-v2", "etcd-v3"]


def _module(backend: str):
    if backend == "etcd-v2":
        from elastic_impl.rendezvous import etcd_rendezvous_backend as module
    else:
        from elastic_impl.rendezvous import etcd_v3_rendezvous_backend as module
    return module


def _create(backend, endpoint, run_id, **options):
    params = RendezvousParameters(backend, endpoint, run_id, 1, 2, **options)
    return _module(backend).create_backend(params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_and_set(backend, etcd_server, run_id):
    first, _ = _create(backend, etcd_server.get_endpoint(), run_id)
    second, _ = _create(backend, etcd_server.get_endpoint(), run_id)
    assert first.name == backend
    assert first.get_state() is None

    state, token, ok = first.set_state(b"\x00one\xff")
    assert ok and state == b"\x00one\xff"
    assert second.get_state() == (b"\x00one\xff", token)

    # A second "create" loses and sees the winner.
    assert second.set_state(b"other") == (b"\x00one\xff", token, False)
    # With the current token it wins; the stale token then loses and reports the new state.
    state2, token2, ok2 = second.set_state(b"two", token)
    assert ok2 and state2 == b"two" and token2 != token
    assert first.set_state(b"stale", token) == (b"two", token2, False)
    # A token this backend never handed out cannot match.
    assert first.set_state(b"junk", "not-a-token") == (b"two", token2, False)
    # Nor can 0 (etcd v2 ignores prevIndex=0: the write used to land unconditionally) or a negative one.
    assert first.set_state(b"zero", 0) == (b"two", token2, False)
    assert first.set_state(b"negative", -1) == (b"two", token2, False)
    assert first.get_state() == (b"two", token2)

    other, _ = _create(backend, etcd_server.get_endpoint(), run_id + "-other")
    assert other.get_state() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_writers_exactly_one_wins(backend, etcd_server, run_id):
    import threading

    backends = [_create(backend, etcd_server.get_endpoint(), run_id)[0] for _ in range(6)]
    start = backends[0].set_state(b"0")
    results = []
    barrier = threading.Barrier(len(backends))

    def write(b, i):
        barrier.wait()
        results.append(b.set_state(f"w{i}".encode(), start[1]))

    threads = [threading.Thread(target=write, args=(b, i)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r[2]]
    assert len(winners) == 1
    assert all(r[0] == winners[0][0] and r[1] == winners[0][1] for r in results)


def test_v2_state_expires_after_its_ttl(etcd_server, run_id):
    from elastic_impl.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

    backend = EtcdRendezvousBackend(etcd_server.get_client(), run_id, key_prefix="/test/ttl", ttl=1)
    backend.set_state(b"short-lived")
    assert backend.get_state() is not None
    deadline = time.monotonic() + 10
    while backend.get_state() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert backend.get_state() is None


def test_v3_state_is_bound_to_a_lease(etcd_server, run_id):
    """The state key carries this process's lease (so it disappears ttl seconds after its last live writer)."""
    import base64

    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client, EtcdV3RendezvousBackend

    client = EtcdV3Client(etcd_server.get_host(), etcd_server.get_port())
    backend = EtcdV3RendezvousBackend(client, run_id, ttl=60)
    backend.set_state(b"leased")
    kv, _ = client.range(backend.key.encode())
    lease = int(kv.get("lease", 0))
    assert lease != 0
    answer = client.post("/v3/lease/timetolive", {"ID": str(lease)})
    assert 0 < int(answer["TTL"]) <= 60
    assert base64.b64decode(kv["value"]) == b"leased"


def test_corrupt_v2_state_is_a_state_error(etcd_server, run_id):
    from elastic_impl.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

    client = etcd_server.get_client()
    backend = EtcdRendezvousBackend(client, run_id, key_prefix="/test/corrupt")
    client.write(backend.key, "%%% not base64 %%%")
    with pytest.raises(RendezvousStateError, match=backend.key):
        backend.get_state()


@pytest.mark.parametrize("backend", [*BACKENDS, "etcd"])
def test_registry_creates_the_handler(backend, etcd_server, run_id):
    params = RendezvousParameters(backend, etcd_server.get_endpoint(), run_id, 1, 1, timeout=10, join_timeout=10)
    handler = rendezvous_handler_registry.create_handler(params)
    try:
        assert handler.get_backend() == backend
        assert handler.get_run_id() == run_id
        assert handler.is_closed() is False
        assert handler.num_nodes_waiting() == 0
    finally:
        handler.shutdown()


@pytest.mark.parametrize("backend", [*BACKENDS, "etcd"])
def test_unreachable_endpoint_fails_fast_naming_it(backend, private_etcd_server, run_id):
    endpoint = private_etcd_server.get_endpoint()
    private_etcd_server.stop()  # a port nobody listens on any more
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as info:
        rendezvous_handler_registry.create_handler(RendezvousParameters(backend, endpoint, run_id, 1, 1))
    assert time.monotonic() - started < 5
    assert endpoint in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("backend", "ca_option"), [("etcd-v2", "ca_cert"), ("etcd", "cacert")])
def test_https_with_an_unreadable_ca_cert_is_a_connection_error(backend, ca_option, etcd_server, run_id, tmp_path):
    """The urllib3 SSLError of a missing CA file used to be retried without limit (RecursionError after ~2 s)."""
    params = RendezvousParameters(backend, etcd_server.get_endpoint(), run_id, 1, 1, protocol="https",
                                  **{ca_option: str(tmp_path / "missing-ca.pem")})
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as info:
        rendezvous_handler_registry.create_handler(params)
    assert time.monotonic() - started < 5
    assert etcd_server.get_endpoint().split(":")[-1] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", [*BACKENDS, "etcd"])
@pytest.mark.parametrize(
    ("endpoint", "options", "named"),
    [
        ("http://127.0.0.1:2379", {}, "http://127.0.0.1:2379"),
        ("127.0.0.1:notaport", {}, "notaport"),
        ("127.0.0.1:99999", {}, "99999"),
        ("127.0.0.1:2379", {"protocol": "gopher"}, "gopher"),
        ("127.0.0.1:2379", {"read_timeout": "soon"}, "soon"),
        ("127.0.0.1:2379", {"connect_timeout": "-1"}, "-1"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_the_value(backend, endpoint, options, named):
    with pytest.raises(ValueError) as info:
        rendezvous_handler_registry.create_handler(RendezvousParameters(backend, endpoint, "run", 1, 1, **options))
    message = str(info.value)
    assert named in message and "\n" not in message


def test_missing_run_id_is_a_one_line_error():
    with pytest.raises(ValueError, match="run_id") as info:
        RendezvousParameters("etcd-v2", "127.0.0.1:2379", "", 1, 1)
    assert "\n" not in str(info.value)


def test_v3_per_node_leases_expire_for_silent_nodes(etcd_server, run_id):
    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client, EtcdV3RendezvousBackend

    backend = EtcdV3RendezvousBackend(EtcdV3Client(etcd_server.get_host(), etcd_server.get_port()), run_id)
    backend.heartbeat("alive-node", 2)
    backend.heartbeat("silent-node", 2)
    assert backend.live_nodes() == {"alive-node", "silent-node"}
    deadline = time.monotonic() + 20
    while "silent-node" in backend.live_nodes() and time.monotonic() < deadline:
        backend.heartbeat("alive-node", 2)  # only this one keeps renewing
        time.sleep(0.5)
    assert backend.live_nodes() == {"alive-node"}
    backend.forget("alive-node")
    assert backend.live_nodes() == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_version_and_wait_for_change(backend, etcd_server, run_id):
    import threading

    plain, _ = _create(backend, etcd_server.get_endpoint(), run_id)
    assert plain.state_version() is None  # off by default: the state machine polls
    waiter, _ = _create(backend, etcd_server.get_endpoint(), run_id, watch_state="true")
    writer, _ = _create(backend, etcd_server.get_endpoint(), run_id)
    assert waiter.state_version() == 0
    started = time.monotonic()
    assert waiter.wait_for_change(0, 0.5) is False
    assert 0.4 <= time.monotonic() - started < 5

    _, token, _ = writer.set_state(b"first")
    version = waiter.state_version()
    assert version == token
    timer = threading.Timer(0.3, lambda: writer.set_state(b"second", token))
    timer.start()
    try:
        started = time.monotonic()
        assert waiter.wait_for_change(version, 20) is True
        assert time.monotonic() - started < 10
    finally:
        timer.cancel()
    assert waiter.state_version() != version
    # A change that happened before the wait started is still reported at once.
    assert waiter.wait_for_change(version, 20) is True


def test_v3_keyed_storage_is_namespaced_by_run_and_bound_to_the_lease(etcd_server, run_id):
    """Keyed arrivals live under the run's state key (another run never sees them) and expire with the lease."""
    import base64

    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client, EtcdV3RendezvousBackend

    client = EtcdV3Client(etcd_server.get_host(), etcd_server.get_port())
    backend = EtcdV3RendezvousBackend(client, run_id, ttl=60)
    other = EtcdV3RendezvousBackend(client, run_id + "-other", ttl=60)
    backend.key_set("g1.a1", b"node-a")
    assert backend.key_add("g1.n", 1) == 1
    assert other.key_get_many(["g1.a1"]) == [None] and other.key_add("g1.n", 0) == 0
    kvs = client.range_prefix(backend.key.encode() + b"/keys/")
    assert sorted(base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in kvs) == ["g1.a1", "g1.n"]
    assert all(int(kv.get("lease", 0)) != 0 for kv in kvs)
    with pytest.raises(ValueError, match="only grow"):
        backend.key_add("g1.n", -1)


def test_v3_keyed_arrivals_can_be_turned_off(etcd_server, run_id):
    on, _ = _create("etcd-v3", etcd_server.get_endpoint(), run_id)
    off, _ = _create("etcd-v3", etcd_server.get_endpoint(), run_id, keyed_arrivals="false")
    assert on.supports_keys() and not off.supports_keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_offers_its_capability_protocols(backend, etcd_server, run_id):
    """etcd-v2: versions and change notification (watches); etcd-v3 adds keyed storage and per-node leases. Neither
    offers a separate heartbeat connection (the keep-alive thread uses the same backend) or store-host failover."""
    from elastic_impl.rendezvous._backend import ChangeNotification, KeyedStorage, NodeLiveness, StateVersions
    from tests.rendezvous.test_backend_protocols import offered_protocols

    created, _ = _create(backend, etcd_server.get_endpoint(), run_id)
    expected = {StateVersions, ChangeNotification}
    if backend == "etcd-v3":
        expected |= {KeyedStorage, NodeLiveness}
    assert offered_protocols(created) == expected


def test_v2_run_id_with_a_slash_is_a_sub_key(etcd_server, run_id):
    """As upstream: the state of run 'group/job' lives at <key_prefix>/group/job."""
    from elastic_impl.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

    backend = EtcdRendezvousBackend(etcd_server.get_client(), f"{run_id}/job", key_prefix="/test/slash")
    state, _, ok = backend.set_state(b"s")
    assert ok and state == b"s"
    assert etcd_server.get_client().read(f"/test/slash/{run_id}/job").value == "cw=="
