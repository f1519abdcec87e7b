"""Done-when scenarios with one OS process per node over a real etcd on loopback.

The dynamic handler runs on both etcd backends (``etcd-v2``: v2 keys API; ``etcd-v3``: v3 JSON gateway) through
tests/rendezvous/_node.py; the legacy ``etcd`` handler through _legacy_node.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.rendezvous.test_c10d_multiprocess import assert_silent_node_is_evicted, read_event

pytestmark = pytest.mark.etcd

BACKENDS = ["etcd-v2", "etcd-v3"]
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def dynamic(node_procs, backend, server, run_id, action, *args):
    return node_procs.start(action, "--backend", backend, "--endpoint", server.get_endpoint(), "--run-id", run_id, *args)


def legacy(node_procs, server, run_id, action, *args):
    """Start a legacy-handler node; node_procs kills it at teardown like its own nodes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_CPP_LOG_LEVEL="FATAL")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.rendezvous.etcd._legacy_node", action, "--endpoint", server.get_endpoint(),
         "--run-id", run_id, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_REPO, start_new_session=True,
    )
    node_procs.procs.append(proc)
    return proc


def wait_until_joined(backend, server, run_id, count=1, timeout=60):
    """Block until ``count`` nodes are visibly in the run's state (so a node is in its waiting loop)."""
    import json

    deadline = time.monotonic() + timeout
    if backend == "etcd":
        client = server.get_client()
        key = f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
        while time.monotonic() < deadline:
            try:
                if len(json.loads(client.read(key).value).get("participants", [])) >= count:
                    return
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.1)
    else:
        observer = _observer(backend, server, run_id)
        while time.monotonic() < deadline:
            if joined_count(observer) >= count:
                return
            time.sleep(0.1)
    raise AssertionError(f"fewer than {count} node(s) joined run {run_id} within {timeout} s")


def _observer(backend, server, run_id):
    from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

    return rendezvous_handler_registry.create_handler(
        RendezvousParameters(backend, server.get_endpoint(), run_id, 2, 2, read_timeout=5))


def joined_count(observer) -> int:
    """Nodes in the run's current round: its participants, or with keyed arrivals (etcd-v3), where an open round's
    state lists none, the round's arrival counter."""
    from elastic_impl.rendezvous._backend import KeyedStorage

    participants = len(observer.get_participants())
    backend = observer._backend
    if participants or not (isinstance(backend, KeyedStorage) and backend.supports_keys()):
        return participants
    return backend.key_add(f"g{observer.get_round()}.n", 0)


def assert_contiguous(events, world_size):
    assert all(e["event"] == "rendezvous" for e in events), events
    assert sorted(e["rank"] for e in events) == list(range(world_size))
    assert {e["world_size"] for e in events} == {world_size}
    assert len({e["node"] for e in events}) == world_size


# ---------------------------------------------------------------------------------------------- dynamic handler


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nodes_get_contiguous_ranks(backend, etcd_server, run_id, node_procs):
    procs = [dynamic(node_procs, backend, etcd_server, run_id, "join", "--min", "3", "--max", "3") for _ in range(3)]
    assert_contiguous([read_event(p, 60) for p in procs], 3)
    assert all(p.wait(60) == 0 for p in procs)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_late_node_triggers_a_new_round(backend, etcd_server, run_id, node_procs):
    common = ("--min", "2", "--max", "3", "--last-call", "0.5")
    early = [dynamic(node_procs, backend, etcd_server, run_id, "rejoin", *common) for _ in range(2)]
    first = [read_event(p, 60) for p in early]
    assert_contiguous(first, 2)
    assert {e["round"] for e in first} == {0}
    late = dynamic(node_procs, backend, etcd_server, run_id, "join", *common)
    second = [read_event(p, 60) for p in [*early, late]]
    assert_contiguous(second, 3)
    assert {e["round"] for e in second} == {1}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_node_that_stops_heartbeating_is_evicted(backend, etcd_server, run_id, node_procs):
    common = ("--min", "2", "--max", "2", "--keep-alive", "0.3")
    watcher = dynamic(node_procs, backend, etcd_server, run_id, "watch", *common)
    assert_silent_node_is_evicted(watcher, dynamic(node_procs, backend, etcd_server, run_id, "watch", *common), 60, 20)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_close_stops_waiting_nodes(backend, etcd_server, run_id, node_procs):
    from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

    waiting = [dynamic(node_procs, backend, etcd_server, run_id, "join", "--min", "3", "--max", "3", "--join-timeout", "60")
               for _ in range(2)]
    closer = rendezvous_handler_registry.create_handler(
        RendezvousParameters(backend, etcd_server.get_endpoint(), run_id, 3, 3, read_timeout=5))
    wait_until_joined(backend, etcd_server, run_id, count=2)
    closer.set_closed()
    for proc in waiting:
        event = read_event(proc, 20)
        assert event["event"] == "error" and event["type"] == "RendezvousClosedError", event
        assert proc.wait(60) == 1
    assert closer.is_closed()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_join_timeout(backend, etcd_server, run_id, node_procs):
    proc = dynamic(node_procs, backend, etcd_server, run_id, "join", "--min", "2", "--max", "2", "--join-timeout", "2")
    event = read_event(proc, 60)
    assert event["event"] == "error" and event["type"] == "RendezvousTimeoutError", event


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_etcd_stopped_mid_rendezvous_is_a_connection_error(backend, private_etcd_server, run_id, node_procs):
    endpoint = private_etcd_server.get_endpoint()
    waiting = dynamic(node_procs, backend, private_etcd_server, run_id, "join", "--min", "2", "--max", "2",
                      "--join-timeout", "60")
    wait_until_joined(backend, private_etcd_server, run_id)
    private_etcd_server.stop()
    started = time.monotonic()
    event = read_event(waiting, 30)
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert endpoint in event["message"] and "\n" not in event["message"]
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------------------------------------- legacy handler


