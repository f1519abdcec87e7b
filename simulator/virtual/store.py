"""The simulated rendezvous store: an in-memory :class:`RendezvousBackend` with latency, loss and partitions.

Model. The store keeps every recent version of the state blob with the virtual time it was written. A read
issued by a node returns the version that was current ``d`` seconds ago, ``d`` drawn uniformly from
``[0, latency + node delay]``: the request reached the store that long before the node acts on the answer, so writes
landing in between are missed, exactly the window a compare-and-set must guard. Writes land at the current time and
are checked against the current version (the token). Each node's reads are monotonic (never older than a version
it already saw, its own writes included), as over one connection to a linearizable server. ``state_version()``
(the optional change probe of the backend seam) follows the same rule and costs a few bytes.

Faults: ``partition(node)``/``heal(node)`` make every call of that node raise ``RendezvousConnectionError``;
``delay(node, seconds)`` adds latency; ``crash()`` makes the whole store unreachable (``restart_store``) until
``down`` is cleared, and with ``persistent=False`` empties it and breaks every open connection for good; ``loss`` is
the probability that any call fails. ``broken_cas=True`` is TEST-ONLY: writes succeed whatever their token.

Silent and refused partitions (what a live node sees, measured with network namespaces and the blackhole proxy). A
refused partition (``partition(node, silent=False)``: the proxy's ``drop`` mode, connections closed) and a crashed
store fail every call at once. A silent one (``partition(node)``: ``isolate_node``, ``split_cluster`` and
``partition`` in ``blackhole`` mode; nothing is delivered and nothing is refused) makes calls hang, and a hung call
holds up the agent thread that made it. Callers that can block ask :meth:`SimStore.hold` before a call and, when it
says so, make the call only when the blocked one returns:

- rendezvous store calls (joins, heartbeats, the agent's membership checks and restart counter: the real backend
  bounds each by ``call_timeout``, the store liveness bound): the node's first call after the cut blocks for
  ``call_timeout`` seconds of virtual time and then fails; later calls fail at once, until the heal. A call still
  blocked when the node heals returns then and succeeds (live: the held bytes are delivered; the backend's abandoned
  connection and its reconnect, about a second, are not modelled). One window per node, shared by its agent and
  keep-alive (live each has its own connection and its own first call: they start within a heartbeat of each other).
- round-store calls (``connection="round"``: the agent's peer-failure check, exit barrier and failure claim, which
  the live agent makes on its own connection to the round's store, each bounded by its detection window, the
  heartbeat expiry): the same rule on a window of their own, ``round_call_timeout`` seconds (live: a reconnect
  after the heal; not modelled, calls succeed at once then).

The model is deterministic (nothing in it is drawn) and costs nothing while no node is silently cut.

Keyed storage (the seam's optional per-key operations: add, set, get-many, compare-set) is offered when
``keyed=True`` (scenario ``store.keyed``; off by default), so the state machine takes its O(N)-bytes arrival path where it has one; those calls
are single atomic operations without a staleness window. ``broken_cas`` breaks ``key_compare_set`` too.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from elastic_impl.rendezvous._backend import KeyedStorage, RendezvousBackend, StateVersions
from elastic_impl.rendezvous.api import RendezvousConnectionError
from elastic_impl.rendezvous.options import DEFAULT_READ_TIMEOUT

from .clock import VirtualClock

_PRUNE_AT = 256


class SimStore:
    def __init__(
        self,
        clock: VirtualClock,
        rng: random.Random,
        latency: float = 0.0,
        loss: float = 0.0,
        broken_cas: bool = False,
        keyed: bool = False,
        persistent: bool = True,
        call_timeout: float = DEFAULT_READ_TIMEOUT,
        round_call_timeout: float | None = None,
    ) -> None:
        self.clock = clock
        self.persistent = persistent
        self.clients: set[str] = set()  # nodes that have called the store (their connections are open)
        self.lost_clients: set[str] = set()  # connections a non-persistent restart broke for good
        self.keyed = keyed
        self.rng = rng
        self.latency = latency
        self.loss = loss
        self.broken_cas = broken_cas
        self.down = False
        self.partitioned: set[str] = set()
        # Silent partitions (a subset of ``partitioned``); per silent node, when its first call times out; callbacks
        # of calls blocked until the node heals (see the module docstring).
        self.silent: set[str] = set()
        self.call_timeout = float(call_timeout)
        self.round_call_timeout = float(round_call_timeout if round_call_timeout is not None else call_timeout)
        # (node, connection) -> when that connection's first call after the cut times out
        self._first_call_fails_at: dict[tuple[str, str], float] = {}
        self._blocked: dict[str, list[Callable[[], None]]] = {}
        self.delays: dict[str, float] = {}
        # Versions base+1 .. base+len(times): write times and blobs.
        self._times: list[float] = []
        self._blobs: list[bytes] = []
        self._base = 0
        self.get_calls = 0
        self.version_calls = 0
        self.key_calls = 0
        # Keyed storage (the seam's optional per-key operations); ``keyed=False`` hides it from the state machine.
        self.keys: dict[str, bytes] = {}
        self.set_calls = 0
        self.failed_cas = 0
        self.failed_calls = 0
        self.bytes_read = 0
        self.bytes_written = 0

    # ------------------------------------------------------------------ faults

    def partition(self, node: str, silent: bool = True) -> None:
        """Cut ``node`` off the store: its calls hang (``silent``) or are refused (see the module docstring)."""
        self.partitioned.add(node)
        if silent:
            self.silent.add(node)

    def heal(self, node: str | None = None) -> None:
        """Undo partitions and delays of ``node`` (all nodes when None); calls blocked on them return now."""
        names = sorted(self.partitioned) if node is None else [node]
        if node is None:
            self.delays.clear()
        else:
            self.delays.pop(node, None)
        for name in names:
            self.partitioned.discard(name)
            self.silent.discard(name)
            self._first_call_fails_at.pop((name, "rendezvous"), None)
            self._first_call_fails_at.pop((name, "round"), None)
            for resume in self._blocked.pop(name, ()):
                self.clock.after(0.0, resume)

    def hold(self, node: str, resume: Callable[[], None], connection: str = "rendezvous") -> bool:
        """Whether a store call ``node`` is about to make on ``connection`` (``rendezvous`` or ``round``) blocks (the
        node is silently cut). If it does, ``resume`` runs when the blocked call returns -- when the connection's
        first call after the cut times out, or at the heal, whichever comes first -- and the caller makes the call
        then (it fails at once, or succeeds after a heal); if not, the caller makes it now."""
        if node not in self.silent:
            return False
        fails_at = self._first_silent_call(node, connection)
        if self.clock.now >= fails_at:
            return False  # the first call already timed out: this one fails at once
        returned = [False]

        def once() -> None:  # the timeout or the heal, whichever comes first
            if not returned[0]:
                returned[0] = True
                resume()

        self.clock.after(fails_at - self.clock.now, once)
        self._blocked.setdefault(node, []).append(once)
        return True

    def _first_silent_call(self, node: str, connection: str = "rendezvous") -> float:
        """When the first call of silently cut ``node`` on ``connection`` times out (that call is being made now if
        it is the first)."""
        key = (node, connection)
        fails_at = self._first_call_fails_at.get(key)
        if fails_at is None:
            bound = self.round_call_timeout if connection == "round" else self.call_timeout
            fails_at = self._first_call_fails_at[key] = self.clock.now + bound
        return fails_at

    def delay(self, node: str, seconds: float) -> None:
        self.delays[node] = seconds

    def crash(self) -> None:
        """The store goes down (``restart_store``). A non-persistent store loses its data and every open
        connection: the nodes that were connected fail on every later call (a TCPStore client never reconnects)."""
        self.down = True
        if not self.persistent:
            self._times, self._blobs, self._base = [], [], self.version
            self.keys = {}
            self.lost_clients |= self.clients

    def round_trip(self, node: str) -> float:
        """Time a call of ``node`` takes; a node steps again no sooner than this."""
        return self.latency + self.delays.get(node, 0.0)

    # ------------------------------------------------------------------ calls

    def _check_reachable(self, node: str, op: str) -> None:
        reason = None
        if node in self.lost_clients:
            reason = "its connection died with the restarted store (TCPStore clients do not reconnect)"
        elif self.down:
            reason = "store is down (restarting)"
        elif node in self.silent:
            self._first_silent_call(node)
            reason = f"{node} is partitioned from the store (silent: no answer within {self.call_timeout:g} s)"
        elif node in self.partitioned:
            reason = f"{node} is partitioned from the store (connection refused)"
        elif self.loss and self.rng.random() < self.loss:
            reason = "message lost"
        if reason:
            self.failed_calls += 1
            raise RendezvousConnectionError(f"sim store: {op} from {node} failed: {reason}")
        self.clients.add(node)

    @property
    def version(self) -> int:
        return self._base + len(self._times)

    def current(self) -> bytes | None:
        return self._blobs[-1] if self._blobs else None

    def _visible_index(self, node: str, floor: int, floor_time: float = float("-inf")) -> int:
        """Index of the version a read by ``node`` sees: up to one round trip stale, never older than ``floor`` (the
        newest version this client already saw: a client's reads are monotonic, as over one connection to one
        server) nor than what was written by ``floor_time`` (when this client's last keyed operation was served);
        -1 when nothing visible was written."""
        index = len(self._times) - 1
        window = self.round_trip(node)
        if window > 0 and index >= 0:
            seen_at = max(self.clock.now - self.rng.uniform(0.0, window), floor_time)
            if self._times[index] > seen_at:
                index = bisect_right(self._times, seen_at) - 1
                if index < 0 and self._base > 0:
                    index = 0  # pruned history: the oldest kept version is at most that stale
        return max(index, floor - self._base - 1)

    def get_state(self, node: str, floor: int = 0, floor_time: float = float("-inf")) -> tuple[bytes, Any] | None:
        self._check_reachable(node, "get_state")
        self.get_calls += 1
        index = self._visible_index(node, floor, floor_time)
        if index < 0:
            return None
        blob = self._blobs[index]
        self.bytes_read += len(blob)
        return blob, self._base + index + 1

    def state_version(self, node: str, floor: int = 0, floor_time: float = float("-inf")) -> int:
        """The version a read by ``node`` would see now (0: nothing written); a few bytes on the wire."""
        self._check_reachable(node, "state_version")
        self.version_calls += 1
        self.bytes_read += 8
        return self._base + self._visible_index(node, floor, floor_time) + 1

    def set_state(self, node: str, state: bytes, token: Any | None) -> tuple[bytes, Any, bool] | None:
        self._check_reachable(node, "set_state")
        self.set_calls += 1
        self.bytes_written += len(state)
        current_token = self.version if self._times else None
        if token != current_token and not self.broken_cas:
            self.failed_cas += 1
            current = self.current()
            if current is None:
                return None
            self.bytes_read += len(current)
            return current, current_token, False
        self._times.append(self.clock.now)
        self._blobs.append(bytes(state))
        if len(self._times) > _PRUNE_AT:
            self._prune()
        return state, self.version, True

    # ------------------------------------------------------------------ keyed storage (optional seam)
    # Single atomic operations on a linearizable server: no staleness window (there is no read-then-write here).

    def key_add(self, node: str, key: str, amount: int) -> int:
        self._check_reachable(node, "key_add")
        self.key_calls += 1
        value = int(self.keys.get(key, b"0")) + amount
        self.keys[key] = str(value).encode()
        self.bytes_written += len(key) + 8
        self.bytes_read += 8
        return value

    def key_set(self, node: str, key: str, value: bytes) -> None:
        self._check_reachable(node, "key_set")
        self.key_calls += 1
        self.keys[key] = bytes(value)
        self.bytes_written += len(key) + len(value)

    def key_get_many(self, node: str, keys: list[str]) -> list[bytes | None]:
        self._check_reachable(node, "key_get_many")
        self.key_calls += 1
        values = [self.keys.get(k) for k in keys]
        self.bytes_written += sum(len(k) for k in keys)
        self.bytes_read += sum(len(v) for v in values if v is not None)
        return values

    def key_compare_set(self, node: str, key: str, expected: bytes | None, desired: bytes) -> bytes:
        self._check_reachable(node, "key_compare_set")
        self.key_calls += 1
        current = self.keys.get(key)
        self.bytes_written += len(key) + len(desired) + len(expected or b"")
        if current == expected or self.broken_cas:
            self.keys[key] = bytes(desired)
            current = self.keys[key]
        else:
            self.failed_cas += 1
        self.bytes_read += len(current) if current is not None else 0
        return current if current is not None else b""

    def key_delete_many(self, node: str, keys: list[str]) -> None:
        self._check_reachable(node, "key_delete_many")
        self.key_calls += 1
        for k in keys:
            self.keys.pop(k, None)
        self.bytes_written += sum(len(k) for k in keys)

    def _prune(self) -> None:
        horizon = self.clock.now - (self.latency + max(self.delays.values(), default=0.0))
        keep_from = max(0, bisect_right(self._times, horizon) - 1)
        if keep_from:
            del self._times[:keep_from]
            del self._blobs[:keep_from]
            self._base += keep_from

    def client(self, node: str) -> SimStoreClient:
        # Without keyed storage the client has no key operations at all, as a get/set-only backend (etcd-v2).
        return KeyedSimStoreClient(self, node) if self.keyed else SimStoreClient(self, node)

    def counters(self) -> dict[str, int]:
        return {
            "get_calls": self.get_calls,
            "version_calls": self.version_calls,
            "key_calls": self.key_calls,
            "set_calls": self.set_calls,
            "failed_cas": self.failed_cas,
            "failed_calls": self.failed_calls,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }


class SimStoreClient(RendezvousBackend, StateVersions):
    """One node's connection to the :class:`SimStore` (partitions and delays are per node)."""

    def __init__(self, store: SimStore, node: str) -> None:
        self.store = store
        self.node = node
        # Newest version this client has seen, and when its last keyed call was served (reads never go back past
        # either).
        self.floor = 0
        self.floor_time = float("-inf")

    @property
    def name(self) -> str:
        return "sim"

    def get_state(self) -> tuple[bytes, Any] | None:
        got = self.store.get_state(self.node, self.floor, self.floor_time)
        if got is not None:
            self.floor = max(self.floor, got[1])
        return got

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        written = self.store.set_state(self.node, state, token)
        if written is not None:
            self.floor = max(self.floor, written[1])
        return written

    def state_version(self) -> int | None:
        version = self.store.state_version(self.node, self.floor, self.floor_time)
        self.floor = max(self.floor, version)
        return version


class KeyedSimStoreClient(SimStoreClient, KeyedStorage):
    """A client of a store with keyed storage (``keyed=True``)."""

    def supports_keys(self) -> bool:
        return True

    # Keyed operations are served "now": later reads of this client see at least what was written by then.

    def key_add(self, key: str, amount: int) -> int:
        self.floor_time = self.store.clock.now
        return self.store.key_add(self.node, key, amount)

    def key_set(self, key: str, value: bytes) -> None:
        self.floor_time = self.store.clock.now
        self.store.key_set(self.node, key, value)

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        self.floor_time = self.store.clock.now
        return self.store.key_get_many(self.node, keys)

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        self.floor_time = self.store.clock.now
        return self.store.key_compare_set(self.node, key, expected, desired)

    def key_delete_many(self, keys: list[str]) -> None:
        self.floor_time = self.store.clock.now
        self.store.key_delete_many(self.node, keys)
