"""A :class:`RendezvousBackend` over a torch c10d store (TCPStore, or FileStore for a shared file system)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

from elastic_impl.events import construct_and_record_rdzv_event  # noqa: F401 -- upstream exposes it here
from elastic_impl.events.api import NodeState  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.bounded_call import BoundedCalls, StoreCallTimeout
from elastic_impl.utils.bounded_call import wait_running as _wait_running

from ._backend import (
    ChangeNotification,
    KeyedStorage,
    RendezvousBackend,
    SeparateHeartbeatConnection,
    StoreHostFailover,
)
from .api import (  # RendezvousError: upstream exposes it here
    RendezvousConnectionError,
    RendezvousError,  # noqa: F401
    RendezvousParameters,
    RendezvousStateError,  # noqa: F401 -- upstream exposes it here
)
from .options import DEFAULT_READ_TIMEOUT, check_handler_run_id, option_seconds, store_liveness_timeout
from .utils import matches_this_machine, parse_rendezvous_endpoint

__all__ = ["C10dRendezvousBackend", "create_backend"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29400
# Never a valid state (states are JSON objects): reading with compare_set(key, sentinel, sentinel) returns the
# current value without writing, or the sentinel when the key does not exist — one round trip, never blocking.
_ABSENT = b"<no-state>"
_CHANGE_KEYS_KEPT = 64


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _describe(store) -> str:
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if host is not None:
        return f"TCPStore at {host}:{port}"
    return type(store).__name__



class C10dRendezvousBackend(RendezvousBackend, KeyedStorage, ChangeNotification, SeparateHeartbeatConnection,
                            StoreHostFailover):
    """Keeps the run's state under key ``elastic.rdzv.<run_id>.state``; the token is the stored bytes.

    Keys are namespaced by run id, so runs sharing one store never see each other's state; the round stores handed
    to agents are namespaced by run id and round (``torch.rendezvous.<run_id>.<round>``).

    ``where`` names the store in errors (default: ``TCPStore at host:port`` when the store exposes them).
    ``call_timeout`` (seconds) bounds every store call: a TCPStore client blocks forever on a host that is connected
    but silent (hung, stopped, partitioned without a reset), whatever the store's own timeout says, so each call
    runs on a helper thread and is abandoned after ``call_timeout`` with a ``RendezvousConnectionError``.

    A TCPStore client never reconnects: after a reset its every call fails ("Broken pipe"), and a call abandoned on a
    silent connection stays stuck long after the network heals (TCP's retransmission backoff). So after either, the
    next call first opens a fresh connection to the same host and port (itself bounded by ``call_timeout``) and
    fails at once, as before, only while that cannot be done.
    """

    def __init__(self, store, run_id: str, where: str | None = None, call_timeout: float | None = None) -> None:
        check_handler_run_id(run_id)
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(f"rendezvous store call_timeout must be positive seconds, got {call_timeout!r}")
        self._store = store
        self._run_id = run_id
        self._key = f"elastic.rdzv.{run_id}.state"
        # Change notification: every successful write bumps the counter ``<key>.version`` and creates the key
        # ``<key>.changed.<new version>``, which waiters block on with the store's ``wait``. Only the last
        # ``_CHANGE_KEYS_KEPT`` change keys exist at any time.
        self._version_key = f"{self._key}.version"
        self._key_prefix = f"elastic.rdzv.{run_id}.k."
        self._change_prefix = f"{self._key}.changed."
        self._where = where or _describe(store)
        self.call_timeout = call_timeout
        self._calls = self._bounded_calls()
        self._had_state = False  # whether this connection ever saw the run's state (see get_state)
        # Why the connection is unusable (a reset, or a call stuck on it), until a fresh one replaces it.
        self._broken: str | None = None
        # A fresh connection being opened: (done, outcome) of its helper thread.
        self._reconnecting: tuple[threading.Event, dict[str, Any]] | None = None
        # FileStore polls its file about once a second inside wait(): slower than our own polling, so not used.
        self._can_wait = type(store).__name__ != "FileStore"
        # Store-host failover (TCPStore only; see c10d_failover), set by create_backend; None: not available.
        self.failover = None

    def _call(self, op, *args):
        """``store.<op>(*args)`` (``op`` a store method's name, or a callable run as is), bounded by ``call_timeout``;
        store failures become RendezvousConnectionError. The method is looked up on the connection current after
        any reconnect (see :meth:`_reconnect`)."""
        if self._broken is not None:
            self._reconnect()
        fn = getattr(self._store, op) if isinstance(op, str) else op
        try:
            return self._calls(fn, *args) if self._calls is not None else fn(*args)
        except StoreCallTimeout:
            self._broken = f"an earlier call got no answer within {self.call_timeout} s"
            raise RendezvousConnectionError(
                f"rendezvous store {self._where} is gone: no answer within {self.call_timeout} s "
                f"(the store host died, hangs, or the network to it is cut)"
            ) from None
        except (RuntimeError, ValueError, OSError, TimeoutError) as e:
            self._note_broken(e)
            raise RendezvousConnectionError(
                f"rendezvous store {self._where} is gone or unreachable: {_first_line(e)}"
            ) from None

    def _bounded_calls(self) -> BoundedCalls | None:
        """Calls on the current connection, each bounded by ``call_timeout`` (None: unbounded)."""
        if self.call_timeout is None:
            return None
        return BoundedCalls(self.call_timeout, f"rendezvous store {self._where}", thread_name="rdzv-store-call")

    def _note_broken(self, error: BaseException) -> None:
        """A network error (reset, refused, dead host) leaves a TCPStore connection unusable for good."""
        if type(error).__name__ == "DistNetworkError" or isinstance(error, OSError):
            self._broken = _first_line(error)

    def _reconnect(self) -> None:
        """Replace a broken connection by a fresh one to the same host and port; raise while that cannot be done.

        A new TCPStore client, not ``clone()``: clone waits for the stuck call's lock. The attempt runs on a helper
        thread, waited for up to ``call_timeout`` (connecting to a cut-off host can block, and a TCPStore client
        retries refused connections for its whole timeout). One that finished after its caller gave up is used by
        the next call; one still pending then is abandoned for a new attempt, since a connection opened during a
        cut can stay silent long after the heal, like the old one (each abandoned attempt ends within the store's
        own timeout)."""
        store = self._store
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        if type(store).__name__ != "TCPStore" or host is None or port is None:
            return  # nothing to reconnect (FileStore, a test double): calls go on and report their own errors
        if self._reconnecting is None or not self._reconnecting[0].is_set():
            done = threading.Event()
            outcome: dict[str, Any] = {}
            timeout = getattr(store, "timeout", None) or timedelta(seconds=self.call_timeout or DEFAULT_READ_TIMEOUT)

            def connect() -> None:
                from torch.distributed import TCPStore

                try:
                    outcome["store"] = TCPStore(host, port, is_master=False, timeout=timeout, use_libuv=True)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    outcome["error"] = e
                finally:
                    done.set()

            self._reconnecting = (done, outcome)
            threading.Thread(target=connect, name="rdzv-store-reconnect", daemon=True).start()
        done, outcome = self._reconnecting
        # A fresh connection to a store that answers takes milliseconds: waiting a whole call bound for one that
        # is stuck would only delay the next attempt (and a late one is still adopted by the next call).
        bound = min(self.call_timeout if self.call_timeout is not None else DEFAULT_READ_TIMEOUT, 1.0)
        why = self._broken
        if not _wait_running(done, bound):
            raise RendezvousConnectionError(
                f"rendezvous store {self._where} is gone: {why}; reconnecting: no connection within {bound} s"
            )
        self._reconnecting = None
        if "store" not in outcome:
            raise RendezvousConnectionError(
                f"rendezvous store {self._where} is gone: {why}; reconnecting: {_first_line(outcome['error'])}"
            )
        logger.info("rendezvous store %s: reconnected (%s)", self._where, why)
        self._store = outcome["store"]
        self._broken = None
        self._calls = self._bounded_calls()  # the abandoned call was stuck on the old connection

    @property
    def name(self) -> str:
        return "c10d"

    @property
    def stuck(self) -> bool:
        """Whether a call is still stuck past ``call_timeout`` (the store host counts as gone)."""
        return self._calls is not None and self._calls.stuck

    def connection_for_heartbeats(self) -> C10dRendezvousBackend:
        # A TCPStore client runs one call at a time: a clone is a second connection to the same server.
        clone = getattr(self._store, "clone", None)
        if clone is None or type(self._store).__name__ != "TCPStore":
            return self
        try:
            store = clone()
        except (RuntimeError, ValueError, OSError) as e:
            logger.debug("rendezvous store %s: no second connection for heartbeats (%s)", self._where, e)
            return self
        heartbeats = C10dRendezvousBackend(store, self._run_id, self._where, self.call_timeout)
        heartbeats._had_state = self._had_state
        return heartbeats

    def _compare_set(self, expected: bytes, desired: bytes) -> bytes:
        return self._call("compare_set", self._key, expected, desired)

    def _state_lost(self) -> RendezvousConnectionError:
        return RendezvousConnectionError(
            f"rendezvous store {self._where} no longer holds run {self._run_id!r}'s state (the store restarted "
            f"empty); the run cannot go on without it"
        )

    def get_state(self) -> tuple[bytes, Any] | None:
        current = self._compare_set(_ABSENT, _ABSENT)
        if current == _ABSENT:
            # The state is never deleted once written: gone means a store that restarted empty (a reconnect reaches
            # it). Going on would form a new round 0 with the restart count back at 0.
            if self._had_state:
                raise self._state_lost()
            return None
        self._had_state = True
        return current, current

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        # As upstream: an empty token (None, b"", "") means "only if nothing is stored yet"; a token that is not
        # bytes was never issued by this backend, so it is stale: no write, the current state and False.
        if not token:
            token = None
        elif not isinstance(token, bytes):
            current_pair = self.get_state()
            return None if current_pair is None else (*current_pair, False)
        state = bytes(state)
        current = self._compare_set(token if token is not None else b"", state)
        # A store answers a compare_set on a missing key with the expected value: a token but no state.
        absent = current == _ABSENT or current == b"" or (token is not None and current == token and current != state)
        if absent:
            if self._had_state:
                raise self._state_lost()
            return None
        self._had_state = True
        has_set = current == state
        if has_set:
            self._announce_change()
        return current, current, has_set

    # ------------------------------------------------------------------ keyed storage (see KeyedStorage)

    def supports_keys(self) -> bool:
        return True

    def _k(self, key: str) -> str:
        return f"{self._key_prefix}{key}"

    def key_add(self, key: str, amount: int) -> int:
        return int(self._call("add", self._k(key), int(amount)))

    def key_set(self, key: str, value: bytes) -> None:
        self._call("set", self._k(key), bytes(value))

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        full = [self._k(k) for k in keys]
        if not full:
            return []
        # multi_get waits for missing keys, so it is used only when check() says all exist; otherwise (and for a
        # few keys, where the check would cost as much as it saves) each key is read with the never-blocking
        # compare_set probe.
        if len(full) > 2 and self._call("check", full):
            return [bytes(v) for v in self._call("multi_get", full)]
        values = [self._call("compare_set", k, _ABSENT, _ABSENT) for k in full]
        return [None if v == _ABSENT else bytes(v) for v in values]

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        # TCPStore: an empty expected value means "only if the key is missing".
        return bytes(self._call("compare_set", self._k(key), expected or b"", bytes(desired)))

    def key_delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self._call("delete_key", self._k(key))

    def _announce_change(self) -> None:
        version = int(self._call("add", self._version_key, 1))
        self._call("set", f"{self._change_prefix}{version}", b"1")
        if version > _CHANGE_KEYS_KEPT:
            self._call("delete_key", f"{self._change_prefix}{version - _CHANGE_KEYS_KEPT}")

    def state_version(self) -> int | None:
        return int(self._call("add", self._version_key, 0))

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        if not self._can_wait:
            return None
        if self.state_version() != version:
            return True
        if self.call_timeout is not None:
            # A wait must end (and report "no change") well before the call is taken for a dead store host.
            timeout = min(timeout, self.call_timeout / 2)
        if timeout <= 0:
            return False
        return self._call(self._wait_for_key, f"{self._change_prefix}{version + 1}", timeout)

    def _wait_for_key(self, key: str, timeout: float) -> bool:
        try:
            self._store.wait([key], timedelta(seconds=timeout))
            return True
        except (RuntimeError, OSError) as e:
            # The store's own wait timeout means "no change yet"; a network error (reset, dead host) is real.
            if type(e).__name__ != "DistNetworkError" and "timeout" in str(e).lower():
                return False
            raise


def _resolve(host: str, port: int) -> None:
    """Fail at once, naming host:port, when the endpoint's host name does not resolve (no point retrying)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise RendezvousConnectionError(f"rendezvous endpoint {host}:{port}: cannot resolve host {host!r} ({e})") from None


_QUIET_CONNECT_SECONDS = 2.0  # a store host that answers within this is joined without a word


def _create_tcp_store(params: RendezvousParameters):
    """The agent-facing TCPStore (hosted here or a client), its host and port, and whether this node hosts it."""
    from torch.distributed import TCPStore

    host, port = parse_rendezvous_endpoint(params.endpoint, DEFAULT_PORT)
    read_timeout = option_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT)
    connect_timeout = option_seconds(params, "connect_timeout", read_timeout)
    _resolve(host, port)
    explicit_host = params.get_as_bool("is_host")
    is_host = explicit_host if explicit_host is not None else matches_this_machine(host)
    timeout = timedelta(seconds=read_timeout)
    if is_host:
        try:
            store = TCPStore(host, port, is_master=True, timeout=timeout, multi_tenant=True, use_libuv=True)
            return store, host, port, True
        except (RuntimeError, OSError) as e:
            if explicit_host:
                raise RendezvousConnectionError(f"cannot host the rendezvous TCPStore at {host}:{port}: {_first_line(e)}") from None
            # Another agent on this machine hosts it already (port taken): join as a client, like torchrun.
            logger.info("rendezvous store %s:%s is hosted elsewhere on this machine (%s); connecting", host, port, e)
    store = _bounded_connect(lambda: _connect_client(host, port, connect_timeout), host, port, connect_timeout)
    store.set_timeout(timeout)
    return store, host, port, False


# TCPStore's own connect retries overshoot its timeout (up to about twice it, seen under load), and a refused or
# unreachable host must still get TCPStore's own error: only a wait well past that is a handshake nobody answers.
_CONNECT_SLACK_SECONDS = 5.0
# A port that accepts connections answers a store's handshake in milliseconds; this much more after connect_timeout
# covers a store host that came up just as the timeout ran out.
_HANDSHAKE_GRACE_SECONDS = 1.0


def _bounded_connect(connect, host: str, port: int, connect_timeout: float):
    """``connect()`` on a thread, given up on soon after ``connect_timeout`` when something accepts connections on
    the port but never completes the handshake, and at the latest after twice ``connect_timeout`` (+ slack).

    TCPStore's client handshake waits for the server's answer with no timeout: when something that is not a store
    holds the port (an HTTP server, say) it blocks for good (seen: 10+ minutes). A port that refuses connections
    (no store yet) is left to TCPStore's own retries and error. The stuck thread is a daemon and holds only its own
    socket.
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def attempt() -> None:
        try:
            outcome["store"] = connect()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=attempt, name=f"tcpstore-connect-{host}:{port}", daemon=True).start()
    answered = done.wait(connect_timeout)
    if not answered and _accepts_connections(host, port):
        answered = done.wait(_HANDSHAKE_GRACE_SECONDS)
        if not answered:
            _raise_not_a_store(host, port, connect_timeout)
    if not answered and not done.wait(connect_timeout + _CONNECT_SLACK_SECONDS):
        _raise_not_a_store(host, port, connect_timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["store"]


def _raise_not_a_store(host: str, port: int, connect_timeout: float) -> None:
    raise RendezvousConnectionError(
        f"rendezvous endpoint {host}:{port}: no TCPStore answered within {connect_timeout:g} s "
        f"({_what_answers(host, port)}); is --rdzv-endpoint the store's address?"
    )


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _what_answers(host: str, port: int) -> str:
    """A short description of whatever listens at host:port, from its first bytes (to an HTTP HEAD probe)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.settimeout(1.0)
            sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")  # most text protocols answer this with their own error
            data = sock.recv(200)
    except OSError as e:
        return f"probe: {e}"
    first = data.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
    return f"it answered {first!r}" if first else "it sent nothing back"


def _connect_client(host: str, port: int, connect_timeout: float):
    from torch.distributed import TCPStore

    # Nodes often start before the store's host. A node that cannot connect at once says what it waits for and for
    # how long (torchrun blocks silently for the whole timeout), then keeps trying for the rest of connect_timeout.
    first_try = min(_QUIET_CONNECT_SECONDS, connect_timeout)
    try:
        try:
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=first_try), use_libuv=True)
        except (RuntimeError, OSError):
            if connect_timeout <= first_try:
                raise
            logger.warning("the rendezvous store at %s:%s does not answer yet; waiting up to %g s more for its host "
                           "(--rdzv-conf connect_timeout=S)", host, port, connect_timeout - first_try)
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout - first_try),
                             use_libuv=True)
    except (RuntimeError, OSError) as e:
        raise RendezvousConnectionError(
            f"cannot reach the rendezvous TCPStore at {host}:{port} within {connect_timeout} s: {_first_line(e)}"
        ) from None
    return store


