"""Store faults with a real TCPStore server process; a TCPStore client in another process sees them."""


from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fault_injection import EtcdStoreServer, FaultError, Partition, RestartStore, TcpProxy, TCPStoreServer
from tests.fault_injection.conftest import read_line

# Each test starts Python processes that import torch (several seconds each on a loaded 2-core machine).
pytestmark = pytest.mark.slow

# A TCPStore client in its own process (a client call may hold the GIL while it blocks: never in the proxy's
# process). Reads commands on stdin: "cas" -> compare_set reading key a, prints the value or the error.
CLIENT = r"""
import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
c = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, use_libuv=True, timeout=timedelta(seconds=2))
c.set("a", b"1")
print("ready", flush=True)
for line in sys.stdin:
    try:
        print("ok", c.compare_set("a", b"<none>", b"<none>").decode(), flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
"""


@pytest.fixture
def store():
    server = TCPStoreServer().start()
    yield server
    server.stop()


def _client(spawn, port: int):
    proc = spawn(CLIENT.replace("sys.argv[1]", str(port)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL, text=True)
    assert read_line(proc, 120) == "ready"
    return proc


def _ask(proc) -> None:
    proc.stdin.write("cas\n")
    proc.stdin.flush()


def test_store_server_serves_and_restart_loses_keys(spawn, store):
    proc = _client(spawn, store.port)
    _ask(proc)
    assert read_line(proc) == "ok 1"
    seen = []
    port = store.port
    fault = RestartStore(store, on_restarted=lambda host, p: seen.append((host, p)),
                         on_event=lambda name, detail: seen.append(name)).inject()
    assert fault.active and not store.is_running()
    fault.heal()
    assert store.is_running() and store.port == port and store.restarts == 1
    assert seen == ["fault_start", ("127.0.0.1", port), "fault_end"]
    # the old client's connection died with the old server (a TCPStore client does not reconnect)
    _ask(proc)
    assert read_line(proc).startswith("error")
    fresh = _client(spawn, store.port)  # sets a=1 again: the restarted store started empty
    _ask(fresh)
    assert read_line(fresh) == "ok 1"


def test_blackholed_store_call_hangs_until_the_partition_heals(spawn, store):
    proxy = TcpProxy(("127.0.0.1", store.port))
    try:
        proc = _client(spawn, proxy.port)
        partition = Partition(proxy, mode="blackhole").inject()
        _ask(proc)
        import select

        # the client's 2 s timeout does not cover compare_set: it waits for as long as the black hole lasts
        ready, _, _ = select.select([proc.stdout], [], [], 4.0)
        assert not ready
        partition.heal()
        assert read_line(proc) == "ok 1"
    finally:
        proxy.close()


def test_store_start_failure_is_one_line():
    with pytest.raises(FaultError, match=r"^invalid restart_store downtime -1; expected seconds >= 0$"):
        RestartStore(TCPStoreServer(), downtime=-1)
    blocker = TCPStoreServer().start()
    try:
        start = time.monotonic()
        with pytest.raises(FaultError, match=rf"TCPStore server on port {blocker.port} exited before serving"):
            TCPStoreServer(port=blocker.port).start()
        assert time.monotonic() - start < 120
    finally:
        blocker.stop()


def test_store_host_exits_with_its_owner():
    # stdin EOF (the owner closed it or died) ends the host: a store never outlives the simulator
    proc = subprocess.Popen([sys.executable, "-m", "fault_injection._store_host", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert int(proc.stdout.readline()) > 0
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.etcd
@pytest.mark.skipif(not os.path.exists("/usr/bin/etcd") and not os.environ.get("ETCD_BINARY"),
                    reason="needs the etcd binary (/usr/bin/etcd or $ETCD_BINARY)")
def test_etcd_restart_keeps_keys_and_endpoint(tmp_path):
    import json
    import urllib.request

    server = EtcdStoreServer(data_dir=str(tmp_path)).start()
    try:
        url = f"http://{server.endpoint}/v2/keys/sim"
        request = urllib.request.Request(url, data=b"value=kept", method="PUT",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        urllib.request.urlopen(request, timeout=10).read()
        endpoint = server.endpoint
        fault = RestartStore(server).inject()
        assert not server.is_running()
        fault.heal()
        assert server.endpoint == endpoint and server.restarts == 1
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert json.loads(reply.read())["node"]["value"] == "kept"
    finally:
        server.close()


def _hold_port(port: int):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.etcd
@pytest.mark.skipif(not os.path.exists("/usr/bin/etcd") and not os.environ.get("ETCD_BINARY"),
                    reason="needs the etcd binary (/usr/bin/etcd or $ETCD_BINARY)")
def test_etcd_cluster_start_retries_on_fresh_ports_and_says_why_it_failed(monkeypatch):
    """CI once failed on 'etcd at ... did not become healthy (see <a log already deleted>)': a port chosen free was
    taken before etcd bound it. The start retries on fresh ports, and a failure quotes the member's log itself."""
    from fault_injection.store import EtcdCluster

    cluster = EtcdCluster(3, start_timeout=20)
    taken = _hold_port(cluster.members[1].port)  # something else got member 1's client port first
    try:
        with cluster:
            assert cluster.leader() is not None
            assert cluster.members[1].port != taken.getsockname()[1]  # started on fresh ports
    finally:
        taken.close()

    monkeypatch.setattr(EtcdCluster, "START_ATTEMPTS", 1)
    cluster = EtcdCluster(1, start_timeout=20)
    taken = _hold_port(cluster.members[0].port)
    try:
        with pytest.raises(FaultError, match="address already in use"):
            cluster.start()
    finally:
        taken.close()
