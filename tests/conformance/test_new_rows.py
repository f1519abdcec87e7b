"""The 16 rows the 120-row Ascend table adds: their checks pass on both implementations, and our two new modules
behave as upstream's (control_plane.worker_main, timer.debug_info_logging)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

NEW_ROWS = ("health_check_server,control_plane,LogsSpecs,LogsDest,use_agent_store,RendezvousInfo,RendezvousStoreInfo,"
            "debug_info_logging,construct_and_record")


@pytest.mark.parametrize("impl", ["elastic_impl", "torch"])
def test_the_16_new_rows_conform_on_both_implementations(impl, tmp_path):
    proc = run_cli(["certify", "--impl", impl, "--device", "cpu", "--jobs", "1", "--table", "all-supported",
                    "-k", NEW_ROWS, "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "report.json").read_text())["results"]
    assert len(results) == 16 and {r["verdict"] for r in results} == {"CONFORMS"}


def test_our_use_agent_store_opt_out_builds_its_own_bootstrap_address(monkeypatch):
    """TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: not shared, and rank 0 publishes its own address and a free port
    (before: use_agent_store was always True and the store's own address was handed out)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from elastic_impl.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    handler = DynamicRendezvousHandler.from_backend("optout", store, C10dRendezvousBackend(store, "optout"), 1, 1)
    try:
        assert handler.use_agent_store is True
        monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        assert handler.use_agent_store is False
        info = handler.next_rendezvous()
        assert info.bootstrap_store_info.master_port != store.port
        assert info.store.get("MASTER_PORT") == str(info.bootstrap_store_info.master_port).encode()
    finally:
        handler.shutdown()
