"""The loopback TCP proxy: forwarding, delay, black hole, drop, re-pointing; against a real echo server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fault_injection import Delay, FaultError, Partition, TcpProxy


class EchoServer:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    p = TcpProxy(("127.0.0.1", echo.port), name="test")
    yield p
    p.close()


def _connect(proxy: TcpProxy, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    return s


def _roundtrip(s: socket.socket, payload: bytes = b"ping") -> bytes:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_bytes_both_ways(proxy):
    with _connect(proxy) as s:
        assert _roundtrip(s, b"hello" * 1000) == b"hello" * 1000
    assert proxy.endpoint == f"127.0.0.1:{proxy.port}"


def test_delay_adds_latency_and_heals(proxy):
    with _connect(proxy) as s:
        _roundtrip(s)
        fault = Delay(proxy, 0.3).inject()
        start = time.monotonic()
        assert _roundtrip(s) == b"ping"
        assert time.monotonic() - start >= 0.6  # 0.3 s each way
        fault.heal()
        assert proxy.delay == 0


def test_blackhole_holds_bytes_until_healed(proxy):
    with _connect(proxy, timeout=1.0) as s:
        _roundtrip(s)
        fault = Partition(proxy, mode="blackhole").inject()
        s.sendall(b"held")
        with pytest.raises(TimeoutError):
            s.recv(10)
        s.settimeout(5.0)
        fault.heal()
        assert s.recv(10) == b"held"  # delivered after the heal, like a TCP retransmission


def test_resume_lag_keeps_old_connections_silent_after_the_heal_while_new_ones_work(proxy):
    with _connect(proxy, timeout=1.0) as old:
        _roundtrip(old)
        fault = Partition(proxy, mode="blackhole", resume_lag=1.5).inject()
        old.sendall(b"held")
        fault.heal()
        healed = time.monotonic()
        with _connect(proxy) as new:
            assert _roundtrip(new) == b"ping"  # a connection opened after the heal is not held back
        old.settimeout(5.0)
        assert old.recv(10) == b"held"
        assert time.monotonic() - healed >= 1.4  # like TCP's retransmission backoff after a long cut


def test_drop_closes_connections_and_refuses_new_ones_until_healed(proxy):
    with _connect(proxy) as s:
        _roundtrip(s)
        fault = Partition(proxy, mode="drop").inject()
        s.settimeout(5)
        assert s.recv(10) == b""  # closed by the proxy
    with _connect(proxy) as s2:
        s2.settimeout(5)
        assert s2.recv(10) == b""
    fault.heal()
    with _connect(proxy) as s3:
        assert _roundtrip(s3) == b"ping"


def test_set_upstream_points_new_connections_elsewhere(proxy, echo):
    other = EchoServer()
    try:
        proxy.set_upstream(("127.0.0.1", other.port))
        with _connect(proxy) as s:
            assert _roundtrip(s) == b"ping"
        assert other.accepted == 1
    finally:
        other.close()


def test_bad_settings_fail_with_one_line(proxy):
    with pytest.raises(FaultError, match=r"^invalid proxy mode 'sideways'; allowed: forward, blackhole, drop$"):
        proxy.set_mode("sideways")
    with pytest.raises(FaultError, match=r"^invalid partition mode 'forward'; allowed: blackhole, drop$"):
        Partition(proxy, mode="forward")
    with pytest.raises(FaultError, match=r"^invalid partition resume_lag -1; expected seconds >= 0$"):
        Partition(proxy, resume_lag=-1)
    with pytest.raises(FaultError, match=r"^invalid proxy resume_lag 'x'; expected seconds >= 0$"):
        proxy.set_mode("forward", resume_lag="x")
    with pytest.raises(FaultError, match=r"^invalid delay seconds -1; expected a number > 0$"):
        Delay(proxy, -1)


def test_double_inject_is_refused(proxy):
    fault = Partition(proxy).inject()
    with pytest.raises(FaultError, match="already injected"):
        fault.inject()
    fault.heal()
    fault.heal()  # healing twice is harmless
    assert proxy.mode == "forward"