def _protocol_connection(host: str, port: int, liveness: float):
    """A second connection to the store, used only by the rendezvous protocol, with the short liveness timeout.

    Its own connection keeps the bound independent of whatever timeout the agent sets on the shared store object
    (barriers set minutes), so a rendezvous call never waits longer than ``liveness`` for a silent store host.
    """
    from torch.distributed import TCPStore

    try:
        return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=liveness), use_libuv=True)
    except (RuntimeError, OSError) as e:
        raise RendezvousConnectionError(
            f"rendezvous store host {host}:{port} is gone or unreachable (no answer within {liveness} s): {_first_line(e)}"
        ) from None


def _create_file_store(params: RendezvousParameters):
    from torch.distributed import FileStore

    path = params.endpoint
    if not path:
        raise ValueError("rendezvous store_type=file needs the endpoint to be a file path, got an empty endpoint")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"rendezvous file store path {path!r}: directory {directory!r} does not exist")
    try:
        return FileStore(path)
    except (RuntimeError, OSError) as e:
        raise RendezvousConnectionError(f"cannot open the rendezvous FileStore {path!r}: {e}") from None


def _failover(params: RendezvousParameters, host: str, port: int, hosted: bool, liveness: float):
    from .c10d_failover import StoreFailover

    # Nodes that reach the store over loopback run on its machine: their standby stores are reached the same way.
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    standby_host = host if loopback else (params.local_addr or socket.getfqdn())
    read_timeout = option_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT)
    return StoreFailover(params.run_id, (host, port), hosted, standby_host, liveness, read_timeout)


