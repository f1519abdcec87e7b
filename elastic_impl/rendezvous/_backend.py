"""The storage seam of the dynamic rendezvous: an opaque state blob guarded by compare-and-set tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


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

    Optional change notification (defaults: unsupported; backends that only implement the three members above keep
    working unchanged, the state machine then simply re-reads the state on every poll):

    - ``state_version()``: a small number that differs whenever the state was rewritten since it was last returned
      (equal numbers: the state and its token are unchanged). Lets a waiting node poll a few bytes instead of the
      whole state.
    - ``wait_for_change(version, timeout)``: block (real time) up to ``timeout`` seconds until the version differs
      from ``version``; lets a waiting node wake on a change instead of sleeping out its poll interval.

    Optional keyed storage (default: unsupported, ``supports_keys()`` is False). With it, nodes arriving in an open
    round announce themselves with O(1)-sized key operations instead of rewriting the whole state, and one node
    completes the round for all, so a round moves O(N) bytes instead of O(N^2) (see ``dynamic_rendezvous``). Keys
    are names relative to this backend's run (the backend namespaces them); values are bytes:

    - ``key_add(key, amount) -> int``: atomic add (a missing key counts as 0); ``amount=0`` reads.
    - ``key_set(key, value)``.
    - ``key_get_many(keys) -> list[bytes | None]``: current values, ``None`` for missing keys; never blocks.
    - ``key_compare_set(key, expected, desired) -> bytes``: write ``desired`` if the value is ``expected``
      (``None``: the key is missing); return the value after the call.
    - ``key_delete_many(keys)``: remove keys (missing ones are fine); old rounds' keys are removed with it.

    Optional per-node liveness (default: unsupported, ``supports_liveness()`` is False). With it, a node's
    keep-alive renews something the storage itself expires (etcd v3: a lease) instead of rewriting its heartbeat
    timestamp in the shared state, and dead nodes are those the storage no longer lists as live:

    - ``heartbeat(node_key, ttl)``: mark ``node_key`` live for ``ttl`` more seconds (creating its entry if needed).
    - ``live_nodes() -> set[str]``: node keys whose liveness has not lapsed.
    - ``forget(node_key)``: drop ``node_key``'s liveness now (a node leaving).
    """

    def supports_liveness(self) -> bool:
        """Whether the liveness operations below are implemented (the default: no)."""
        return False

    def heartbeat(self, node_key: str, ttl: float) -> None:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no per-node liveness")

    def live_nodes(self) -> set[str]:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no per-node liveness")

    def forget(self, node_key: str) -> None:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no per-node liveness")

    def supports_keys(self) -> bool:
        """Whether the keyed operations below are implemented (the default: no)."""
        return False

    def key_add(self, key: str, amount: int) -> int:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no keyed storage")

    def key_set(self, key: str, value: bytes) -> None:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no keyed storage")

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no keyed storage")

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no keyed storage")

    def key_delete_many(self, keys: list[str]) -> None:
        raise NotImplementedError(f"rendezvous backend {self.name!r} has no keyed storage")

    def connection_for_heartbeats(self) -> RendezvousBackend:
        """This backend over its own connection, for the keep-alive thread (the default: this same object).

        Heartbeats must not queue behind the agent's membership polls on one connection: on a slow store that
        queue alone can outlast the heartbeat expiry. Backends whose client serializes calls (a TCPStore client
        does) return a copy on a new connection; the copy must be safe to use from another thread.
        """
        return self

    def state_version(self) -> int | None:
        """The state's current version, or ``None`` when this backend cannot tell (the default)."""
        return None

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        """Wait until the version differs from ``version``: True on a change, False on timeout, ``None`` when this
        backend cannot wait (the default; the caller sleeps instead)."""
        return None

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
