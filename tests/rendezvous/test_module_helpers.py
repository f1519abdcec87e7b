"""Module-level rendezvous helpers upstream exposes (get_method_name, cas_delay, find_free_port, stop_etcd,
get_rendezvous_handler), on real sockets and processes, run against ours and upstream's."""

from __future__ import annotations

import importlib
import socket
import subprocess
import time

import pytest

IMPLS = ["elastic_impl", "torch.distributed.elastic"]


@pytest.fixture(params=IMPLS)
def rdzv(request):
    return lambda module: importlib.import_module(f"{request.param}.rendezvous.{module}")


def test_get_method_name_names_the_caller_of_the_caller(rdzv):
    get_method_name = rdzv("dynamic_rendezvous").get_method_name

    def step_that_logs(depth=2):
        return get_method_name(depth)

    def join_rendezvous():
        return step_that_logs(), step_that_logs(1), step_that_logs(10_000)

    assert join_rendezvous() == ("join_rendezvous", "step_that_logs", "no_method_name")


def test_cas_delay_sleeps_a_random_time_up_to_100ms(rdzv, monkeypatch):
    etcd_store = rdzv("etcd_store")
    assert rdzv("etcd_rendezvous").cas_delay is etcd_store.cas_delay
    bounds = []
    monkeypatch.setattr("random.uniform", lambda low, high: bounds.append((low, high)) or 0.05)
    start = time.monotonic()
    etcd_store.cas_delay()
    assert time.monotonic() - start >= 0.05
    assert bounds == [(0, 0.1)]


def test_find_free_port_holds_a_listening_port(rdzv):
    sock = rdzv("etcd_server").find_free_port()
    try:
        host, port = sock.getsockname()[:2]
        assert port > 0
        socket.create_connection((host, port), timeout=5).close()  # it really listens
        with pytest.raises(OSError):  # and holds the port
            socket.socket(sock.family).bind((host, port))
    finally:
        sock.close()


def test_stop_etcd_terminates_the_process_and_removes_its_data(rdzv, tmp_path):
    stop_etcd = rdzv("etcd_server").stop_etcd
    data_dir = tmp_path / "etcd-data"
    (data_dir / "member").mkdir(parents=True)
    proc = subprocess.Popen(["sleep", "60"])
    stop_etcd(proc, str(data_dir))
    assert proc.returncode == -15  # SIGTERM, and waited for
    assert not data_dir.exists()
    stop_etcd(proc)  # already stopped, no data dir: nothing to do
    stop_etcd(None, str(tmp_path / "missing"))  # nothing to stop, a missing dir is not an error


def test_get_rendezvous_handler_creates_the_backends_handler(rdzv):
    api, registry = rdzv("api"), rdzv("registry")
    assert registry.handler_registry is api.rendezvous_handler_registry
    assert registry.create_handler is rdzv("dynamic_rendezvous").create_handler
    params = api.RendezvousParameters(
        backend="static", endpoint="127.0.0.1:29999", run_id="job7", min_nodes=1, max_nodes=1, rank=0
    )
    handler = registry.get_rendezvous_handler(params)  # static: nothing connects before next_rendezvous
    assert (handler.get_backend(), handler.get_run_id()) == ("static", "job7")
    with pytest.raises(ValueError, match="no-such-backend"):
        registry.get_rendezvous_handler(
            api.RendezvousParameters(backend="no-such-backend", endpoint="", run_id="j", min_nodes=1, max_nodes=1)
        )
