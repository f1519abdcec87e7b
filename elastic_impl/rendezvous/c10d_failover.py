"""Store-host failover for the c10d rendezvous (not upstream): when the agent hosting the TCPStore dies, the survivors
move to a new store hosted by a successor they agreed on in advance, and re-form there.

Design and its limits (split brain, a host that was only partitioned): docs/c10d_store_failover.md. In short:

- Every node reserves a *standby* port when it starts (bound, not listening: refused until it takes over) and announces
  ``standby.<node key> = host:port`` in the store; the hosting node also records ``storehost = <its node key>``.
- After each completed round every node reads, from that round, the store host and the standby endpoints of the
  first :data:`SUCCESSOR_CANDIDATES` participants other than the host, in rank order: the *succession plan*. Every
  survivor holds the same plan, because every node knows the last completed round.
- The store counts as gone when its port refuses connections (nothing listens there any more) or a call got no
  answer within the liveness timeout. Then the first live candidate hosts a new TCPStore on its reserved socket,
  seeds it with the last state it saw minus the lost host (round, members and the job-wide restart count), and
  writes ``seeded``; the others wait for that candidate's port to accept (it may notice the loss up to a detection
  window later), connect and wait for ``seeded``. A candidate that does not take over within the detection window
  plus a few seconds counts as gone too, and the next one is tried (so a node that is itself next hosts then).
- The handler then swaps both steppers onto the new store; the agents see the host gone from the participants and
  re-form as after any loss.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from ._backend import KeyedStorage, StoreHostFailover
from .api import RendezvousConnectionError, RendezvousError, RendezvousGracefulExitError
from .utils import parse_rendezvous_endpoint

__all__ = ["SUCCESSOR_CANDIDATES", "StoreFailover", "StoreHostDeposed"]

logger = logging.getLogger(__name__)

# How many successors a node remembers: a failover survives this many dead candidates in a row.
SUCCESSOR_CANDIDATES = 3
_STANDBY = "standby."
_STORE_HOST = "storehost"
_SEEDED = "seeded"
_GENERATION = "generation"
_KNOWN_MAX = 16  # standby endpoints the store host keeps watching (see StoreFailover.deposed_by)


def _reserve_port() -> socket.socket:
    """A socket bound to a free port of every interface, not listening: the port is this node's (no SO_REUSEADDR,
    so nobody else can bind it) and connections to it are refused until a store takes it over and listens, so a
    connection that is accepted there always reaches a store that took over."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))
    return sock


class StoreHostDeposed(RendezvousGracefulExitError):
    """This node hosted the store but was cut off (or frozen) long enough for the others to fail over: the job goes
    on at a successor's store, and this node must stop instead of carrying on with a second group."""


