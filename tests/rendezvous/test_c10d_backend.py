"""C10dRendezvousBackend compare-and-set over a real TCPStore/FileStore; handlers on threads; static backend."""

from __future__ import annotations

import threading

import pytest

from elastic_impl.rendezvous import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend, create_backend


def test_compare_and_set_semantics(tcp_store):
    backend = C10dRendezvousBackend(tcp_store, "run")
    assert backend.name == "c10d"
    assert backend.get_state() is None
    state, token, has_set = backend.set_state(b'{"a":1}')
    assert has_set and state == b'{"a":1}'
    assert backend.get_state() == (b'{"a":1}', token)
    # A stale token loses and returns the winner.
    assert backend.set_state(b'{"a":2}', b"stale") == (b'{"a":1}', b'{"a":1}', False)
    assert backend.set_state(b'{"a":3}', None)[2] is False
    assert backend.set_state(b'{"a":2}', token)[:2] == (b'{"a":2}', b'{"a":2}')
    # Namespaced by run id.
    assert C10dRendezvousBackend(tcp_store, "other").get_state() is None


def test_file_store_variant(tmp_path):
    params = RendezvousParameters("c10d", str(tmp_path / "rdzv"), "run", 1, 1, store_type="file")
    backend, store = create_backend(params)
    assert backend.get_state() is None
    assert backend.set_state(b"{}")[2]
    handler = rendezvous_handler_registry.create_handler(
        RendezvousParameters("c10d", str(tmp_path / "rdzv2"), "run", 1, 1, store_type="file", last_call_timeout=0.1)
    )
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)
    assert handler.shutdown() is True and handler.is_closed()


def test_missing_file_store_directory_is_a_one_line_error(tmp_path):
    params = RendezvousParameters("c10d", str(tmp_path / "nope" / "f"), "run", 1, 1, store_type="file")
    with pytest.raises(ValueError, match="does not exist"):
        create_backend(params)


def test_auto_host_then_client_on_same_port():
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()
    host_params = RendezvousParameters("c10d", f"127.0.0.1:{port}", "run", 1, 2, read_timeout=3)
    _, host_store = create_backend(host_params)  # endpoint is this machine and the port is free: hosts
    _, client_store = create_backend(host_params)  # port now taken: falls back to client
    host_store.set("k", b"v")
    assert client_store.get("k") == b"v"


def test_threads_rendezvous_over_tcp_store_and_share_restart_count(tcp_store):
    params = RendezvousParameters(
        "c10d", f"127.0.0.1:{tcp_store.port}", "run", 3, 3, is_host=False, read_timeout=5, keep_alive_interval=0.5,
        # short heartbeats, but a store call may take longer than their 1.5 s expiry on a loaded machine (CI: one
        # join was taken for a dead store host and failed): bound calls separately
        store_liveness_timeout=10,
    )
    handlers = [rendezvous_handler_registry.create_handler(params) for _ in range(3)]
    results = {}

    def join(i):
        results[i] = handlers[i].next_rendezvous()

    threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(r.rank for r in results.values()) == [0, 1, 2]
        # Each node knows its round and the job's restart count from the join itself (no state read needed).
        assert {h.last_round() for h in handlers} == {(handlers[0].get_round(), 0)}
        # The round store is namespaced by run and round and shared by all.
        results[0].store.set("x", b"1")
        assert results[1].store.get("x") == b"1"
        assert handlers[0].increment_restart_count() == 1
        assert handlers[1].increment_restart_count() == 2
        assert {h.get_restart_count() for h in handlers} == {2}
        assert handlers[2].num_nodes_waiting() == 0
        assert handlers[0].get_participants() == sorted(str(h.node) for h in handlers)
        # leave() is not close: the others stay in an open run, without the node that left.
        assert handlers[2].leave() is True
        assert not handlers[0].is_closed()
        assert handlers[0].get_participants() == sorted(str(h.node) for h in handlers[:2])
        with pytest.raises(RendezvousGracefulExitError):
            handlers[2].next_rendezvous()
    finally:
        for h in handlers:
            h._stop_keep_alive()
    # shutdown() ends the job for everyone, like upstream: the others see the run closed.
    assert handlers[0].shutdown() is True
    assert handlers[1].is_closed()
    with pytest.raises(RendezvousClosedError):
        handlers[1].next_rendezvous()


def test_static_backend_single_node():
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()
    params = RendezvousParameters("static", f"127.0.0.1:{port}", "run", 1, 1, rank=0, timeout=5)
    handler = rendezvous_handler_registry.create_handler(params)
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)
    assert info.bootstrap_store_info.master_port == port
    info.store.set("k", b"v")
    assert info.store.get("k") == b"v"
    assert handler.num_nodes_waiting() == 0 and handler.get_backend() == "static"


@pytest.mark.parametrize(
    ("config", "min_max", "needle"),
    [({}, (1, 1), "needs the option rank"), ({"rank": 0}, (1, 2), "min_nodes == max_nodes"), ({"rank": 3}, (2, 2), "rank must be in 0..1, got 3")],
)
def test_static_bad_params(config, min_max, needle):
    params = RendezvousParameters("static", "127.0.0.1:1", "run", *min_max, **config)
    with pytest.raises(ValueError, match=needle):
        rendezvous_handler_registry.create_handler(params)