@pytest.mark.timeout(120)
def test_legacy_nodes_get_contiguous_ranks_and_share_a_store(etcd_server, run_id, node_procs):
    procs = [legacy(node_procs, etcd_server, run_id, "join", "--min", "3", "--max", "3") for _ in range(3)]
    events = [read_event(p, 60) for p in procs]
    assert_contiguous(events, 3)
    # Rank 0 published the bootstrap address through the rendezvous store; the others read the same one.
    assert len({(e["addr"], e["port"]) for e in events}) == 1
    assert all(p.wait(60) == 0 for p in procs)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_legacy_late_node_triggers_a_new_version(etcd_server, run_id, node_procs):
    # A 2 s last call leaves time for the slower early node to notice the new version under load.
    common = ("--min", "2", "--max", "3", "--last-call", "2", "--timeout", "60")
    early = [legacy(node_procs, etcd_server, run_id, "rejoin", *common) for _ in range(2)]
    assert_contiguous([read_event(p, 60) for p in early], 2)
    late = legacy(node_procs, etcd_server, run_id, "join", *common)
    assert_contiguous([read_event(p, 60) for p in [*early, late]], 3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_legacy_node_whose_keep_alive_lapses_is_replaced(etcd_server, run_id, node_procs):
    """Two nodes hold version 1 (full); two more wait. They only get in once a holder's keep-alive lapses."""
    common = ("--min", "2", "--max", "2", "--keep-alive-ttl", "2", "--timeout", "90")
    holders = [legacy(node_procs, etcd_server, run_id, "hold", *common) for _ in range(2)]
    assert_contiguous([read_event(p, 60) for p in holders], 2)
    waiters = [legacy(node_procs, etcd_server, run_id, "join", *common) for _ in range(2)]
    client = etcd_server.get_client()
    key = f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
    deadline = time.monotonic() + 60
    import json

    while json.loads(client.read(key).value).get("num_workers_waiting", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # longer than the keep-alive TTL: live holders keep version 1 final
    assert all(p.poll() is None for p in waiters)
    assert json.loads(client.read(key).value)["version"] == "1"
    os.killpg(holders[1].pid, signal.SIGSTOP)  # stops renewing its keep-alive
    try:
        events = [read_event(p, 30) for p in waiters]
    finally:
        os.killpg(holders[1].pid, signal.SIGKILL)
    assert_contiguous(events, 2)
    assert json.loads(client.read(key).value)["version"] == "2"


@pytest.mark.timeout(120)
def test_legacy_close_stops_waiting_nodes(etcd_server, run_id, node_procs):
    from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

    waiting = [legacy(node_procs, etcd_server, run_id, "join", "--min", "3", "--max", "3", "--timeout", "60") for _ in range(2)]
    closer = rendezvous_handler_registry.create_handler(
        RendezvousParameters("etcd", etcd_server.get_endpoint(), run_id, 3, 3))
    client = etcd_server.get_client()
    import json

    key = f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if len(json.loads(client.read(key).value).get("participants", [])) == 2:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.1)
    closer.set_closed()
    for proc in waiting:
        event = read_event(proc, 20)
        assert event["event"] == "error" and event["type"] == "RendezvousClosedError", event
    assert closer.is_closed()


@pytest.mark.timeout(120)
def test_legacy_timeout(etcd_server, run_id, node_procs):
    proc = legacy(node_procs, etcd_server, run_id, "join", "--min", "2", "--max", "2", "--timeout", "2")
    event = read_event(proc, 60)
    assert event["event"] == "error" and event["type"] == "RendezvousTimeoutError", event


@pytest.mark.timeout(120)
def test_legacy_etcd_stopped_mid_rendezvous_is_a_connection_error(private_etcd_server, run_id, node_procs):
    endpoint = private_etcd_server.get_endpoint()
    waiting = legacy(node_procs, private_etcd_server, run_id, "join", "--min", "2", "--max", "2", "--timeout", "60")
    client = private_etcd_server.get_client()
    key = f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
    import json

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if json.loads(client.read(key).value).get("participants"):
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.1)
    private_etcd_server.stop()
    started = time.monotonic()
    event = read_event(waiting, 30)
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert endpoint in event["message"] and "\n" not in event["message"]
    assert time.monotonic() - started < 15


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", [*BACKENDS, "etcd"])
def test_paused_etcd_is_a_connection_error_within_the_read_timeout(backend, private_etcd_server, run_id, node_procs):
    """A hung etcd (SIGSTOP: connections accepted by the kernel, never answered) must not hang the nodes either."""
    endpoint = private_etcd_server.get_endpoint()
    if backend == "etcd":
        waiting = legacy(node_procs, private_etcd_server, run_id, "join", "--min", "2", "--max", "2", "--timeout", "120")
    else:
        waiting = dynamic(node_procs, backend, private_etcd_server, run_id, "join", "--min", "2", "--max", "2",
                          "--join-timeout", "120", "--read-timeout", "3")
    wait_until_joined(backend, private_etcd_server, run_id)
    assert waiting.poll() is None, waiting.stderr.read()[-2000:]
    os.kill(private_etcd_server.pid(), signal.SIGSTOP)
    started = time.monotonic()
    event = read_event(waiting, 60)
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert endpoint in event["message"] and "timed out" in event["message"]
    assert time.monotonic() - started < 30