def _accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _refuses(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether nothing listens at host:port any more (a refused connection); False when it accepts or is silent."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # unreachable or silent: not proof that the store is gone


class StoreFailover:
    """One node's part in the c10d store-host failover (see the module notes).

    ``standby_host`` is the address the others reach this node at; ``liveness`` bounds each store call (the
    detection window); ``read_timeout`` is the timeout of the agent-facing store.
    """

    def __init__(self, run_id: str, endpoint: tuple[str, int], hosted: bool, standby_host: str, liveness: float,
                 read_timeout: float) -> None:
        self.run_id = run_id
        self.endpoint = endpoint
        self.hosted = hosted
        self.standby_host = standby_host
        self.liveness = liveness
        self.read_timeout = read_timeout
        self.generation = 0
        self._reserved = _reserve_port()
        self._hosting: list[socket.socket] = []  # sockets handed to stores this node hosts (kept open for them)
        # (store host's node key, [(candidate node key, host, port), ...]) of the last completed round
        self.plan: tuple[str, list[tuple[str, str, int]]] | None = None
        # Every standby endpoint this node ever saw in a plan (node key -> host, port): the store host watches them
        # all, because a node cut off from it may have taken over after the host re-formed without it.
        self.known: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    @property
    def standby(self) -> tuple[str, int]:
        return self.standby_host, self._reserved.getsockname()[1]

    # ------------------------------------------------------------------ before any loss

    def announce(self, backend: KeyedStorage, node_key: str) -> None:
        """Publish this node's standby endpoint (and, on the host, that it hosts the store)."""
        host, port = self.standby
        backend.key_set(f"{_STANDBY}{node_key}", f"{host}:{port}".encode())
        if self.hosted:
            backend.key_set(_STORE_HOST, node_key.encode())

    def learn(self, backend: KeyedStorage, participants: list[str]) -> None:
        """Read the succession plan of a completed round (``participants`` in rank order)."""
        (host_key,) = backend.key_get_many([_STORE_HOST])
        if host_key is None or host_key.decode() not in participants:
            # The store lives outside the job (or its host never completed a round): nobody here can stand in.
            self.plan = None
            return
        host_key = host_key.decode()
        candidates = [k for k in participants if k != host_key][:SUCCESSOR_CANDIDATES]
        endpoints = backend.key_get_many([f"{_STANDBY}{k}" for k in candidates])
        plan = []
        for key, endpoint in zip(candidates, endpoints, strict=True):
            if endpoint is not None:
                host, port = parse_rendezvous_endpoint(endpoint.decode(), 0)
                plan.append((key, host, port))
                self.known.pop(key, None)
                self.known[key] = (host, port)
        while len(self.known) > _KNOWN_MAX:  # the oldest first
            del self.known[next(iter(self.known))]
        self.plan = (host_key, plan)

    def deposed_by(self, node_key: str) -> str | None:
        """On the store host: the successor that took over while this node was cut off, if any (None otherwise).

        A candidate's reserved port only accepts connections once it hosts a store, so an accepted connection means
        others failed over. Every candidate of every plan this node saw is probed (a node cut off may have taken
        over after this host re-formed without it), with plain TCP connections refused at once while nothing
        happened; a candidate this node cannot reach tells nothing (during a partition the job is split, see
        docs/c10d_store_failover.md)."""
        if not self.hosted:
            return None
        for key, (host, port) in list(self.known.items()):
            if key != node_key and _accepts(host, port):
                return f"{key} at {host}:{port}"
        return None

    # ------------------------------------------------------------------ after a loss

    def store_gone(self, backend) -> bool:
        """Whether the store is gone for good: its port refuses connections, or a call got no answer within the
        liveness timeout (a dead machine, a hung host, a partition: the same to everyone who cannot reach it)."""
        if self.plan is None:
            return False
        if isinstance(backend, StoreHostFailover) and backend.stuck:
            return True
        return _refuses(*self.endpoint)

    def take_over(self, node_key: str, state) -> tuple[Any, Any]:
        """Move this node to the successor's store (hosting it if this node is the successor): the new protocol
        backend and the new agent-facing store. Raises RendezvousConnectionError when no candidate can be reached."""
        with self._lock:
            if self.plan is None:
                raise RendezvousConnectionError(f"rendezvous store {self.endpoint[0]}:{self.endpoint[1]} is gone and "
                                                f"no successor is known (none completed a round with its host)")
            old_host, candidates = self.plan
            tried = []
            for key, host, port in candidates:
                try:
                    if key == node_key:
                        # The candidates before this node did not take over: gone too, like the old host.
                        gone = [old_host, *(k for k, _, _ in candidates[:len(tried)])]
                        moved = self._host(gone, state, host, port)
                    else:
                        moved = self._follow(host, port)
                except RendezvousError as e:
                    tried.append(f"{key} at {host}:{port} ({e})")
                    continue
                self.generation += 1
                self.endpoint = (host, port)
                self.hosted = key == node_key
                logger.warning(
                    "rendezvous %s: the store host %s is gone; %s now hosts the rendezvous store at %s:%s "
                    "(failover %d)", self.run_id, old_host, "this node" if key == node_key else key, host, port,
                    self.generation,
                )
                return moved
            raise RendezvousConnectionError(
                f"rendezvous store host {old_host} is gone and no successor could take over: tried "
                + ("; ".join(tried) if tried else "none (no standby endpoint known)")
            )

    def _backend(self, host: str, port: int):
        from .c10d_rendezvous_backend import C10dRendezvousBackend, _protocol_connection

        protocol = _protocol_connection(host, port, self.liveness)
        return C10dRendezvousBackend(protocol, self.run_id, where=f"host {host}:{port}", call_timeout=self.liveness)

    def _host(self, gone: list[str], state, host: str, port: int):
        """This node is the successor: serve a new store on the reserved socket, seeded with ``state`` minus the
        nodes in ``gone``."""
        from torch.distributed import TCPStore

        sock = self._reserved
        try:
            sock.listen(128)
            store = TCPStore(host, port, is_master=True, master_listen_fd=sock.fileno(), wait_for_workers=False,
                             multi_tenant=True, use_libuv=True, timeout=timedelta(seconds=self.read_timeout))
        except (RuntimeError, OSError) as e:
            raise RendezvousConnectionError(f"could not host the new store on {host}:{port}: {e}") from None
        self._hosting.append(sock)
        self._reserved = _reserve_port()  # for the next failover
        backend = self._backend(host, port)
        seed = state.copy()
        for key in gone:
            seed.participants.pop(key, None)
            seed.heartbeats.pop(key, None)
            if key in seed.wait_list:
                seed.wait_list.remove(key)
            if seed.expected is not None and key in seed.expected:
                seed.expected.remove(key)
        backend.set_state(seed.to_bytes(), None)
        backend.key_add(_GENERATION, self.generation + 1)
        backend.key_set(_SEEDED, b"1")
        return backend, store

    def _follow(self, host: str, port: int):
        """Connect to the successor once it serves (it may notice the loss up to a detection window later)."""
        from torch.distributed import TCPStore

        budget = self.liveness + 5.0
        deadline = time.monotonic() + budget
        while _refuses(host, port):  # its reserved port listens only once it took over
            if time.monotonic() > deadline:
                raise RendezvousConnectionError(f"it did not take over within {budget:g} s (gone too?)")
            time.sleep(0.1)
        try:
            store = TCPStore(host, port, is_master=False, use_libuv=True, timeout=timedelta(seconds=self.liveness))
            backend = self._backend(host, port)
            while True:
                (seeded,) = backend.key_get_many([_SEEDED])
                if seeded is not None:
                    break
                if time.monotonic() > deadline:
                    raise RendezvousConnectionError(f"it did not take over within {budget:g} s")
                time.sleep(0.05)
        except (RuntimeError, OSError) as e:
            raise RendezvousConnectionError(f"no store there within {budget:g} s: {e}") from None
        store.set_timeout(timedelta(seconds=self.read_timeout))
        return backend, store

    def close(self) -> None:
        self._reserved.close()