def test_store_keys_are_namespaced_by_run_id_and_round(tcp_store):
    """Two runs share one store, and one run goes through two rounds: no value leaks across either boundary."""
    def handler(run_id):
        params = RendezvousParameters(
            "c10d", f"127.0.0.1:{tcp_store.port}", run_id, 1, 1, is_host=False, read_timeout=5, last_call_timeout=0.1
        )
        return rendezvous_handler_registry.create_handler(params)

    a, b = handler("run-a"), handler("run-b")
    try:
        first = a.next_rendezvous()
        first.store.set("master_port", b"1111")
        second = a.next_rendezvous()
        assert a.get_round() == 1
        assert not second.store.check(["master_port"])  # round 1 starts clean: no stale value from round 0
        other = b.next_rendezvous()
        assert b.get_round() == 0 and not other.store.check(["master_port"])  # run-b's round 0 is not run-a's
        assert a.increment_restart_count() == 1 and b.get_restart_count() == 0
        # The protocol's own keys carry the run id and the round too (round 0's arrivals of run-a are gone once
        # its round 2 opens; run-b's round 0 is untouched).
        assert tcp_store.check(["elastic.rdzv.run-a.k.g1.a1", "elastic.rdzv.run-b.k.g0.a1"])
        a.next_rendezvous()
        assert a.get_round() == 2 and not tcp_store.check(["elastic.rdzv.run-a.k.g0.a1"])
        a.set_closed()
        assert not b.is_closed()
    finally:
        for h in (a, b):
            h._stop_keep_alive()


def test_bad_call_timeout_is_a_one_line_error(tcp_store):
    with pytest.raises(ValueError, match=r"call_timeout must be positive seconds, got 0"):
        C10dRendezvousBackend(tcp_store, "run", call_timeout=0)
    with pytest.raises(ValueError, match=r"store_liveness_timeout='soon' is not a number of seconds"):
        create_backend(RendezvousParameters("c10d", f"127.0.0.1:{tcp_store.port}", "run", 1, 1, is_host=False,
                                            store_liveness_timeout="soon"))


def test_state_version_and_wait_for_change(tcp_store):
    backend = C10dRendezvousBackend(tcp_store, "versions")
    assert backend.state_version() == 0
    _, token, _ = backend.set_state(b'{"a":1}')
    assert backend.state_version() == 1
    assert backend.set_state(b'{"a":2}', b"stale")[2] is False
    assert backend.state_version() == 1  # a lost compare-and-set changes nothing
    assert backend.wait_for_change(1, 0.1) is False
    from datetime import timedelta

    from torch.distributed import TCPStore

    # Another client writes (a client connection serves one request at a time, like another node's would).
    other = C10dRendezvousBackend(TCPStore("127.0.0.1", tcp_store.port, is_master=False, timeout=timedelta(seconds=5)), "versions")
    writer = threading.Timer(0.2, lambda: other.set_state(b'{"a":3}', token))
    writer.start()
    try:
        assert backend.wait_for_change(1, 30) is True
    finally:
        writer.cancel()
    assert backend.wait_for_change(0, 30) is True  # already moved on: returns at once
    # Only the latest change keys are kept, so a long run does not grow the store.
    current = backend.get_state()[1]
    for i in range(70):
        current = backend.set_state(b'{"i":%d}' % i, current)[1]
    prefix = "elastic.rdzv.versions.state.changed."
    assert not tcp_store.check([f"{prefix}1"]) and tcp_store.check([f"{prefix}{backend.state_version()}"])


_FROZEN_CLIENT = """
import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
store = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=30))
backend = C10dRendezvousBackend(store, "frozen", call_timeout=1.0)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
calls = 0
while time.monotonic() < end:
    backend.get_state()  # a RendezvousConnectionError here fails the test (traceback, exit 1)
    calls += 1
    if calls == 1:
        print("answered", flush=True)  # calls go through the proxy now, one after another
    time.sleep(0.01)
print("calls", calls, flush=True)
"""