def create_backend(params: RendezvousParameters) -> tuple[C10dRendezvousBackend, Any]:
    """Create the backend and its store from ``params``.

    Options: ``store_type`` (``tcp`` default, or ``file``: the endpoint is a path), ``read_timeout`` (seconds, default
    60: the timeout of the store handed to agents), ``connect_timeout`` (seconds to wait for the store host to
    accept a connection, default ``read_timeout``; a host name that does not resolve fails at once),
    ``store_liveness_timeout`` (see :func:`store_liveness_timeout`), ``is_host`` (host the TCPStore; default: when
    the endpoint names this machine, falling back to client when the port is already taken).

    Store host loss (``store_failover``, default true). The TCPStore lives in the memory of the agent that hosts
    it. When that agent dies, the survivors move to a store hosted by a successor agreed on from the last completed
    round, seeded with the state they last saw (round, members, job-wide restart count), and re-form without the
    lost host (see :mod:`elastic_impl.rendezvous.c10d_failover` and docs/c10d_store_failover.md). When no successor
    can take over (none known, all gone, or ``store_failover=false``), every rendezvous call stays bounded by the
    liveness timeout and the survivors fail within it with a ``RendezvousConnectionError`` naming the lost host.
    """
    store_type = str(params.get("store_type", "tcp")).strip().lower()
    if store_type in ("tcp", "c10d"):
        store, host, port, hosted = _create_tcp_store(params)
        liveness = store_liveness_timeout(params)
        protocol_store = _protocol_connection(host, port, liveness)
        where = f"host {host}:{port}"
        backend = C10dRendezvousBackend(protocol_store, params.run_id, where=where, call_timeout=liveness)
        if params.get_as_bool("store_failover", True):
            backend.failover = _failover(params, host, port, hosted, liveness)
    elif store_type == "file":
        store = _create_file_store(params)
        backend = C10dRendezvousBackend(store, params.run_id)
    else:
        raise ValueError(f"rendezvous option store_type={store_type!r} is invalid; allowed: tcp, file")
    # Fail now, naming the store, rather than at the first join.
    backend.get_state()
    return backend, store
