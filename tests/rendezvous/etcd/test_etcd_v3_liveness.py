"""etcd-v3 beyond the blob, against a real etcd: keep-alives renew per-node leases instead of rewriting the shared
state, a node whose lease lapses (SIGKILL) is evicted so the survivors form a new round, and arrivals write their
own small keys instead of the whole state."""

from __future__ import annotations

import os
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry
from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client
from tests.rendezvous.etcd.test_etcd_multiprocess import assert_contiguous, dynamic
from tests.rendezvous.test_c10d_multiprocess import read_event

pytestmark = pytest.mark.etcd


def _state_writes(server, key: str) -> int:
    """How many times the state key was written since it was created (etcd's per-key ``version``)."""
    kv, _ = EtcdV3Client(server.get_host(), server.get_port()).range(key.encode())
    assert kv is not None, f"no rendezvous state at {key}"
    return int(kv["version"])


def test_bad_lease_liveness_option_is_a_one_line_error():
    # upstream's wording at the API level (the CLI adds the value and what is allowed: tests/launcher/test_cli.py)
    with pytest.raises(ValueError, match="option 'lease_liveness' does not represent a valid boolean value") as info:
        rendezvous_handler_registry.create_handler(
            RendezvousParameters("etcd-v3", "127.0.0.1:2379", "run", 1, 1, lease_liveness="maybe"))
    assert "\n" not in str(info.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lease_liveness", [True, False], ids=["leases", "state-heartbeats"])
def test_heartbeats_of_a_completed_round_do_not_rewrite_the_state(lease_liveness, etcd_server, run_id):
    nodes = 4
    keep_alive = 1.0  # TTL 3 s (x3 attempts): generous for keep-alive threads on a loaded machine
    handlers = [
        rendezvous_handler_registry.create_handler(RendezvousParameters(
            "etcd-v3", etcd_server.get_endpoint(), run_id, nodes, nodes, read_timeout=10,
            keep_alive_interval=keep_alive, lease_liveness=str(lease_liveness).lower()))
        for _ in range(nodes)
    ]
    try:
        with ThreadPoolExecutor(nodes) as pool:
            infos = list(pool.map(lambda h: h.next_rendezvous(), handlers, timeout=90))
        assert sorted(i.rank for i in infos) == list(range(nodes))
        backend = handlers[0]._backend
        before = _state_writes(etcd_server, backend.key)
        time.sleep(4 * keep_alive)  # longer than the lease TTL: only renewed leases keep the nodes live
        writes = _state_writes(etcd_server, backend.key) - before
        if lease_liveness:
            assert all(len(h.get_participants()) == nodes for h in handlers)
            assert writes == 0, f"{writes} state writes by heartbeats of a completed round"
            assert backend.live_nodes() == {str(h.node) for h in handlers}
            # Leaving drops the node's liveness at once (no waiting out its lease).
            assert handlers[-1].leave()
            assert str(handlers[-1].node) not in backend.live_nodes()
        else:
            # The contrast: heartbeats kept in the state blob rewrite it (~1 write per node per interval).
            assert writes > 0
            assert backend.live_nodes() == set()
    finally:
        for handler in handlers:
            handler.leave()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed-arrivals", "blob-arrivals"])
def test_arrivals_do_not_rewrite_the_state(keyed, etcd_server, run_id):
    """8 nodes arriving together: with keyed arrivals the O(N)-sized state is written a constant number of times
    per round (one node completes it for all), not once or more per node (O(N^2) bytes moved)."""
    nodes = 8
    handlers = [
        rendezvous_handler_registry.create_handler(RendezvousParameters(
            "etcd-v3", etcd_server.get_endpoint(), run_id, nodes, nodes, read_timeout=10,
            keyed_arrivals=str(keyed).lower()))
        for _ in range(nodes)
    ]
    try:
        with ThreadPoolExecutor(nodes) as pool:
            infos = list(pool.map(lambda h: h.next_rendezvous(), handlers, timeout=90))
        assert sorted(i.rank for i in infos) == list(range(nodes))
        assert {i.world_size for i in infos} == {nodes}
        assert handlers[0].get_participants() == sorted(str(h.node) for h in handlers)
        writes = _state_writes(etcd_server, handlers[0]._backend.key)
        if keyed:
            assert writes <= 3, f"{writes} state writes for one keyed round of {nodes} nodes"
        else:
            assert writes >= nodes, f"only {writes} state writes: were arrivals keyed after all?"
    finally:
        for handler in handlers:
            handler.leave()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkilled_node_is_evicted_when_its_lease_lapses_and_survivors_reform(etcd_server, run_id, node_procs):
    # keep-alive 1 s x 3 attempts: the lease TTL is 3 s.
    common = ("--min", "2", "--max", "3", "--keep-alive", "1", "--last-call", "1", "--join-timeout", "90")
    procs = [dynamic(node_procs, "etcd-v3", etcd_server, run_id, "reform", *common) for _ in range(3)]
    first = [read_event(p, 90) for p in procs]
    assert_contiguous(first, 3)
    # Their state timestamps are now older than the expiry; live leases must keep everyone in the round.
    ready, _, _ = select.select([p.stdout for p in procs], [], [], 8)
    assert not ready, "participants changed although every node kept its lease: " + ready[0].readline()
    victim, survivors = procs[0], procs[1:]
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    changed = [read_event(p, 60) for p in survivors]
    noticed_after = time.monotonic() - killed_at
    for event in changed:
        assert event["event"] == "participants_changed", event
        assert first[0]["node"] in event["before"] and first[0]["node"] not in event["after"]
    # Not before the lease could lapse (TTL 3 s, renewed each second: at least ~2 s after the last renewal).
    assert noticed_after >= 1.5, f"evicted {noticed_after:.1f} s after SIGKILL, before its lease could lapse"
    second = [read_event(p, 60) for p in survivors]
    assert_contiguous(second, 2)
    assert {e["round"] for e in second} == {1}
    assert all(p.wait(60) == 0 for p in survivors)
