"""Blocking calls on one store connection, each bounded in time.

A TCPStore client blocks forever on a connection whose peer went silent (a hung or frozen host, a network cut with no
reset): its own timeout covers waits for keys, not a request whose answer never comes. Each call here runs on a
helper thread and is abandoned after ``timeout`` seconds with :class:`StoreCallTimeout`; while an abandoned call is
still stuck, further calls on the same connection (which would queue behind it) fail at once.

Only time this process was running counts (:func:`wait_running`): a process that was frozen (SIGSTOP, a debugger,
swapping) wakes up past any deadline, and blaming the store for that would fail a healthy node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["StoreCallTimeout", "BoundedCalls", "BoundedStore", "wait_running"]

T = TypeVar("T")


class StoreCallTimeout(TimeoutError):
    """A store call got no answer within its bound (or an earlier one on the same connection is still stuck)."""


def wait_running(done: threading.Event, timeout: float) -> bool:
    """``done.wait(timeout)``, where only time this process was running counts against ``timeout``.

    The wait goes in short slices, and a slice that took much longer than asked is counted at its asked length."""
    slice_ = min(0.25, timeout)
    waited = 0.0
    while waited < timeout:
        started = time.monotonic()
        if done.wait(slice_):
            return True
        waited += min(time.monotonic() - started, 2 * slice_)
    return done.is_set()


class BoundedCalls:
    """Runs calls on one connection, each bounded by ``timeout`` seconds; ``what`` names the connection in errors."""

    def __init__(self, timeout: float, what: str, thread_name: str = "store-call") -> None:
        if not timeout > 0:
            raise ValueError(f"store call timeout must be positive seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.what = what
        self._thread_name = thread_name
        self._stuck: threading.Event | None = None

    @property
    def stuck(self) -> bool:
        """Whether an abandoned call is still waiting for its answer."""
        return self._stuck is not None and not self._stuck.is_set()

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.stuck:
            raise StoreCallTimeout(f"{self.what}: an earlier call got no answer within {self.timeout:g} s")
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=self._thread_name, daemon=True).start()
        if not wait_running(done, self.timeout):
            self._stuck = done
            raise StoreCallTimeout(f"{self.what}: no answer within {self.timeout:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def _over_tcp_store(store: Any) -> bool:
    """Whether ``store`` is a TCPStore, or prefixes one: the stores whose ``clone()`` opens a new connection (other
    stores -- an etcd store, a FileStore -- may not implement it: torch raises "pure virtual function")."""
    for _ in range(8):
        inner = getattr(store, "underlying_store", None)
        if inner is None:
            break
        store = inner
    return type(store).__name__ == "TCPStore"


# Seconds before a reconnect attempt still pending is given up for a new one (see BoundedStore._open).
_REOPEN_AFTER = 5.0


class _Attempt:
    """One ``clone()`` running on a helper thread."""

    def __init__(self, clone: Callable[[], Any]) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.store: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(clone,), name="agent-store-reconnect", daemon=True).start()

    def _run(self, clone: Callable[[], Any]) -> None:
        try:
            self.store = clone()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
        finally:
            self.done.set()


class BoundedStore:
    """A store for the agent's own calls: each method call bounded (see :class:`BoundedCalls`), on a connection of
    its own that is reopened after a call got stuck; other attributes pass through.

    The connection is a ``clone()`` of ``store`` (same server, same key prefix), opened on first use: a TCPStore
    client never reconnects, and a call abandoned on a silent connection can stay stuck long after the network
    heals (TCP's retransmission backoff), so after one the next call opens a fresh clone (bounded too) instead of
    failing until the old call wakes up. ``store`` itself is never called here, so cloning it never waits behind a
    stuck call. Other stores (not over a TCPStore) are used as they are, calls still bounded. What workers and users
    see stays ``store``."""

    def __init__(self, store: Any, timeout: float, what: str) -> None:
        self._template = store
        self._timeout = float(timeout)
        self._what = what
        self._calls = BoundedCalls(timeout, what, thread_name="agent-store-call")
        self._connection: Any = None
        self._opening: _Attempt | None = None

    @property
    def store(self) -> Any:
        return self._template

    def _open(self) -> Any:
        """A fresh clone of the template, waited for up to 5 s (or the call bound). An attempt still pending is
        waited for again by the next call, and only replaced once it is older than _REOPEN_AFTER: a connection
        attempt on a cut network succeeds soon after the heal (TCPStore retries it), so one per few seconds is
        enough, and each abandoned one lives as long as the store's timeout."""
        if not _over_tcp_store(self._template):
            return self._template
        clone = self._template.clone
        pending = self._opening
        if pending is None or (not pending.done.is_set() and time.monotonic() - pending.started > _REOPEN_AFTER):
            pending = _Attempt(clone)
            self._opening = pending
        bound = min(self._timeout, 5.0)
        if not wait_running(pending.done, bound):
            raise StoreCallTimeout(f"{self._what}: no answer within {self._timeout:g} s; reconnecting: no connection "
                                   f"within {bound:g} s")
        self._opening = None
        if pending.error is not None:
            raise StoreCallTimeout(f"{self._what}: reconnecting failed: {type(pending.error).__name__}: "
                                   f"{str(pending.error).strip().splitlines()[0] if str(pending.error).strip() else ''}")
        return pending.store

    def _current(self) -> Any:
        if self._connection is None or (self._calls.stuck and self._connection is not self._template):
            self._connection = self._open()
            self._calls = BoundedCalls(self._timeout, self._what, thread_name="agent-store-call")
        return self._connection

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(self._template, name)):
            return getattr(self._template, name)

        def bounded(*args: Any) -> Any:
            connection = self._current()
            return self._calls(getattr(connection, name), *args)

        return bounded
