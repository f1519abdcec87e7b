"""etcd is a cluster (issue 13 item 4): the etcd-v3 backend takes every member in ``--rdzv-endpoint`` and rides out
the loss of the leader — a real 3-member etcd on loopback, its leader SIGKILLed while clients work."""

from __future__ import annotations

import threading
import time

import pytest

from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

pytestmark = pytest.mark.slow


@pytest.fixture
def etcd_cluster():
    from fault_injection.store import EtcdCluster
    from tests.rendezvous.etcd.conftest import _etcd_binary_or_skip

    _etcd_binary_or_skip()
    with EtcdCluster(3) as cluster:
        yield cluster


def test_endpoint_list_is_parsed_into_members():
    from elastic_impl.rendezvous._etcd_client import connection_options

    params = RendezvousParameters("etcd-v3", "h1:1,h2,[::1]:3", "r", 1, 1)
    assert connection_options(params).members == [("h1", 1), ("h2", 2379), ("::1", 3)]
    with pytest.raises(ValueError, match="empty member"):
        connection_options(RendezvousParameters("etcd-v3", "h1:1,,h2:2", "r", 1, 1))


def test_client_rides_out_the_loss_of_the_leader(etcd_cluster):
    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client

    leader = etcd_cluster.leader()
    # the client starts on the leader: losing it means both failing over and waiting out the election
    others = [m for m in etcd_cluster.members if m is not leader]
    members = [(leader.host, leader.port)] + [(m.host, m.port) for m in others]
    client = EtcdV3Client(leader.host, leader.port, members=members, connect_timeout=1, read_timeout=5)
    errors: list[BaseException] = []
    done = 0
    stop = time.monotonic() + 6

    def work() -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                client.put(b"/t/k", str(i).encode())
                kv, _ = client.range(b"/t/k")
                assert kv is not None
                done += 1
            except BaseException as e:  # noqa: BLE001 - every failure is the finding
                errors.append(e)
                return

    worker = threading.Thread(target=work)
    worker.start()
    started = time.monotonic()
    while not done and not errors and time.monotonic() - started < 5:  # the client works through the leader
        time.sleep(0.01)
    assert done and (client.host, client.port) == (leader.host, leader.port), errors
    leader.stop()  # SIGKILL
    worker.join(30)
    assert not errors, errors
    assert done > 0
    assert (client.host, client.port) != (leader.host, leader.port)  # it moved on to a live member


def _run_keys(member: tuple[str, int], run_id: str):
    """A reader of the etcd keys of ``run_id``'s rendezvous (its state, arrivals and liveness keys)."""
    import base64

    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import KEY_PREFIX, EtcdV3Client

    client = EtcdV3Client(*member)
    prefix = f"{KEY_PREFIX.rstrip('/')}/{run_id}".encode()
    return lambda: sorted(base64.b64decode(kv["key"]) for kv in client.range_prefix(prefix))


def test_rendezvous_over_a_cluster_completes_after_the_leader_dies(etcd_cluster, run_id):
    leader = etcd_cluster.leader()
    endpoint = ",".join([leader.endpoint] + [m.endpoint for m in etcd_cluster.members if m is not leader])
    handlers = [
        rendezvous_handler_registry.create_handler(RendezvousParameters(
            "etcd-v3", endpoint, run_id, 2, 2, join_timeout=60, last_call_timeout=1, connect_timeout=1))
        for _ in range(2)
    ]
    results: dict[int, object] = {}

    def join(i: int) -> None:
        try:
            results[i] = handlers[i].next_rendezvous()
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    first = threading.Thread(target=join, args=(0,))
    first.start()
    # Node 0 is in the round, waiting for node 1, once its liveness key is there (written as it joins).
    run_keys = _run_keys((leader.host, leader.port), run_id)
    deadline = time.monotonic() + 30
    while not any(b"/alive/" in key for key in run_keys()):
        assert time.monotonic() < deadline and first.is_alive(), (results, run_keys())
        time.sleep(0.05)
    leader.stop()
    second = threading.Thread(target=join, args=(1,))
    second.start()
    first.join(60)
    second.join(60)
    try:
        assert all(not isinstance(r, BaseException) for r in results.values()), results
        assert sorted(r.rank for r in results.values()) == [0, 1]
    finally:
        for h in handlers:
            h.shutdown()


