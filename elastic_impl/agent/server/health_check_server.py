"""Agent health check: a tiny HTTP server answering ``GET /health``.

Upstream ships a no-op placeholder; ours really serves. ``alive_callback()`` returns the agent's last-alive time
(epoch seconds, e.g. the timer watchdog's ``get_last_progress_time``). ``GET /health`` answers 200 when that time
is within ``timeout`` seconds of now and 503 otherwise (or when the callback fails), with a JSON body
``{"alive", "alive_since", "age_s", "timeout_s"}``. Other paths get 404.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elastic_impl.utils.clock import REAL_CLOCK, Clock
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here

__all__ = ["HealthCheckServer", "create_healthcheck_server"]

logger = logging.getLogger(__name__)
log = logger  # upstream's name for this module's logger


class HealthCheckServer:
    """Serves ``GET /health`` on ``host:port`` (``port=0`` picks a free port, see :attr:`port`) once started."""

    def __init__(
        self,
        alive_callback: Callable[[], int],
        port: int,
        timeout: int,
        *,
        host: str = "127.0.0.1",
        clock: Clock = REAL_CLOCK,
    ) -> None:
        if not callable(alive_callback):
            raise TypeError(f"alive_callback must be callable, got {alive_callback!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"health check port must be an int in [0, 65535], got {port!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"health check timeout must be a positive number of seconds, got {timeout!r}")
        self._alive_callback = alive_callback
        self._port = port
        self._timeout = timeout
        self._host = host
        self._clock = clock
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def alive_callback(self) -> Callable[[], int]:
        """The callback giving the agent's last-alive time (documented upstream)."""
        return self._alive_callback

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the requested one."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    def health(self) -> tuple[bool, dict]:
        """Whether the agent is alive now, and the JSON body that says so."""
        try:
            last_alive = float(self._alive_callback())
        except Exception as e:  # a broken callback means we cannot vouch for the agent
            return False, {"alive": False, "error": f"{type(e).__name__}: {e}", "timeout_s": self._timeout}
        age = self._clock.time() - last_alive
        alive = age <= self._timeout
        return alive, {
            "alive": alive,
            "alive_since": last_alive,
            "age_s": round(age, 3),
            "timeout_s": self._timeout,
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                if self.path.split("?", 1)[0].rstrip("/") != "/health":
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path!r}; use /health"})
                    return
                alive, body = server.health()
                self._reply(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, body)

            def _reply(self, status: HTTPStatus, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 -- http.server's signature
                logger.debug("health check %s: " + format, self.client_address[0], *args)

        return Handler

    def start(self) -> None:
        """Bind and serve in a daemon thread; a bad/busy port raises a one-line OSError naming it."""
        if self._httpd is not None:
            raise RuntimeError(f"health check server already serving on port {self.port}")
        try:
            httpd = ThreadingHTTPServer((self._host, self._port), self._handler_class())
        except OSError as e:
            raise OSError(
                e.errno, f"health check server cannot bind {self._host}:{self._port}: {e.strerror}"
            ) from None
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.1,), name="health-check", daemon=True
        )
        self._thread.start()
        logger.info("health check server on %s:%s (timeout %s s)", self._host, self.port, self._timeout)

    def stop(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def create_healthcheck_server(
    alive_callback: Callable[[], int], port: int, timeout: int
) -> HealthCheckServer:
    """A (not yet started) :class:`HealthCheckServer`."""
    return HealthCheckServer(alive_callback, port, timeout)
