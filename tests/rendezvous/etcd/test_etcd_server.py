"""EtcdServer starts a real etcd on loopback and never leaves it (or its data) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from elastic_impl.rendezvous.etcd_server import EtcdServer

pytestmark = pytest.mark.etcd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_start_serves_v2_and_v3_then_stop_removes_everything(private_etcd_server):
    server = private_etcd_server
    assert server.get_host() == "localhost"  # as upstream
    assert server.get_endpoint() == f"localhost:{server.get_port()}"
    client = server.get_client()
    client.write("/t/k", "v")
    assert client.read("/t/k").value == "v"

    from elastic_impl.rendezvous.etcd_v3_rendezvous_backend import EtcdV3Client

    v3 = EtcdV3Client(server.get_host(), server.get_port(), connect_timeout=2)
    v3.put(b"/t/v3", b"x")
    kv, _ = v3.range(b"/t/v3")
    assert kv is not None

    pid, data_dir = server.pid(), server._base_data_dir
    assert pid is not None and os.path.isdir(data_dir)
    server.stop()
    assert _wait_dead(pid, 10), f"etcd pid {pid} still running after stop()"
    assert not os.path.exists(data_dir)
    server.stop()  # idempotent


def test_user_data_dir_is_kept_but_its_attempt_dirs_are_removed(tmp_path):
    server = EtcdServer(data_dir=str(tmp_path / "data"))
    try:
        server.start(timeout=60)
        assert os.listdir(tmp_path / "data") == ["0"]
    finally:
        server.stop()
    assert os.path.isdir(tmp_path / "data") and os.listdir(tmp_path / "data") == []


def test_missing_binary_is_a_one_line_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-etcd-here")
    monkeypatch.setenv("ETCD_BINARY", missing)
    monkeypatch.delenv("TORCHELASTIC_ETCD_BINARY_PATH", raising=False)
    server = EtcdServer()
    with pytest.raises(FileNotFoundError) as info:
        server.start(timeout=5)
    assert missing in str(info.value) and "\n" not in str(info.value)
    server.stop()


_STARTER = """
import sys, time
from elastic_impl.rendezvous.etcd_server import EtcdServer
server = EtcdServer()
server.start(timeout=60)
print(server.pid(), server._base_data_dir, flush=True)
time.sleep(600)
"""


def test_etcd_dies_with_the_process_that_started_it():
    """SIGKILL gives the starter no chance to clean up: the kernel (PR_SET_PDEATHSIG) must still end etcd."""
    starter = subprocess.Popen([sys.executable, "-c", _STARTER], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    etcd_pid = None
    try:
        line = starter.stdout.readline()
        assert line, "the starter printed nothing"
        etcd_pid = int(line.split()[0])
        assert _alive(etcd_pid)
        os.killpg(starter.pid, signal.SIGKILL)
        starter.wait(10)
        assert _wait_dead(etcd_pid, 10), f"etcd pid {etcd_pid} outlived the process that started it"
    finally:
        if starter.poll() is None:
            os.killpg(starter.pid, signal.SIGKILL)
            starter.wait(10)
        if etcd_pid is not None and _alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
        starter.stdout.close()
