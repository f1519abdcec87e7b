"""The ``etcd-v2`` rendezvous backend: the dynamic rendezvous state in one etcd v2 key.

The state blob is stored base64-encoded (v2 values are text) under ``<key_prefix>/<run_id>`` with a TTL that every
write renews (two hours by default, so an abandoned run's state disappears by itself). Compare-and-set uses the
key's ``modifiedIndex`` as the token: a write carries ``prevIndex=<token>`` (or ``prevExist=false`` for the first
one), so it lands only if nobody wrote in between.

etcd 3.4/3.5 serve the v2 API only when started with ``--enable-v2=true``; etcd 3.6 removed it — use
``etcd-v3`` (:mod:`elastic_impl.rendezvous.etcd_v3_rendezvous_backend`) there.
"""

from __future__ import annotations

import binascii
from base64 import b64decode, b64encode
from typing import Any

import etcd

from ._backend import ChangeNotification, RendezvousBackend
from ._etcd_client import client_endpoint, connection_options, is_unreachable, one_line
from .api import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousParameters,
    RendezvousStateError,
    rendezvous_handler_registry,
)
from .etcd_store import EtcdStore
from .options import check_run_id
from .utils import parse_rendezvous_endpoint  # noqa: F401 -- upstream exposes it here

__all__ = ["EtcdRendezvousBackend", "create_backend"]

KEY_PREFIX = "/torch/elastic/rendezvous"
STORE_PREFIX = "/torch/elastic/store"


class EtcdRendezvousBackend(RendezvousBackend, ChangeNotification):
    """Rendezvous state of run ``run_id`` in etcd (v2 API) through ``client`` (a python-etcd ``etcd.Client``).

    ``key_prefix``: etcd directory holding the state key (default: the root); ``ttl``: seconds the state survives
    without a write (default 7200).
    """

    _DEFAULT_TTL = 7200

    def __init__(self, client, run_id: str, key_prefix: str | None = None, ttl: int | None = None) -> None:
        check_run_id(run_id)  # a '/' in it is fine (as upstream): the state key then sits in a sub-directory
        self._client = client
        prefix = (key_prefix or "").rstrip("/")
        if prefix and not prefix.startswith("/"):
            prefix = "/" + prefix
        self._key = f"{prefix}/{run_id}"
        self._ttl = int(ttl) if ttl and ttl > 0 else self._DEFAULT_TTL
        # Off by default: measured on the loaded 2-core machine, waking on watches did not beat polling (4 nodes
        # arriving together: 1030 vs 473 ms; a late 4th node: 698 vs 756 ms) and costs an extra read per change.
        self.watch_state = False

    @property
    def name(self) -> str:
        return "etcd-v2"

    @property
    def key(self) -> str:
        """The etcd key holding the state."""
        return self._key

    def _failed(self, e: BaseException) -> RendezvousConnectionError:
        # the member the client talks to now: with several, it may have moved on from the first
        return RendezvousConnectionError(
            f"etcd at {client_endpoint(self._client)} failed on key {self._key}: {one_line(e)}")

    def _decode(self, node) -> tuple[bytes, Any]:
        try:
            return b64decode(node.value.encode(), validate=True), node.modifiedIndex
        except (binascii.Error, AttributeError, ValueError) as e:
            raise RendezvousStateError(f"rendezvous state in etcd key {self._key} is not base64: {one_line(e)}") from None

    def state_version(self) -> int | None:
        """None (the state machine then polls) unless ``watch_state`` is set; otherwise the state key's
        modifiedIndex (0 when absent). v2 has no value-less read: this moves the state too, its use is
        :meth:`wait_for_change`."""
        if not self.watch_state:
            return None
        try:
            return int(self._client.read(self._key).modifiedIndex)
        except etcd.EtcdKeyNotFound:
            return 0
        except (etcd.EtcdException, OSError) as e:
            raise self._failed(e) from None

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        """Watch the state key from just after ``version`` (etcd keeps the last 1000 events, so a change made
        before the watch started still counts): True on a change, False after ``timeout`` seconds."""
        seconds = max(float(timeout), 0.01)  # python-etcd reads 0 as "wait forever"
        timeout_for = getattr(self._client, "timeout_for", None)
        try:
            self._client.watch(self._key, index=int(version) + 1 if version else None,
                               timeout=timeout_for(seconds) if timeout_for else seconds)
            return True
        except etcd.EtcdWatchTimedOut:
            return False
        except etcd.EtcdEventIndexCleared:
            return True  # history moved past our version: something changed
        except (etcd.EtcdException, OSError) as e:
            raise self._failed(e) from None

    def get_state(self) -> tuple[bytes, Any] | None:
        try:
            node = self._client.read(self._key)
        except etcd.EtcdKeyNotFound:
            return None
        except (etcd.EtcdException, OSError) as e:
            raise self._failed(e) from None
        except Exception as e:  # urllib3 errors python-etcd lets through (e.g. read timeouts)
            if is_unreachable(e):
                raise self._failed(e) from None
            raise
        return self._decode(node)

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        if token is not None:
            try:
                token = int(token)
            except (TypeError, ValueError):
                # Not a token this backend ever handed out: it cannot match; report the current state.
                current = self.get_state()
                return None if current is None else (*current, False)
            if token <= 0:
                # Never a modifiedIndex; etcd v2 ignores prevIndex=0, so it would overwrite unconditionally.
                # Like upstream (which tests the token's truth), 0 means "no token": write only if absent.
                token = None
        condition = {"prevIndex": token} if token is not None else {"prevExist": False}
        try:
            node = self._client.write(self._key, b64encode(bytes(state)).decode(), ttl=self._ttl, **condition)
        except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
            # Lost the race (or the state expired under us): report what is there now.
            current = self.get_state()
            return None if current is None else (*current, False)
        except (etcd.EtcdException, OSError) as e:
            raise self._failed(e) from None
        except Exception as e:
            if is_unreachable(e):
                raise self._failed(e) from None
            raise
        return (*self._decode(node), True)


