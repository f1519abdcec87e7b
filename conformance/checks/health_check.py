"""torch.distributed.elastic.agent.server.health_check_server: HealthCheckServer and create_healthcheck_server.

Upstream's server is a documented no-op placeholder meant to be extended; others may really serve. The contract
both keep: the factory builds a HealthCheckServer holding the callback, start/stop return, and stop leaves nothing
listening on the port.
"""

from __future__ import annotations

import socket
import time

from conformance.context import free_port
from conformance.registry import check

HC = "agent.server.health_check_server"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _server(ctx, port: int | None = None):
    def alive() -> int:
        return int(time.time())

    server = ctx.get(f"{HC}.create_healthcheck_server")(alive, free_port() if port is None else port, 30)
    return server, alive


@check(f"{HC}.create_healthcheck_server")
def create_healthcheck_server(ctx) -> None:
    server, alive = _server(ctx)
    ctx.expect(isinstance(server, ctx.get(f"{HC}.HealthCheckServer")),
               f"create_healthcheck_server returned {type(server).__name__}, documented HealthCheckServer")
    ctx.expect(server.alive_callback is alive, "alive_callback is not the callback passed to the factory")


@check(f"{HC}.HealthCheckServer")
def health_check_server(ctx) -> None:
    hcs = ctx.get(f"{HC}.HealthCheckServer")
    calls = []

    def alive() -> int:
        calls.append(1)
        return 1234

    server = hcs(alive, free_port(), 10)
    ctx.expect_equal(server.alive_callback(), 1234, "alive_callback() of a HealthCheckServer")

    class Extended(hcs):  # documented as the interface to extend with a real server
        started = stopped = 0

        def start(self) -> None:
            Extended.started += 1

        def stop(self) -> None:
            Extended.stopped += 1

    ext = Extended(alive, free_port(), 10)
    ext.start()
    ext.stop()
    ctx.expect_equal((Extended.started, Extended.stopped), (1, 1), "an extension's start/stop")


@check(f"{HC}.HealthCheckServer.start")
def health_check_server_start(ctx) -> None:
    port = free_port()
    server, _ = _server(ctx, port)
    ctx.add_cleanup(server.stop)
    ctx.expect(server.start() is None, "start() returns None")


@check(f"{HC}.HealthCheckServer.stop")
def health_check_server_stop(ctx) -> None:
    port = free_port()
    server, _ = _server(ctx, port)
    server.start()
    ctx.expect(server.stop() is None, "stop() returns None")
    deadline = time.monotonic() + 5
    while not _port_free(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx.expect(_port_free(port), f"port {port} still bound after stop()")
