"""The rendezvous backend seam: upstream's three members, plus optional capabilities declared as protocols
(elastic_impl/rendezvous/_backend.py). A backend with only the three members -- written against upstream's
``RendezvousBackend`` or ours -- runs a whole rendezvous with our handler; each of our backends offers exactly the
capabilities it should, with every member its own (none left to a protocol's empty stub)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch.distributed.elastic.rendezvous.dynamic_rendezvous as upstream_dynamic

from elastic_impl.rendezvous import dynamic_rendezvous as ours_dynamic
from elastic_impl.rendezvous._backend import (
    ChangeNotification,
    KeyedStorage,
    NodeLiveness,
    SeparateHeartbeatConnection,
    StateVersions,
    StoreHostFailover,
)
from elastic_impl.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

PROTOCOLS = (StateVersions, ChangeNotification, KeyedStorage, NodeLiveness, SeparateHeartbeatConnection,
             StoreHostFailover)


def offered_protocols(backend) -> set[type]:
    """The capability protocols ``backend`` is an instance of, after checking it defines each one's members itself."""
    offered = {p for p in PROTOCOLS if isinstance(backend, p)}
    for protocol in offered:
        members = {name for klass in protocol.__mro__ if klass in PROTOCOLS
                   for name in [*vars(klass), *vars(klass).get("__annotations__", {})] if not name.startswith("_")}
        assert members, protocol
        for name in members:
            owner = next((k for k in type(backend).__mro__ if name in vars(k)), None)
            assert name in vars(backend) or (owner is not None and owner not in PROTOCOLS), (
                f"{type(backend).__name__}.{name} is {protocol.__name__}'s stub, not the backend's own")
    return offered


# ------------------------------------------------------------------------------- a backend with three members only


def _three_member_backend(base: type, shared: dict):
    """A user's backend: only ``name``, ``get_state`` and ``set_state`` (compare-and-set over a shared dict)."""

    class ThreeMemberBackend(base):
        def __init__(self) -> None:
            self.set_calls = 0

        @property
        def name(self) -> str:
            return "three-member"

        def get_state(self):
            with shared["lock"]:
                return shared.get("state")

        def set_state(self, state, token=None):
            with shared["lock"]:
                self.set_calls += 1
                current = shared.get("state")
                if token == (current[1] if current is not None else None):
                    shared["state"] = (state, (current[1] if current is not None else 0) + 1)
                    return state, shared["state"][1], True
                return current[0], current[1], False

    return ThreeMemberBackend()


@pytest.mark.parametrize("base", [upstream_dynamic.RendezvousBackend, ours_dynamic.RendezvousBackend],
                         ids=["upstream-base", "our-base"])
def test_a_three_member_backend_runs_a_two_node_rendezvous_with_our_handler(base, tcp_store):
    """Upstream's RendezvousBackend has no optional members; our handler used to call state_version() on every
    backend (AttributeError with the upstream base: seen failing before the capabilities became protocols)."""
    shared = {"lock": threading.Lock()}
    backends = [_three_member_backend(base, shared) for _ in range(2)]
    assert not any(isinstance(b, p) for b in backends for p in PROTOCOLS)
    handlers = [DynamicRendezvousHandler.from_backend("three-members", tcp_store, b, 2, 2, local_addr="127.0.0.1",
                                                      keep_alive_interval=0.2)
                for b in backends]
    results: dict[int, object] = {}

    def join(i: int) -> None:
        try:
            info = handlers[i].next_rendezvous()
            results[i] = (info.rank, info.world_size)
        except BaseException as e:  # reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=join, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(results.values()) == [(0, 2), (1, 2)], results
        assert handlers[0].get_participants() == handlers[1].get_participants()
        # Heartbeats are timestamps in the state (no per-node liveness, no second connection): the keep-alive
        # threads rewrite it over the same backend.
        writes = sum(b.set_calls for b in backends)
        deadline = time.monotonic() + 30
        while sum(b.set_calls for b in backends) < writes + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(b.set_calls for b in backends) >= writes + 2
        assert handlers[0].num_nodes_waiting() == 0
        handlers[0].set_closed()
        assert handlers[1].is_closed()
    finally:
        for h in handlers:
            h.shutdown()


# ------------------------------------------------------------------------------- our backends' capabilities


def test_c10d_backend_offers_keys_versions_notification_heartbeat_connection_and_failover(tcp_store):
    from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    backend = C10dRendezvousBackend(tcp_store, "protocols")
    assert offered_protocols(backend) == {KeyedStorage, StateVersions, ChangeNotification,
                                          SeparateHeartbeatConnection, StoreHostFailover}
    assert backend.failover is None and not backend.stuck  # made directly: no succession plan
    heartbeats = backend.connection_for_heartbeats()
    assert heartbeats is not backend and offered_protocols(heartbeats) == offered_protocols(backend)


def test_in_memory_backend_offers_keys_versions_and_notification():
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend

    backend = InMemoryRendezvousBackend()
    assert offered_protocols(backend) == {KeyedStorage, StateVersions, ChangeNotification}
    backend.keyed = False  # switched off per instance: still the members, no longer in use
    assert isinstance(backend, KeyedStorage) and not backend.supports_keys()


@pytest.mark.parametrize("keyed", [False, True])
def test_the_simulators_client_offers_keyed_storage_only_on_a_keyed_store(keyed):
    from simulator.virtual.clock import VirtualClock
    from simulator.virtual.store import SimStore, SimStoreClient

    client = SimStore(VirtualClock(), random.Random(0), keyed=keyed).client("node0")
    assert isinstance(client, SimStoreClient)
    assert offered_protocols(client) == ({StateVersions, KeyedStorage} if keyed else {StateVersions})
    if keyed:
        assert client.supports_keys()
    else:
        assert not hasattr(client, "key_add")  # nothing to call by mistake


@pytest.mark.parametrize("keyed", [False, True])
def test_a_simulated_round_uses_keys_exactly_when_the_store_is_keyed(keyed):
    """The state machine takes the keyed-arrival path on a keyed simulated store and never calls a key operation on
    one without (where the client has none)."""
    from elastic_impl.rendezvous.dynamic_rendezvous import (
        NodeDesc,
        RendezvousSettings,
        RendezvousStepper,
        RendezvousTimeout,
    )
    from simulator.virtual.clock import NodeClock, VirtualClock
    from simulator.virtual.store import SimStore

    clock = VirtualClock()
    store = SimStore(clock, random.Random(0), keyed=keyed)
    settings = RendezvousSettings("sim-protocols", 3, 3, RendezvousTimeout(), 5.0, 3)
    steppers = [RendezvousStepper(store.client(f"node{i}"), settings, NodeDesc(f"node{i}", 1000 + i, 0),
                                  NodeClock(clock))
                for i in range(3)]
    for s in steppers:
        s.begin_join()
    done: dict[int, object] = {}
    for _ in range(200):
        for i, s in enumerate(steppers):
            if i not in done:
                result = s.step("join")
                assert result.error is None, result.error
                if result.done:
                    done[i] = result.rank
        if len(done) == 3:
            break
        clock.now += 0.1
    assert sorted(done.values()) == [0, 1, 2]
    assert (store.key_calls > 0) == keyed, store.counters()