def create_backend(params: RendezvousParameters) -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """Create the backend and its store (an :class:`EtcdStore` under ``/torch/elastic/store``) from ``params``.

    Options: ``protocol`` (``http`` default, or ``https``), ``read_timeout`` (seconds, default 60),
    ``connect_timeout`` (seconds, default 5: how long an unreachable endpoint takes to report), ``ssl_cert``,
    ``ssl_cert_key``, ``ca_cert`` (https only), ``ttl`` (seconds the state survives without writes, default 7200),
    ``watch_state`` (default false: waiting nodes wake on an etcd watch of the state instead of polling).
    Reaches etcd once before returning, so a wrong endpoint fails here with RendezvousConnectionError.
    """
    options = connection_options(params)
    ttl = params.get_as_int("ttl", None)
    if ttl is not None and ttl <= 0:
        raise ValueError(f"rendezvous option ttl={params.get('ttl')!r} must be a positive number of seconds")
    client = options.v2_client()
    backend = EtcdRendezvousBackend(client, params.run_id, key_prefix=KEY_PREFIX, ttl=ttl)
    backend.watch_state = bool(params.get_as_bool("watch_state", False))
    try:
        backend.get_state()
    except RendezvousConnectionError as e:
        raise RendezvousConnectionError(
            f"cannot reach etcd (v2 API) at {options.endpoint}: {str(e).rsplit(': ', 1)[-1]}"
        ) from None
    return backend, EtcdStore(client, STORE_PREFIX)


def _create_etcd_v2_handler(params: RendezvousParameters) -> RendezvousHandler:
    from .dynamic_rendezvous import create_handler

    backend, store = create_backend(params)
    return create_handler(store, backend, params)


rendezvous_handler_registry.register("etcd-v2", _create_etcd_v2_handler)
