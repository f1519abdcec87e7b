"""The ``etcd-v3`` rendezvous backend (beyond upstream): the dynamic rendezvous state over etcd's v3 API.

Why: etcd 3.6 removed the v2 API that upstream's ``etcd``/``etcd-v2`` backends need (3.4/3.5 serve it only with
``--enable-v2=true``). This backend speaks v3 only.

Why the JSON gateway over plain HTTP rather than gRPC: every etcd 3.4–3.6 server answers ``POST /v3/...`` with JSON
on its client port, so this needs nothing beyond the standard library. The usual Python v3 client (``etcd3``,
0.12.0) is unmaintained and pins ``grpcio``/``protobuf`` versions that clash with what torch and other packages
want; the gateway avoids that whole dependency chain. Keys and values are base64 in the JSON, int64 fields are
decimal strings.

How (all through ``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/watch``):

- the state blob of run ``run_id`` is the value of key ``<key_prefix>/<run_id>``;
- the compare-and-set token is the key's ``mod_revision``: ``set_state`` is one transaction "if mod_revision ==
  token (or, for the first write, create_revision == 0) then put, else range", so a lost race returns the winner's
  state and token in the same round trip;
- every write attaches the key to a lease of this process, granted with ``ttl`` seconds (default 7200) and renewed
  (``keepalive``) once a third of it has passed: the state of an abandoned run disappears by itself ``ttl``
  seconds after its last live node, like the v2 backend's key TTL;
- leases as heartbeats (the optional liveness seam, on unless ``lease_liveness=false``): each node has a liveness
  key ``<state key>/alive/<node>`` bound to its own lease with TTL = keep-alive interval x max attempts; a
  keep-alive renews that lease (one small request, no write to the state blob) and etcd itself deletes the key
  once a node stops renewing, so the state machine evicts the nodes ``live_nodes()`` no longer lists;
- keyed arrivals (the optional keyed storage of the seam, on unless ``keyed_arrivals=false``): a node arriving in
  an open round writes a few O(1)-sized keys under ``<state key>/keys/`` instead of rewriting the O(N) state, so a
  round moves O(N) bytes, not O(N^2) (counters are key versions: one put per increment, no retry loop);
- :class:`EtcdV3Store` is the c10d Store handed to the agents: puts, a CAS loop for ``add``, and blocking reads
  that watch the prefix from the revision they read at (no polling).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import http.client
import json
import logging
import math
import random
import ssl
import threading
import time
from typing import Any

from torch.distributed import DistNetworkError, Store

from ._backend import ChangeNotification, KeyedStorage, NodeLiveness, RendezvousBackend
from ._etcd_client import EtcdConnectionOptions, as_bytes, connection_options, one_line
from .api import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousParameters,
    RendezvousStateError,
    rendezvous_handler_registry,
)
from .options import check_run_id

__all__ = ["EtcdV3Client", "EtcdV3RendezvousBackend", "EtcdV3Store", "create_backend"]

logger = logging.getLogger(__name__)

KEY_PREFIX = "/torch/elastic/rendezvous"
STORE_PREFIX = "/torch/elastic/store"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode((text or "").encode(), validate=True)


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's "prefix" convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # whole key space


class EtcdUnreachable(OSError):
    """The v3 gateway could not be reached or answered garbage (carries host:port)."""


class _Retriable(Exception):
    """An answer of a cluster in transition (see _RETRIABLE_ANSWERS): try again shortly."""


# Answers of a healthy cluster in transition (a leader election, a slow quorum): the same request succeeds a moment
# later, on this member or another.
_RETRIABLE_ANSWERS = ("leader changed", "no leader", "request timed out", "timed out", "not capable",
                      "too many requests", "unhealthy cluster")


class EtcdV3Client:
    """A minimal etcd v3 JSON-gateway client: one persistent HTTP connection, thread-safe, bounded connect time.

    Given several cluster members (``members``), a request that cannot reach the current member goes to the next
    one (a request fails only when no member could be reached), and an answer that means "the cluster is in
    transition" (HTTP 503 "leader changed", "no leader", a server-side timeout) is retried, on the next member, for
    up to ``failover_timeout`` seconds.
    """

    def __init__(self, host: str, port: int, *, protocol: str = "http", read_timeout: float = 60.0,
                 connect_timeout: float = 5.0, cert: Any = None, ca_cert: str | None = None,
                 members: list[tuple[str, int]] | None = None, failover_timeout: float = 10.0) -> None:
        self.members = [(h, int(p)) for h, p in (members or [(host, port)])]
        self._member = 0
        self.failover_timeout = float(failover_timeout)
        self.host, self.port = self.members[0]
        self.protocol = protocol
        self.read_timeout = float(read_timeout)
        self.connect_timeout = float(connect_timeout)
        self._ssl_context: ssl.SSLContext | None = None
        if protocol == "https":
            self._ssl_context = ssl.create_default_context(cafile=ca_cert)
            if cert:
                certfile, keyfile = cert if isinstance(cert, tuple) else (cert, None)
                self._ssl_context.load_cert_chain(certfile, keyfile)
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def from_options(cls, options: EtcdConnectionOptions) -> EtcdV3Client:
        return cls(options.host, options.port, protocol=options.protocol, read_timeout=options.read_timeout,
                   connect_timeout=options.connect_timeout, cert=options.cert, ca_cert=options.ca_cert,
                   members=options.members)

    def _next_member(self) -> None:
        """Talk to the next member of the cluster from now on (a no-op with one member)."""
        if len(self.members) > 1:
            self._close()
            self._member = (self._member + 1) % len(self.members)
            self.host, self.port = self.members[self._member]

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self, read_timeout: float | None) -> http.client.HTTPConnection:
        if self._ssl_context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self._ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        conn.connect()
        conn.sock.settimeout(read_timeout)
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def post(self, path: str, body: dict) -> dict:
        """POST ``body`` as JSON to ``path``; the decoded JSON answer. EtcdUnreachable when no member could be
        reached, or the cluster kept answering "in transition" for ``failover_timeout`` seconds."""
        payload = json.dumps(body)
        with self._lock:
            deadline = time.monotonic() + self.failover_timeout
            unreachable_in_a_row = 0
            pause = 0.05
            while True:
                try:
                    return self._post_to_current(path, payload)
                except _Retriable as e:
                    unreachable_in_a_row = 0
                    if time.monotonic() + pause > deadline:
                        raise EtcdUnreachable(f"{e} (still after {self.failover_timeout:g} s of retries)") from None
                    logger.info("%s; retrying", e)
                    self._next_member()
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                except EtcdUnreachable:
                    unreachable_in_a_row += 1
                    if unreachable_in_a_row >= len(self.members):
                        raise
                    self._next_member()

    def _post_to_current(self, path: str, payload: str) -> dict:
        for attempt in (0, 1):
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = self._connect(self.read_timeout)
                self._conn.request("POST", path, payload, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._close()
                if reused and attempt == 0:
                    continue  # the server closed an idle kept-alive connection: one fresh try
                raise EtcdUnreachable(f"etcd at {self.endpoint}: {one_line(e)}") from None
            except (OSError, http.client.HTTPException) as e:
                self._close()
                raise EtcdUnreachable(f"etcd at {self.endpoint}: {one_line(e)}") from None
            return self._decode(path, response.status, data)
        raise AssertionError("unreachable")

    def _decode(self, path: str, status: int, data: bytes) -> dict:
        try:
            answer = json.loads(data) if data.strip() else {}
        except ValueError:
            answer = None
        if status != 200 or not isinstance(answer, dict):
            text = data.decode(errors="replace").strip().splitlines()
            detail = (answer or {}).get("error") if isinstance(answer, dict) else (text[0] if text else "")
            message = f"etcd at {self.endpoint} answered {path} with HTTP {status}: {detail or 'no body'}"
            if status in (429, 500, 503, 504) and any(t in str(detail).lower() for t in _RETRIABLE_ANSWERS):
                raise _Retriable(message)
            raise EtcdUnreachable(message + (" (not an etcd v3 endpoint?)" if status == 404 else ""))
        return answer

    # ------------------------------------------------------------------ v3 calls

    def range(self, key: bytes, keys_only: bool = False) -> tuple[dict | None, int]:
        """The key-value of ``key`` (or None; without its value if ``keys_only``) and the revision of the read."""
        body: dict[str, Any] = {"key": _b64(key)}
        if keys_only:
            body["keys_only"] = True
        answer = self.post("/v3/kv/range", body)
        kvs = answer.get("kvs") or []
        return (kvs[0] if kvs else None), int(answer.get("header", {}).get("revision", 0))

    def range_prefix(self, prefix: bytes) -> list[dict]:
        """Every key-value whose key starts with ``prefix``."""
        answer = self.post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        return list(answer.get("kvs") or [])

    def revoke(self, lease: int) -> None:
        """End ``lease`` now: the keys attached to it are deleted."""
        self.post("/v3/lease/revoke", {"ID": str(int(lease))})

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.post("/v3/kv/put", body).get("header", {}).get("revision", 0))

    def compare_and_put(self, key: bytes, value: bytes, mod_revision: int | None, lease: int | None = None
                        ) -> tuple[bool, int, dict | None]:
        """Put ``value`` iff the key's mod_revision is ``mod_revision`` (None: iff the key does not exist).

        Returns ``(succeeded, revision, current_kv)``: on success the new revision (the key's new mod_revision) and
        None; on failure the revision of the read and the key's current key-value (None if absent).
        """
        if mod_revision is None:
            compare = {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(int(mod_revision))}
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        answer = self.txn([compare], [{"request_put": put}], [{"request_range": {"key": _b64(key)}}])
        revision = int(answer.get("header", {}).get("revision", 0))
        if answer.get("succeeded"):
            return True, revision, None
        responses = answer.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        return False, revision, (kvs[0] if kvs else None)

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] | None = None) -> dict:
        """One transaction; the decoded answer (``succeeded``, ``responses``)."""
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        return self.post("/v3/kv/txn", body)

    def put_prev(self, key: bytes, value: bytes, lease: int | None = None) -> dict | None:
        """Put and return the key-value it replaced (None when the key was new), in one request."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value), "prev_kv": True}
        if lease:
            body["lease"] = str(lease)
        return self.post("/v3/kv/put", body).get("prev_kv")

    def grant(self, ttl: int) -> int:
        answer = self.post("/v3/lease/grant", {"TTL": str(int(ttl))})
        if answer.get("error") or not answer.get("ID"):
            raise EtcdUnreachable(f"etcd at {self.endpoint} refused a lease: {answer.get('error', answer)}")
        return int(answer["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its new TTL (0 when it already expired)."""
        answer = self.post("/v3/lease/keepalive", {"ID": str(int(lease))})
        return int((answer.get("result") or {}).get("TTL", 0) or 0)

    def watch_once(self, prefix: bytes, start_revision: int | None, timeout: float, exact: bool = False) -> bool:
        """Block until a key under ``prefix`` (just that key when ``exact``) changes at or after ``start_revision``
        (None: from now on) — True — or ``timeout`` passes — False.

        Uses its own connection: the gateway streams watch events on it until the client hangs up.
        """
        request: dict[str, Any] = {"key": _b64(prefix)}
        if not exact:
            request["range_end"] = _b64(_prefix_end(prefix))
        if start_revision:
            request["start_revision"] = str(int(start_revision))
        body = json.dumps({"create_request": request})
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            conn = self._connect(max(0.01, timeout))
        except OSError as e:
            raise EtcdUnreachable(f"etcd at {self.endpoint}: {one_line(e)}") from None
        try:
            conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise EtcdUnreachable(f"etcd at {self.endpoint} answered /v3/watch with HTTP {response.status}")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                conn.sock.settimeout(remaining)
                line = response.readline()
                if not line:
                    raise EtcdUnreachable(f"etcd at {self.endpoint} closed the watch stream")
                try:
                    result = json.loads(line).get("result") or {}
                except ValueError:
                    continue
                if result.get("events") or result.get("compact_revision"):
                    return True  # something changed (or history was compacted): the caller re-reads
        except TimeoutError:
            return False
        except (OSError, http.client.HTTPException) as e:
            raise EtcdUnreachable(f"etcd at {self.endpoint}: {one_line(e)}") from None
        finally:
            conn.close()


class _Lease:
    """This process's lease for the keys it writes: granted lazily, renewed once a third of ``ttl`` has passed."""

    def __init__(self, client: EtcdV3Client, ttl: int) -> None:
        self._client = client
        self._ttl = int(ttl)
        self._id: int | None = None
        self._renewed_at = 0.0
        self._lock = threading.Lock()

    def current(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._id is not None and now - self._renewed_at < self._ttl / 3:
                return self._id
            if self._id is not None and self._client.keepalive(self._id) > 0:
                self._renewed_at = now
                return self._id
            self._id = self._client.grant(self._ttl)
            self._renewed_at = now
            return self._id


class EtcdV3RendezvousBackend(RendezvousBackend, KeyedStorage, NodeLiveness, ChangeNotification):
    """Rendezvous state of run ``run_id`` in etcd through the v3 JSON gateway (see the module docstring).

    ``client``: an :class:`EtcdV3Client`; ``key_prefix``: prefix of the state key (default
    ``/torch/elastic/rendezvous``); ``ttl``: seconds the state outlives its last live writer (default 7200).
    """

    _DEFAULT_TTL = 7200

    def __init__(self, client: EtcdV3Client, run_id: str, key_prefix: str | None = KEY_PREFIX,
                 ttl: int | None = None) -> None:
        check_run_id(run_id)
        self._client = client
        prefix = (key_prefix or "").rstrip("/")
        self._key = f"{prefix}/{run_id}".encode()
        self._ttl = int(ttl) if ttl and ttl > 0 else self._DEFAULT_TTL
        self._lease = _Lease(client, self._ttl)
        self._node_leases: dict[str, int] = {}
        # Off by default: measured on the loaded 2-core machine, waking on watches did not beat polling (4 nodes
        # arriving together: 730 vs 418 ms; a late 4th node: 709 vs 684 ms) and costs a request per change.
        self.watch_state = False
        # Leases as heartbeats (see the module docstring); False: heartbeats in the state blob like other backends.
        self.lease_liveness = True
        # Keyed arrivals (see "keyed storage" below); False: every arrival rewrites the state blob, as upstream's
        # etcd backends do. Every node of a run must use the same setting.
        self.keyed_arrivals = True

    @property
    def name(self) -> str:
        return "etcd-v3"

    @property
    def key(self) -> str:
        return self._key.decode()

    @contextlib.contextmanager
    def _reaching(self):
        """Turn a transport failure into the seam's RendezvousConnectionError, naming the rendezvous key."""
        try:
            yield
        except EtcdUnreachable as e:
            raise RendezvousConnectionError(f"{e} (rendezvous key {self.key})") from None

    # -------------------------------------------------------------- change notification (optional in the seam)

    def state_version(self) -> int | None:
        """None (the state machine then polls) unless ``watch_state`` is set; otherwise the state key's
        mod_revision (0 when absent), read without its value (``keys_only``)."""
        if not self.watch_state:
            return None
        with self._reaching():
            kv, _ = self._client.range(self._key, keys_only=True)
        return 0 if kv is None else int(kv.get("mod_revision", 0))

    def wait_for_change(self, version: int, timeout: float) -> bool | None:
        """Watch the state key from just after ``version``: True on a change, False after ``timeout`` seconds."""
        with self._reaching():
            return self._client.watch_once(self._key, int(version) + 1 if version else None, timeout, exact=True)

    # -------------------------------------------------------------- lease-based liveness (optional in the seam)
    #
    # One liveness key per node bound to that node's own lease: etcd itself deletes the key ``ttl`` seconds after
    # the node's last renewal, with no write to the shared state blob per heartbeat. The state machine uses these
    # instead of heartbeat timestamps in the state when ``supports_liveness()`` is True.

    def supports_liveness(self) -> bool:
        return self.lease_liveness

    @property
    def _alive_prefix(self) -> bytes:
        return self._key + b"/alive/"

    def heartbeat(self, node_key: str, ttl: float) -> None:
        """Renew ``node_key``'s lease (granting it, and writing its liveness key, the first time or after expiry)."""
        with self._reaching():
            lease = self._node_leases.get(node_key)
            if lease is not None and self._client.keepalive(lease) > 0:
                return
            lease = self._client.grant(max(1, math.ceil(ttl)))
            self._client.put(self._alive_prefix + node_key.encode(), b"", lease)
            self._node_leases[node_key] = lease

    def live_nodes(self) -> set[str]:
        """Nodes whose liveness lease has not expired."""
        with self._reaching():
            kvs = self._client.range_prefix(self._alive_prefix)
        return {_unb64(kv["key"])[len(self._alive_prefix):].decode() for kv in kvs}

    def forget(self, node_key: str) -> None:
        """Revoke ``node_key``'s lease now (a node leaving): its liveness key disappears at once."""
        lease = self._node_leases.pop(node_key, None)
        if lease is None:
            return
        with self._reaching():
            self._client.revoke(lease)

    # -------------------------------------------------------------- keyed storage (optional in the seam)
    #
    # Keys live under ``<state key>/keys/`` and are bound to this process's lease like the state, so an abandoned
    # run's keys expire with it. etcd has no atomic add, and a compare-and-put loop would make N nodes arriving
    # together retry O(N^2) times; instead a counter is the key's ``version`` (how many times it was written since
    # it was created): ``key_add(k, 1)`` is one put that returns the previous version, so every arrival gets its
    # own slot in one request. A counter is therefore read with ``key_add(k, 0)``, not ``key_get_many``. Batches
    # stay within etcd's default limit of 128 operations per transaction.

    _TXN_OPS = 128

    def supports_keys(self) -> bool:
        return self.keyed_arrivals

    def _full(self, key: str) -> bytes:
        return self._key + b"/keys/" + key.encode()

    def key_add(self, key: str, amount: int) -> int:
        amount = int(amount)
        if amount < 0:
            raise ValueError(f"etcd-v3 keyed counters only grow: key_add({key!r}, {amount}) is not allowed")
        full = self._full(key)
        with self._reaching():
            if amount == 0:
                kv, _ = self._client.range(full, keys_only=True)
                return 0 if kv is None else int(kv.get("version", 0))
            count = 0
            for _ in range(amount):
                prev = self._client.put_prev(full, b"", self._lease.current())
                count = (int(prev.get("version", 0)) if prev else 0) + 1
            return count

    def key_set(self, key: str, value: bytes) -> None:
        with self._reaching():
            self._client.put(self._full(key), bytes(value), self._lease.current())

    def key_get_many(self, keys: list[str]) -> list[bytes | None]:
        values: list[bytes | None] = []
        with self._reaching():
            for start in range(0, len(keys), self._TXN_OPS):
                batch = keys[start:start + self._TXN_OPS]
                answer = self._client.txn([], [{"request_range": {"key": _b64(self._full(k))}} for k in batch])
                for response in answer.get("responses") or []:
                    kvs = (response.get("response_range") or {}).get("kvs") or []
                    values.append(_unb64(kvs[0].get("value")) if kvs else None)
        if len(values) != len(keys):
            raise RendezvousStateError(f"etcd answered {len(values)} reads for {len(keys)} keys under {self.key}")
        return values

    def key_compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bytes:
        full = _b64(self._full(key))
        if expected is None:
            compare = {"key": full, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": full, "target": "VALUE", "result": "EQUAL", "value": _b64(bytes(expected))}
        with self._reaching():
            answer = self._client.txn(
                [compare],
                [{"request_put": {"key": full, "value": _b64(bytes(desired)), "lease": str(self._lease.current())}}],
                [{"request_range": {"key": full}}],
            )
        if answer.get("succeeded"):
            return bytes(desired)
        kvs = ((answer.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
        return _unb64(kvs[0].get("value")) if kvs else b""

    def key_delete_many(self, keys: list[str]) -> None:
        with self._reaching():
            for start in range(0, len(keys), self._TXN_OPS):
                batch = dict.fromkeys(keys[start:start + self._TXN_OPS])  # etcd refuses a key twice in one txn
                self._client.txn([], [{"request_delete_range": {"key": _b64(self._full(k))}} for k in batch])

    def _decode(self, kv: dict) -> tuple[bytes, Any]:
        try:
            return _unb64(kv.get("value")), int(kv["mod_revision"])
        except (binascii.Error, KeyError, ValueError) as e:
            raise RendezvousStateError(f"rendezvous state in etcd key {self.key} is unreadable: {one_line(e)}") from None

    def get_state(self) -> tuple[bytes, Any] | None:
        with self._reaching():
            kv, _ = self._client.range(self._key)
        return None if kv is None else self._decode(kv)

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        state = bytes(state)
        expected: int | None = None
        if token is not None:
            try:
                expected = int(token)
            except (TypeError, ValueError):
                current = self.get_state()  # not one of our tokens: it cannot match
                return None if current is None else (*current, False)
        with self._reaching():
            ok, revision, kv = self._client.compare_and_put(self._key, state, expected, self._lease.current())
        if ok:
            return state, revision, True
        return None if kv is None else (*self._decode(kv), False)


class EtcdV3Store(Store):
    """A c10d ``Store`` in etcd via the v3 JSON gateway: key ``k`` lives at ``<prefix>/<k>`` (raw bytes)."""

    def __init__(self, client: EtcdV3Client, prefix: str = STORE_PREFIX, timeout: datetime.timedelta | None = None):
        super().__init__()
        self.client = client
        self.prefix = prefix.rstrip("/").encode() + b"/"
        if timeout is not None:
            self.set_timeout(timeout)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except EtcdUnreachable as e:
            raise DistNetworkError(f"EtcdV3Store: {e}") from None

    def _key(self, key) -> bytes:
        return self.prefix + as_bytes(key, "key", "EtcdV3Store")

    def set(self, key, value) -> None:
        self._call(self.client.put, self._key(key), as_bytes(value, "value", "EtcdV3Store"))

    def get(self, key) -> bytes:
        found = self._when_present([self._key(key)], self.timeout)
        if found is None:
            raise LookupError(f"EtcdV3Store: key {key!r} not set within {self.timeout.total_seconds()} s")
        return found[0]

    def add(self, key, num: int) -> int:
        full = self._key(key)
        num = int(num)
        while True:
            kv, _ = self._call(self.client.range, full)
            current = 0 if kv is None else int(_unb64(kv.get("value")) or b"0")
            expected = None if kv is None else int(kv["mod_revision"])
            ok, _, _ = self._call(self.client.compare_and_put, full, str(current + num).encode(), expected, None)
            if ok:
                return current + num
            time.sleep(random.uniform(0, 0.02))

    def check(self, keys) -> bool:
        values, _ = self._read([self._key(k) for k in keys])
        return all(v is not None for v in values)

    def wait(self, keys, override_timeout: datetime.timedelta | None = None) -> None:
        timeout = self.timeout if override_timeout is None else override_timeout
        if self._when_present([self._key(k) for k in keys], timeout) is None:
            raise LookupError(f"EtcdV3Store: keys {list(keys)!r} not all set within {timeout.total_seconds()} s")

    def _read(self, full_keys: list[bytes]) -> tuple[list[bytes | None], int]:
        values: list[bytes | None] = []
        first_revision: int | None = None
        for full in full_keys:
            kv, revision = self._call(self.client.range, full)
            first_revision = revision if first_revision is None else min(first_revision, revision)
            values.append(None if kv is None else _unb64(kv.get("value")))
        return values, first_revision or 0

    def _when_present(self, full_keys: list[bytes], timeout: datetime.timedelta) -> list[bytes] | None:
        deadline = time.monotonic() + max(0.0, timeout.total_seconds())
        while True:
            values, revision = self._read(full_keys)
            if all(v is not None for v in values):
                return values  # type: ignore[return-value]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Watch from just after the earliest read: a write between our reads is still seen.
            self._call(self.client.watch_once, self.prefix, revision + 1, remaining)


def create_backend(params: RendezvousParameters) -> tuple[EtcdV3RendezvousBackend, EtcdV3Store]:
    """Create the backend and its store from ``params``.

    Options: ``protocol`` (``http`` default, ``https``), ``read_timeout`` (default 60 s), ``connect_timeout``
    (default 5 s: bounds how long an unreachable endpoint takes to report), ``ssl_cert``, ``ssl_cert_key``,
    ``ca_cert`` (https), ``ttl`` (seconds the state outlives its last writer, default 7200), ``watch_state``
    (default false: waiting nodes wake on a watch of the state key instead of polling), ``lease_liveness``
    (default true: keep-alives renew per-node leases instead of rewriting the state), ``keyed_arrivals`` (default
    true: arriving nodes write O(1)-sized keys instead of the whole state; the same on every node). Reaches etcd once,
    so a wrong endpoint fails here with a RendezvousConnectionError naming host:port.
    """
    options = connection_options(params)
    ttl = params.get_as_int("ttl", None)
    if ttl is not None and ttl <= 0:
        raise ValueError(f"rendezvous option ttl={params.get('ttl')!r} must be a positive number of seconds")
    try:
        client = EtcdV3Client.from_options(options)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"rendezvous etcd TLS options are unusable: {one_line(e)}") from None
    backend = EtcdV3RendezvousBackend(client, params.run_id, key_prefix=KEY_PREFIX, ttl=ttl)
    backend.watch_state = bool(params.get_as_bool("watch_state", False))
    backend.lease_liveness = bool(params.get_as_bool("lease_liveness", True))
    backend.keyed_arrivals = bool(params.get_as_bool("keyed_arrivals", True))
    try:
        client.range(backend.key.encode())
    except EtcdUnreachable as e:
        raise RendezvousConnectionError(f"cannot reach etcd (v3 API) at {options.endpoint}: {str(e).split(': ', 1)[-1]}") from None
    return backend, EtcdV3Store(client, STORE_PREFIX)


def _create_etcd_v3_handler(params: RendezvousParameters) -> RendezvousHandler:
    from .dynamic_rendezvous import create_handler

    backend, store = create_backend(params)
    return create_handler(store, backend, params)


rendezvous_handler_registry.register("etcd-v3", _create_etcd_v3_handler)
