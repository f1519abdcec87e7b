"""Network faults through a loopback TCP proxy (the kernel here has no tc netem).

Each node talks to the store through its own :class:`TcpProxy` (``127.0.0.1:<proxy port>`` -> the real store), so
one node can be cut off while the others keep going. The proxy forwards bytes unchanged; faults change *when* or
*whether* bytes move:

- ``delay``: every chunk is delivered ``seconds`` later (order preserved, both directions).
- ``blackhole``: connections stay open and new ones are accepted, but nothing is delivered; bytes are held, like
  packets TCP keeps retransmitting. Healing delivers the held bytes (a partition that heals before the peers' own
  timeouts is invisible to them, as with real TCP). With ``resume_lag`` the connections that were open during the
  cut stay silent that many seconds longer, while new ones work at once: TCP's retransmission backoff after a long
  cut (seen with network namespaces: a connection idle for tens of seconds after the heal).
- ``drop``: every open connection is closed (both sides) and new connections are closed as soon as they are
  accepted, like a peer whose connections get reset.

Faults: :class:`Partition` (``blackhole`` or ``drop``), :class:`Delay`. Both heal back to plain forwarding.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time

from fault_injection.base import Fault, FaultError

__all__ = ["TcpProxy", "Partition", "Delay", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("forward", "blackhole", "drop")
_CHUNK = 65536


class _Pipe:
    """One direction of one connection: a reader thread queues chunks, a sender thread delivers them when allowed."""

    def __init__(self, proxy: TcpProxy, conn: _Connection, src: socket.socket, dst: socket.socket, name: str):
        self.proxy = proxy
        self.conn = conn
        self.src = src
        self.dst = dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.eof = False
        self.done = False
        self.reader = threading.Thread(target=self._read, name=f"{name}-read", daemon=True)
        self.sender = threading.Thread(target=self._send, name=f"{name}-send", daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.sender.start()

    def _read(self) -> None:
        cond = self.proxy._cond
        try:
            while True:
                data = self.src.recv(_CHUNK)
                with cond:
                    if not data:
                        self.eof = True
                        cond.notify_all()
                        return
                    self.queue.append((time.monotonic() + self.proxy.delay, data))
                    cond.notify_all()
        except OSError:
            self.conn.close()
            with cond:
                cond.notify_all()

    def _send(self) -> None:
        cond = self.proxy._cond
        try:
            while True:
                data = None
                with cond:
                    while True:
                        if self.conn.closed:
                            return
                        if self.proxy.mode == "forward":
                            lag = self.conn.resume_at - time.monotonic()
                            if lag > 0:
                                cond.wait(lag)
                                continue
                            if self.queue:
                                wait = self.queue[0][0] - time.monotonic()
                                if wait <= 0:
                                    data = self.queue.popleft()[1]
                                    break
                                cond.wait(wait)
                                continue
                            if self.eof:
                                break
                        cond.wait(0.5)
                if data is not None:
                    self.dst.sendall(data)
                    continue
                # end of stream, everything before it delivered: pass the half-close on
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.done = True
                if all(p.done for p in self.conn.pipes):
                    self.conn.close()
                return
        except OSError:
            self.conn.close()


class _Connection:
    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket, index: int):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.resume_at = 0.0  # monotonic time before which nothing is delivered (see resume_lag)
        name = f"{proxy.name}-c{index}"
        self.pipes = (
            _Pipe(proxy, self, client, upstream, f"{name}-up"),
            _Pipe(proxy, self, upstream, client, f"{name}-down"),
        )

    def start(self) -> None:
        for pipe in self.pipes:
            pipe.start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        with self.proxy._cond:
            self.proxy._cond.notify_all()


class TcpProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` (port 0: pick a free one) in front of ``upstream`` (host, port).

    ``mode`` is ``forward`` / ``blackhole`` / ``drop``; ``delay`` seconds are added to every chunk. Use
    :meth:`set_mode`, :meth:`set_delay`, :meth:`set_upstream` (new connections go there; open ones are closed, as
    the old server is gone), :meth:`close`.
    """

    def __init__(self, upstream: tuple[str, int], listen_port: int = 0, name: str = "proxy",
                 listen_host: str = "127.0.0.1") -> None:
        self.name = name
        self._upstream = (str(upstream[0]), int(upstream[1]))
        self.mode = "forward"
        self.delay = 0.0
        self._cond = threading.Condition()
        self._connections: list[_Connection] = []
        self._count = 0
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, listen_port))
        self._listener.listen(128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def upstream(self) -> tuple[str, int]:
        return self._upstream

    @property
    def connections(self) -> int:
        """Number of open proxied connections."""
        with self._cond:
            self._connections = [c for c in self._connections if not c.closed]
            return len(self._connections)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "drop" or self._closed:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError as e:
                logger.info("%s: upstream %s:%s unreachable: %s", self.name, *self._upstream, e)
                client.close()  # the client sees the connection end, as if the server were down
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._count += 1
                conn = _Connection(self, client, upstream, self._count)
                self._connections.append(conn)
            conn.start()

    def set_mode(self, mode: str, resume_lag: float = 0.0) -> None:
        """Switch to ``mode``; ``resume_lag`` (seconds, going back to ``forward``): connections open now stay silent
        that much longer (see the module notes)."""
        if mode not in MODES:
            raise FaultError(f"invalid proxy mode {mode!r}; allowed: {', '.join(MODES)}")
        if not isinstance(resume_lag, (int, float)) or not resume_lag >= 0:
            raise FaultError(f"invalid proxy resume_lag {resume_lag!r}; expected seconds >= 0")
        with self._cond:
            if mode == "forward" and resume_lag:
                resume_at = time.monotonic() + resume_lag
                for conn in self._connections:
                    conn.resume_at = resume_at
            self.mode = mode
            doomed = list(self._connections) if mode == "drop" else []
            self._cond.notify_all()
        for conn in doomed:
            conn.close()

    def set_delay(self, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or seconds < 0 or seconds != seconds:
            raise FaultError(f"invalid proxy delay {seconds!r}; expected seconds >= 0")
        with self._cond:
            self.delay = float(seconds)
            self._cond.notify_all()

    def set_upstream(self, upstream: tuple[str, int]) -> None:
        with self._cond:
            self._upstream = (str(upstream[0]), int(upstream[1]))
            doomed = list(self._connections)
        for conn in doomed:
            conn.close()

    def close_connections(self) -> None:
        with self._cond:
            doomed = list(self._connections)
        for conn in doomed:
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the acceptor thread
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self.close_connections()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TcpProxy({self.endpoint} -> {self._upstream[0]}:{self._upstream[1]}, mode={self.mode}, delay={self.delay})"


class Partition(Fault):
    """Cut a node off the store: ``blackhole`` (hold all bytes) or ``drop`` (close connections); heal: forward."""

    kind = "partition"

    def __init__(self, proxy: TcpProxy, mode: str = "blackhole", on_event=None, resume_lag: float = 0.0,
                 **labels) -> None:
        if mode not in ("blackhole", "drop"):
            raise FaultError(f"invalid partition mode {mode!r}; allowed: blackhole, drop")
        if not isinstance(resume_lag, (int, float)) or not resume_lag >= 0:
            raise FaultError(f"invalid partition resume_lag {resume_lag!r}; expected seconds >= 0")
        super().__init__(on_event, mode=mode, **labels)
        self.proxy = proxy
        self.mode = mode
        self.resume_lag = float(resume_lag)

    def _inject(self) -> None:
        self.proxy.set_mode(self.mode)

    def _heal(self) -> None:
        self.proxy.set_mode("forward", resume_lag=self.resume_lag)


class Delay(Fault):
    """Add ``seconds`` of latency to everything a node sends to or receives from the store; heal: no latency."""

    kind = "delay"

    def __init__(self, proxy: TcpProxy, seconds: float, on_event=None, **labels) -> None:
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise FaultError(f"invalid delay seconds {seconds!r}; expected a number > 0")
        super().__init__(on_event, seconds=float(seconds), **labels)
        self.proxy = proxy
        self.seconds = float(seconds)

    def _inject(self) -> None:
        self._before = self.proxy.delay
        self.proxy.set_delay(self.seconds)

    def _heal(self) -> None:
        self.proxy.set_delay(self._before)
