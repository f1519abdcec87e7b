"""The agent's health check HTTP server, queried over loopback (lives here: tests/agent belongs to the agent)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from elastic_impl.agent.server.health_check_server import HealthCheckServer, create_healthcheck_server


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def wait(self, event, timeout):
        return event.is_set()


@pytest.fixture
def started():
    servers: list[HealthCheckServer] = []

    def start(server: HealthCheckServer) -> HealthCheckServer:
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


# no proxy: an http_proxy in the environment must not intercept loopback requests
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(port: int, path: str = "/health") -> tuple[int, dict]:
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_alive_within_timeout_then_dead(started):
    clock = FakeClock(1000.0)
    last_alive = {"t": 995}
    server = started(HealthCheckServer(lambda: last_alive["t"], 0, 10, clock=clock))
    status, body = _get(server.port)
    assert status == 200 and body == {"alive": True, "alive_since": 995, "age_s": 5.0, "timeout_s": 10}
    clock.now = 1006  # 11 s since last alive
    status, body = _get(server.port)
    assert status == 503 and body["alive"] is False and body["age_s"] == 11.0
    last_alive["t"] = 1005  # the agent made progress again
    assert _get(server.port)[0] == 200


def test_failing_callback_is_503_and_unknown_path_404(started):
    def broken():
        raise RuntimeError("watchdog gone")

    server = started(create_healthcheck_server(broken, 0, 5))
    status, body = _get(server.port)
    assert status == 503 and "watchdog gone" in body["error"]
    assert _get(server.port, "/nope")[0] == 404


def test_stop_releases_port_and_is_idempotent(started):
    server = started(HealthCheckServer(lambda: 0, 0, 5))
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = started(HealthCheckServer(lambda: 0, port, 5))  # the port is free again
    assert _get(again.port)[0] == 503


def test_busy_port_and_bad_args_are_one_line_errors(started):
    first = started(HealthCheckServer(lambda: 0, 0, 5))
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}"):
        HealthCheckServer(lambda: 0, first.port, 5).start()
    with pytest.raises(RuntimeError, match="already serving"):
        first.start()
    with pytest.raises(ValueError, match="port must be an int in \\[0, 65535\\], got 70000"):
        HealthCheckServer(lambda: 0, 70000, 5)
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got 0"):
        HealthCheckServer(lambda: 0, 0, 0)
    with pytest.raises(TypeError, match="alive_callback must be callable"):
        HealthCheckServer(None, 0, 5)
