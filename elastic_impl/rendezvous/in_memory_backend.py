"""A process-local :class:`RendezvousBackend` for unit tests and the virtual-time simulator.

Thread-safe; tokens are version numbers (also its ``state_version()``; ``wait_for_change`` waits on a condition in
real time). It counts calls and bytes so the store traffic of a round can be measured,
and has fault hooks: ``fail_next(count, error)`` makes the next ``count`` calls raise ``error`` (a
``RendezvousConnectionError`` by default), and ``on_call`` (``fn(op_name) -> None``) runs before every call, so a
simulator can delay, fail or record operations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ._backend import ChangeNotification, KeyedStorage, RendezvousBackend
from .api import RendezvousConnectionError


class InMemoryRendezvousBackend(RendezvousBackend, KeyedStorage, ChangeNotification):
    def __init__(self, name: str = "in-memory") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state: bytes | None = None
        self._version = 0
        self._failures_left = 0
        self._failure: Exception | None = None
        self.on_call: Callable[[str], None] | None = None
        self.get_calls = 0
        self.set_calls = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.version_calls = 0
        self.key_calls = 0
        self._keys: dict[str, bytes] = {}
        # Keyed storage can be switched off to run the state machine the way get/set-only backends (etcd) do.
        self.keyed = True

    # A version probe moves one integer; counted as 8 bytes.
    VERSION_BYTES = 8

    @property
    def name(self) -> str:
        return self._name

    def fail_next(self, count: int = 1, error: Exception | None = None) -> None:
        """Make the next ``count`` get/set calls raise ``error``."""
        with self._lock:
            self._failures_left = count
            self._failure = error

    def reset_counters(self) -> None:
        with self._lock:
            self.get_calls = self.set_calls = self.bytes_read = self.bytes_written = self.version_calls = 0
            self.key_calls = 0

    def _before(self, op: str) -> None:
        if self.on_call is not None:
            self.on_call(op)
        with self._lock:
            if self._failures_left > 0:
                self._failures_left -= 1
                raise self._failure or RendezvousConnectionError(f"in-memory backend {self._name!r}: injected {op} failure")

    def get_state(self) -> tuple[bytes, Any] | None:
        self._before("get_state")
        with self._lock:
            self.get_calls += 1
            if self._state is None:
                return None
            self.bytes_read += len(self._state)
            return self._state, self._version

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        self._before("set_state")
        with self._lock:
            self.set_calls += 1
            self.bytes_written += len(state)
            current_token = self._version if self._state is not None else None
            if token != current_token:
                if self._state is None:
                    return None
                self.bytes_read += len(self._state)
                return self._state, self._version, False
            self._state = bytes(state)
            self._version += 1
            self._changed.notify_all()
            return self._state, self._version, True

    def state_version(self) -> int | None:
        self._before("state_version")
        with self._lock:
            self.version_calls += 1
            self.bytes_read += self.VERSION_BYTES
            return self._version

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        self._before("wait_for_change")
        with self._changed:
            self.version_calls += 1
            self.bytes_read += self.VERSION_BYTES
            return self._changed.wait_for(lambda: self._version != version, timeout)

    # ------------------------------------------------------------------ keyed storage (bytes: key + value moved)

    def supports_keys(self) -> bool:
        return self.keyed

    def _count_key(self, key: str, *values: bytes | None) -> None:
        self.key_calls += 1
        self.bytes_written += len(key)
        self.bytes_read += sum(len(v) for v in values if v is not None)

    def key_add(self, key: str, amount: int) -> int:
        self._before("key_add")
        with self._lock:
            value = int(self._keys.get(key, b"0")) + int(amount)
            self._keys[key] = str(value).encode()
            self._count_key(key, b"12345678")
            return value

    def key_set(self, key: str, value: bytes) -> None:
        self._before("key_set")
        with self._lock:
            self._keys[key] = bytes(value)
            self._count_key(key)
            self.bytes_written += len(value)

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        self._before("key_get_many")
        with self._lock:
            values = [self._keys.get(k) for k in keys]
            self.key_calls += 1
            self.bytes_written += sum(len(k) for k in keys)
            self.bytes_read += sum(len(v) for v in values if v is not None)
            return values

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        self._before("key_compare_set")
        with self._lock:
            current = self._keys.get(key)
            if current == expected:
                self._keys[key] = current = bytes(desired)
            self._count_key(key, current)
            self.bytes_written += len(desired) + len(expected or b"")
            return current

    def key_delete_many(self, keys: list[str]) -> None:
        self._before("key_delete_many")
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)
            self.key_calls += 1
            self.bytes_written += sum(len(k) for k in keys)

    def key_count(self) -> int:
        """How many keys the keyed storage holds (tests check old rounds are cleaned up)."""
        with self._lock:
            return len(self._keys)