@pytest.mark.parametrize("start_on", ["leader", "follower"])
def test_v2_backend_rides_out_the_loss_of_the_leader(etcd_cluster, start_on):
    """The etcd-v2 rendezvous backend and its store, given every member, while the leader is SIGKILLed: each
    operation is called once (no retry in the test), so failing over and waiting out the election are the
    backend's own doing. Starting on the leader it must move to a live member; in both cases a write that reached a
    follower while the leader was gone is answered "Raft Internal Error: etcdserver: request timed out" after etcd's
    7 s request timeout, and must be retried (it failed the backend before)."""
    from elastic_impl.rendezvous.etcd_rendezvous_backend import create_backend

    leader = etcd_cluster.leader()
    others = [m for m in etcd_cluster.members if m is not leader]
    first = leader if start_on == "leader" else others[0]
    endpoint = ",".join([first.endpoint] + [m.endpoint for m in etcd_cluster.members if m is not first])
    # The default read timeout (60 s): a shorter one than etcd's own request timeout (7 s) would hide a failure,
    # since python-etcd moves to another member when a read times out.
    backend, store = create_backend(RendezvousParameters("etcd-v2", endpoint, f"v2-{start_on}", 1, 1,
                                                         connect_timeout=1))
    client = backend._client
    assert client.endpoint == first.endpoint
    errors: list[BaseException] = []
    done = 0
    stop = time.monotonic() + 6

    def work() -> None:
        nonlocal done
        token = None
        i = counted = 0
        while time.monotonic() < stop:
            i += 1
            try:
                state = f"state {i}".encode()
                _, token, has_set = backend.set_state(state, token)
                # a write that landed on the dying leader and was resent to a new one may lose its own compare
                # (the token moved): then the state read back is ours all the same
                assert backend.get_state() == (state, token) or not has_set
                token = backend.get_state()[1]
                store.set(f"k{i}", str(i))
                assert store.get(f"k{i}") == str(i).encode()
                # add is not idempotent: one that landed on the dying leader and was resent counts twice
                counted, previous = store.add("counter", 1), counted
                assert counted > previous
                done += 1
            except BaseException as e:  # noqa: BLE001 - every failure is the finding
                errors.append(e)
                return

    worker = threading.Thread(target=work)
    worker.start()
    started = time.monotonic()
    while not done and not errors and time.monotonic() - started < 5:  # the backend works through its first member
        time.sleep(0.01)
    assert done, errors
    before_kill = done
    leader.stop()  # SIGKILL
    worker.join(60)
    assert not worker.is_alive()
    assert not errors, errors
    assert done > before_kill  # it kept working after the leader died
    if start_on == "leader":
        assert client.endpoint != leader.endpoint  # it moved on to a live member


def test_only_answers_of_a_cluster_in_transition_are_retried():
    import etcd

    from elastic_impl.rendezvous._etcd_client import is_retriable_answer

    def answer(code, cause, status=500):
        try:
            etcd.EtcdError.handle({"errorCode": code, "message": "Raft Internal Error", "cause": cause, "status": status})
        except etcd.EtcdException as e:
            return e

    assert is_retriable_answer(answer(300, "etcdserver: request timed out, possibly due to previous leader failure"))
    assert is_retriable_answer(answer(300, "etcdserver: leader changed"))
    assert is_retriable_answer(answer(301, "election in progress"))
    assert not is_retriable_answer(answer(100, "/k"))  # key not found
    assert not is_retriable_answer(answer(101, "[1 != 2]"))  # compare failed
    assert not is_retriable_answer(answer(300, "etcdserver: request is too large"))
    assert not is_retriable_answer(etcd.EtcdConnectionFailed("No more machines in the cluster"))


def test_legacy_handler_names_the_member_it_talks_to_after_failing_over(etcd_cluster, run_id):
    """The legacy ``etcd`` handler, given every member, keeps working when its first member dies; an error it
    reports afterwards names the member it talks to now, not the dead first one (it used to remember the first)."""
    from elastic_impl.rendezvous import RendezvousStateError
    from elastic_impl.rendezvous._etcd_client import BoundedEtcdClient

    first, *others = etcd_cluster.members
    endpoint = ",".join(m.endpoint for m in etcd_cluster.members)
    handler = rendezvous_handler_registry.create_handler(RendezvousParameters(
        "etcd", endpoint, run_id, 1, 1, timeout=30, last_call_timeout=0.3, connect_timeout=1))
    try:
        assert handler._rdzv_impl.client.endpoint == first.endpoint
        first.stop()  # SIGKILL
        # another node leaves a state this one cannot read (as a foreign or corrupted writer would); its client
        # retries while the cluster elects a new leader, if the first member led it
        BoundedEtcdClient(others[0].host, others[0].port).write(
            f"/torchelastic/p2p/run_{run_id}/rdzv/active_version", "not json")
        with pytest.raises(RendezvousStateError) as raised:
            handler.next_rendezvous()
        message = str(raised.value)
        assert "is not JSON" in message and first.endpoint not in message, message
        assert any(m.endpoint in message for m in others), message
    finally:
        handler.shutdown()
