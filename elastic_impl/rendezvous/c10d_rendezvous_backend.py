"""A :class:`RendezvousBackend` over a torch c10d store (TCPStore, or FileStore for a shared file system)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from ._backend import RendezvousBackend
from .api import RendezvousConnectionError, RendezvousParameters, RendezvousStateError
from .utils import matches_this_machine, parse_rendezvous_endpoint

__all__ = ["C10dRendezvousBackend", "create_backend"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29400
DEFAULT_READ_TIMEOUT = 60.0
# Never a valid state (states are JSON objects): reading with compare_set(key, sentinel, sentinel) returns the
# current value without writing, or the sentinel when the key does not exist — one round trip, never blocking.
_ABSENT = b"<no-state>"


def _describe(store) -> str:
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if host is not None:
        return f"TCPStore at {host}:{port}"
    return type(store).__name__


class C10dRendezvousBackend(RendezvousBackend):
    """Keeps the run's state under key ``elastic.rdzv.<run_id>.state``; the token is the stored bytes."""

    def __init__(self, store, run_id: str) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"rendezvous run_id must be a non-empty string, got {run_id!r}")
        self._store = store
        self._key = f"elastic.rdzv.{run_id}.state"
        self._where = _describe(store)

    @property
    def name(self) -> str:
        return "c10d"

    def _compare_set(self, expected: bytes, desired: bytes) -> bytes:
        try:
            return self._store.compare_set(self._key, expected, desired)
        except (RuntimeError, ValueError, OSError, TimeoutError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RendezvousConnectionError(f"rendezvous store {self._where} failed: {first_line}") from None

    def get_state(self) -> tuple[bytes, Any] | None:
        current = self._compare_set(_ABSENT, _ABSENT)
        if current == _ABSENT:
            return None
        return current, current

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        if token is not None and not isinstance(token, bytes):
            raise RendezvousStateError(f"c10d rendezvous token must be the state bytes, got {type(token).__name__}")
        state = bytes(state)
        current = self._compare_set(token if token is not None else b"", state)
        if current == _ABSENT or current == b"":
            return None
        return current, current, current == state


def _create_tcp_store(params: RendezvousParameters):
    from torch.distributed import TCPStore

    host, port = parse_rendezvous_endpoint(params.endpoint, DEFAULT_PORT)
    read_timeout = params.get("read_timeout", DEFAULT_READ_TIMEOUT)
    try:
        read_timeout = float(read_timeout)
    except (TypeError, ValueError):
        raise ValueError(f"rendezvous option read_timeout={read_timeout!r} is not a number of seconds") from None
    if read_timeout <= 0:
        raise ValueError(f"rendezvous option read_timeout={read_timeout!r} must be positive")
    explicit_host = params.get_as_bool("is_host")
    is_host = explicit_host if explicit_host is not None else matches_this_machine(host)
    timeout = timedelta(seconds=read_timeout)
    if is_host:
        try:
            return TCPStore(host, port, is_master=True, timeout=timeout, multi_tenant=True, use_libuv=True)
        except (RuntimeError, OSError) as e:
            if explicit_host:
                raise RendezvousConnectionError(f"cannot host the rendezvous TCPStore at {host}:{port}: {str(e).splitlines()[0]}") from None
            # Another agent on this machine hosts it already (port taken): join as a client, like torchrun.
            logger.info("rendezvous store %s:%s is hosted elsewhere on this machine (%s); connecting", host, port, e)
    try:
        return TCPStore(host, port, is_master=False, timeout=timeout, use_libuv=True)
    except (RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RendezvousConnectionError(
            f"cannot reach the rendezvous TCPStore at {host}:{port} within {read_timeout} s: {msg}"
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


def create_backend(params: RendezvousParameters) -> tuple[C10dRendezvousBackend, Any]:
    """Create the backend and its store from ``params``.

    Options: ``store_type`` (``tcp`` default, or ``file``: the endpoint is a path), ``read_timeout`` (seconds, default
    60; every store call fails with RendezvousConnectionError after it), ``is_host`` (host the TCPStore; default:
    when the endpoint names this machine, falling back to client when the port is already taken).
    """
    store_type = str(params.get("store_type", "tcp")).strip().lower()
    if store_type in ("tcp", "c10d"):
        store = _create_tcp_store(params)
    elif store_type == "file":
        store = _create_file_store(params)
    else:
        raise ValueError(f"rendezvous option store_type={store_type!r} is invalid; allowed: tcp, file")
    backend = C10dRendezvousBackend(store, params.run_id)
    # Fail now, naming the store, rather than at the first join.
    backend.get_state()
    return backend, store
