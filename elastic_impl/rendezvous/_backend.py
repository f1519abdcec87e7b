"""The storage seam of the dynamic rendezvous: an opaque state blob guarded by compare-and-set tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ChangeNotification",
    "KeyedStorage",
    "NodeLiveness",
    "RendezvousBackend",
    "SeparateHeartbeatConnection",
    "StateVersions",
    "StoreHostFailover",
]


class RendezvousBackend(ABC):
    """Stores one rendezvous state blob per run.

    Contract (every implementation, and the state machine relies on it):

    - ``get_state()`` returns ``(state, token)`` or ``None`` when no state was ever written.
    - ``set_state(state, token)`` writes ``state`` only if the stored state still carries ``token`` (``None``
      means "only if nothing is stored yet"). It returns ``(current_state, current_token, has_set)``: on success
      the written state and its new token with ``has_set=True``; otherwise the state that won, its token and
      ``False``. ``None`` may be returned when the blob vanished between the compare and the read.
    - Any failure to reach the storage raises :class:`~elastic_impl.rendezvous.api.RendezvousConnectionError`
      (naming where the storage is); unreadable stored data raises ``RendezvousStateError``.

    What a backend may offer beyond these three members is declared below, one protocol per capability
    (:class:`StateVersions`, :class:`ChangeNotification`, :class:`KeyedStorage`, :class:`NodeLiveness`,
    :class:`SeparateHeartbeatConnection`, :class:`StoreHostFailover`). The state machine checks
    ``isinstance(backend, <protocol>)`` and uses a capability only where it is offered, so a backend with only the
    three members above (one written against upstream's ``RendezvousBackend`` included) works unchanged: it is then
    read in full on every poll, every arrival rewrites the state, and heartbeats are timestamps in the state.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The backend's name (``c10d``, ``etcd-v2``, ``in-memory``...)."""

    @abstractmethod
    def get_state(self) -> tuple[bytes, Any] | None:
        """The stored state and its token, or ``None``."""

    @abstractmethod
    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        """Compare-and-set; see the class docstring."""


# ---------------------------------------------------------------------------------------------------------------
# Optional capabilities. ``runtime_checkable``: ``isinstance`` checks that the members exist, not their signatures;
# our backends also name the protocols they offer among their bases (tests/rendezvous/test_backend_protocols.py
# checks each one against this list). A protocol whose ``supports_*()`` member is part of it is one a backend may
# switch off per instance (a run-wide setting every node must share): offering it means having the members, using
# it needs ``supports_*()`` too.


@runtime_checkable
class StateVersions(Protocol):
    """The backend can tell cheaply whether the state changed, so a waiting node polls a few bytes, not the state.

    Promise: ``state_version()`` returns a small number that differs whenever the state was rewritten since it was
    last returned (equal numbers: the state and its token are unchanged), or ``None`` when this instance cannot tell
    (etcd without ``watch_state``); the state machine then reads the whole state on every poll.
    """

    def state_version(self) -> int | None:
        """The state's current version, or ``None`` when this backend cannot tell."""
        ...


@runtime_checkable
class ChangeNotification(StateVersions, Protocol):
    """The backend can block until the state changes, so a waiting node wakes on a change instead of sleeping out
    its poll interval.

    Promise: ``wait_for_change(version, timeout)`` blocks (real time) up to ``timeout`` seconds until
    ``state_version()`` differs from ``version``; it returns True on a change, False on timeout, ``None`` when this
    instance cannot wait (the caller then sleeps instead).
    """

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        """Wait for the version to differ from ``version``: True on a change, False on timeout, None: cannot."""
        ...


@runtime_checkable
class KeyedStorage(Protocol):
    """Small named values next to the state, so an arrival is a few O(1)-sized operations, not a state rewrite.

    With it, nodes arriving in an open round announce themselves by key and one node completes the round for all,
    so a round moves O(N) bytes instead of O(N^2) (see ``dynamic_rendezvous``). Promise, while ``supports_keys()``
    is True (an instance may switch keyed storage off; then none of the other members is called): keys are names
    relative to this backend's run (the backend namespaces them), values are bytes, every operation is atomic and
    fails like ``get_state`` when the storage cannot be reached.
    """

    def supports_keys(self) -> bool:
        """Whether this instance uses keyed storage (every node of a run must answer the same)."""
        ...

    def key_add(self, key: str, amount: int) -> int:
        """Add ``amount`` atomically (a missing key counts as 0) and return the new value; ``amount=0`` reads."""
        ...

    def key_set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        ...

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        """The current values, ``None`` for missing keys; never blocks."""
        ...

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        """Write ``desired`` if the value is ``expected`` (``None``: the key is missing); return the value after."""
        ...

    def key_delete_many(self, keys: list[str]) -> None:
        """Remove ``keys`` (missing ones are fine)."""
        ...


@runtime_checkable
class NodeLiveness(Protocol):
    """The storage itself expires a node that stops renewing (etcd-v3: a lease per node), so a heartbeat is one O(1)
    renewal instead of a timestamp rewritten into the shared state, and dead nodes are those no longer listed.

    Promise, while ``supports_liveness()`` is True (an instance may switch it off; then the heartbeats are
    timestamps in the state and none of the other members is called): ``heartbeat(node_key, ttl)`` keeps
    ``node_key`` listed by ``live_nodes()`` for ``ttl`` more seconds; ``forget(node_key)`` unlists it now.
    """

    def supports_liveness(self) -> bool:
        """Whether this instance keeps per-node liveness (every node of a run must answer the same)."""
        ...

    def heartbeat(self, node_key: str, ttl: float) -> None:
        """Mark ``node_key`` live for ``ttl`` more seconds (creating its entry if needed)."""
        ...

    def live_nodes(self) -> set[str]:
        """Node keys whose liveness has not lapsed."""
        ...

    def forget(self, node_key: str) -> None:
        """Drop ``node_key``'s liveness now (a node leaving)."""
        ...


@runtime_checkable
class SeparateHeartbeatConnection(Protocol):
    """The backend can give the keep-alive thread its own connection to the storage.

    Heartbeats must not queue behind the agent's membership polls on one connection: on a slow store that queue
    alone can outlast the heartbeat expiry. Promise: ``connection_for_heartbeats()`` returns a backend for the same
    run, safe to use from another thread alongside this one (a TCPStore client serializes its calls, so c10d
    returns a copy on a new connection); it returns this same object where one connection serves both or no second
    one can be had.
    """

    def connection_for_heartbeats(self) -> RendezvousBackend:
        """This backend over a connection of the keep-alive thread's own."""
        ...


@runtime_checkable
class StoreHostFailover(Protocol):
    """The storage is hosted by one of the nodes, and the others can move to a successor when it is lost (c10d over
    TCP: see ``c10d_failover``).

    Promise: ``failover`` is the succession plan's keeper (a ``c10d_failover.StoreFailover``), or ``None`` when this
    instance has none (failover switched off, or a store nobody can take over); ``stuck`` is True while a call got
    no answer within the backend's call timeout, which counts as the store host being gone.
    """

    failover: Any

    @property
    def stuck(self) -> bool:
        """Whether a call is still unanswered past the call timeout."""
        ...