def test_a_frozen_process_does_not_blame_the_store(tcp_store):
    """SIGSTOP for longer than call_timeout: only running time counts, so the healthy store is not declared gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fault_injection.network import TcpProxy

    proxy = TcpProxy(("127.0.0.1", tcp_store.port))
    proxy.set_delay(0.2)  # every call is in flight ~0.4 s, so the freeze catches one waiting for its answer
    port = proxy.endpoint.rsplit(":", 1)[1]
    child = subprocess.Popen([sys.executable, "-c", _FROZEN_CLIENT, port, "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.stdout.readline().strip() == "answered"
        time.sleep(0.1)  # into the next call: 0.01 s later it is sent, and it waits ~0.4 s on the proxy's delay
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(2.5)  # 2.5 x call_timeout
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        proxy.close()
    assert child.returncode == 0, err[-2000:]
    assert out.startswith("calls ")


def test_a_deposed_store_host_raises_on_every_later_step(monkeypatch):
    """The fence of the c10d failover (see c10d_failover.StoreFailover.deposed_by), in-process: once the host finds a
    successor serving, every later rendezvous step raises StoreHostDeposed (a graceful exit, not a job failure)."""
    from elastic_impl.rendezvous.c10d_failover import StoreHostDeposed
    from elastic_impl.utils.distributed import get_free_port

    params = RendezvousParameters("c10d", f"127.0.0.1:{get_free_port()}", "fence", 1, 1, read_timeout=5)
    handler = rendezvous_handler_registry.create_handler(params)
    try:
        handler.next_rendezvous()
        failover = handler._failover
        assert failover is not None and failover.hosted
        monkeypatch.setattr(failover, "deposed_by", lambda node_key: "node-b at 127.0.0.1:1")
        handler._check_deposed()
        with pytest.raises(StoreHostDeposed, match="the job goes on at node-b"):
            handler.num_nodes_waiting()
        assert isinstance(StoreHostDeposed("x"), RendezvousGracefulExitError)
    finally:
        handler._stop_keep_alive()


def _client_through(proxy, seconds: float = 5.0):
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(proxy.host, proxy.port, is_master=False, timeout=timedelta(seconds=seconds), use_libuv=True)


def test_a_reset_connection_is_replaced_on_the_next_call(tcp_store):
    """A TCPStore client never reconnects: after a reset every call on it fails ("Broken pipe"). The backend opens a
    fresh connection on its next call, so a node whose connection was reset once is not cut off for good."""
    from elastic_impl.rendezvous import RendezvousConnectionError
    from fault_injection.network import Partition, TcpProxy

    with TcpProxy(("127.0.0.1", tcp_store.port)) as proxy:
        backend = C10dRendezvousBackend(_client_through(proxy), "reset", call_timeout=2.0)
        backend.set_state(b'{"a":1}')
        cut = Partition(proxy, mode="drop").inject()
        with pytest.raises(RendezvousConnectionError, match=r"rendezvous store TCPStore at 127\.0\.0\.1:\d+ is gone"):
            backend.get_state()
        with pytest.raises(RendezvousConnectionError, match=r"reconnecting"):
            backend.get_state()  # still cut: the fresh connection is closed at once too
        cut.heal()
        assert backend.get_state()[0] == b'{"a":1}'
        assert backend.key_add("n", 1) == 1


def test_a_call_stuck_past_the_heal_does_not_cut_the_node_off(tcp_store):
    """A call abandoned on a silent connection stays stuck after the network heals (TCP's retransmission backoff:
    seen for tens of seconds with network namespaces). The next call goes over a fresh connection at once, instead
    of failing with "an earlier call got no answer" until the old one wakes up."""
    import time

    from elastic_impl.rendezvous import RendezvousConnectionError
    from fault_injection.network import Partition, TcpProxy

    with TcpProxy(("127.0.0.1", tcp_store.port)) as proxy:
        backend = C10dRendezvousBackend(_client_through(proxy), "stuck", call_timeout=0.5)
        backend.set_state(b'{"a":1}')
        cut = Partition(proxy, mode="blackhole", resume_lag=60).inject()
        with pytest.raises(RendezvousConnectionError, match=r"no answer within 0\.5 s"):
            backend.get_state()
        assert backend.stuck
        cut.heal()
        started = time.monotonic()
        assert backend.get_state()[0] == b'{"a":1}'
        assert time.monotonic() - started < 2.0
        assert not backend.stuck


def test_a_store_that_restarted_empty_is_named_not_rejoined():
    """The backend reconnects after a reset, but a TCPStore that restarted comes back empty: the run's state is gone.
    Going on would form a fresh round 0 with the job-wide restart count back at 0 (the live store_restart scenario
    re-formed, then died on the agent's broken store with a bare "DistNetworkError: Broken pipe"). The backend says
    what happened instead, naming the store."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from elastic_impl.rendezvous import RendezvousConnectionError
    from fault_injection.store import TCPStoreServer

    with TCPStoreServer() as server:
        client = TCPStore(server.host, server.port, is_master=False, timeout=timedelta(seconds=5), use_libuv=True)
        backend = C10dRendezvousBackend(client, "restarted", call_timeout=5.0)
        assert backend.set_state(b'{"round":3}')[2]
        heartbeats = backend.connection_for_heartbeats()
        server.restart()
        for b in (backend, heartbeats):
            with pytest.raises(RendezvousConnectionError) as info:
                for _ in range(3):  # the first call may only see the reset; the next reconnects
                    try:
                        b.get_state()
                    except RendezvousConnectionError as e:
                        if "restarted empty" in str(e):
                            raise
            assert f"rendezvous store TCPStore at 127.0.0.1:{server.port} no longer holds run 'restarted'" \
                in str(info.value)
        # A backend that never saw the state (a node arriving now) just finds none.
        fresh = TCPStore(server.host, server.port, is_master=False, timeout=timedelta(seconds=5), use_libuv=True)
        assert C10dRendezvousBackend(fresh, "restarted", call_timeout=5.0).get_state() is None
