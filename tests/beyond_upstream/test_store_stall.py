"""Issue 13.3: a stalled store is not a dead peer.

etcd SIGSTOPped for 20 s mid-job (longer than the default 15 s heartbeat expiry): nobody could renew anything while
it was frozen, so nobody may be evicted for that silence. Before the fix both nodes evicted each other ("liveness
lease lapsed") and restarted their workers at the same world size, losing the work, silently at the default log
level. Each node now only counts a peer's silence while it itself was in contact with the store (see "Store
outages" in elastic_impl/rendezvous/dynamic_rendezvous/__init__.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.beyond_upstream.conftest import TRAIN, marker_pids, needs_runtime, read_markers, wait_for

pytestmark = [pytest.mark.slow, needs_runtime]

FREEZE = 20.0  # > the default heartbeat expiry (5 s x 3)


@pytest.fixture
def etcd():
    from fault_injection.store import EtcdStoreServer

    try:
        server = EtcdStoreServer().start()
    except Exception as e:  # noqa: BLE001 - no etcd binary here
        pytest.skip(f"needs etcd: {e}")
    try:
        yield server
    finally:
        if server.pid:
            try:
                os.kill(server.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.close()


@pytest.mark.parametrize("backend", ["etcd-v3", "etcd-v2"])
def test_frozen_etcd_evicts_nobody_and_restarts_nothing(launcher, tmp_path, etcd, backend):
    markers, stop_file = tmp_path / "markers", tmp_path / "stop"
    launcher.marker_dirs.append(markers)
    args = [
        "--nnodes", "1:2", "--nproc-per-node", "1",
        "--rdzv-backend", backend, "--rdzv-endpoint", etcd.endpoint, "--rdzv-id", f"stall-{backend}",
        "--max-restarts", "3",
    ]
    env = dict(MARKER_DIR=markers, TRAIN_STOP_FILE=stop_file)
    nodes = [launcher.start([*args, TRAIN], name=f"stall-{backend}-{i}", **env) for i in range(2)]
    wait_for(lambda: len([m for m in read_markers(markers) if m["WORLD_SIZE"] == "2"]) == 2, 180, "group of 2")
    before = marker_pids(markers)
    os.kill(etcd.pid, signal.SIGSTOP)
    time.sleep(FREEZE)
    os.kill(etcd.pid, signal.SIGCONT)
    # Past a whole expiry after the store is back: an eviction (or a restart) would have happened by now.
    time.sleep(20.0)
    assert marker_pids(markers) == before, "workers were restarted after the store stalled"
    assert all(n.poll() is None for n in nodes)
    stop_file.write_text("done")
    for n in nodes:
        assert launcher.wait(n, 120) == 0, launcher.output(n)[1][-3000:]
    for n in nodes:
        err = launcher.output(n)[1]
        assert "evicting" not in err, err[-3000:]
