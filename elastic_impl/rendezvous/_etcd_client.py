"""What the etcd modules share: parsing connection options, a v2 client with a bounded connect time, error text.

Why a python-etcd subclass: python-etcd applies one number as both the connect and the read timeout and lets
urllib3 retry a failed connection three times, so an unreachable endpoint could take ``4 x read_timeout`` (4 min
with the 60 s default) to report. Here connecting is bounded by ``connect_timeout`` (default 5 s) and never
retried, while reads keep ``read_timeout``; an unreachable endpoint fails within seconds, naming host:port.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import etcd
import urllib3

from .api import RendezvousConnectionError, RendezvousParameters
from .options import option_seconds
from .utils import parse_rendezvous_endpoint

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "BoundedEtcdClient",
    "EtcdConnectionOptions",
    "connection_options",
    "is_retriable_answer",
    "is_unreachable",
    "one_line",
]

DEFAULT_PORT = 2379
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# How long a request answered "the cluster is in transition" (see RETRIABLE_ANSWERS) is retried before it fails.
DEFAULT_FAILOVER_TIMEOUT = 10.0

# Answers of a healthy cluster in transition (a leader election, a slow quorum): the same request succeeds a moment
# later, on this member or another.
RETRIABLE_ANSWERS = ("leader changed", "no leader", "request timed out", "timed out", "not capable",
                     "too many requests", "unhealthy cluster", "election")

logger = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """A short one-line reason for ``exc``: the root network cause when there is one (e.g. "connection refused")."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(exc, "cause", None) or getattr(exc, "reason", None)
        if isinstance(inner, BaseException) and inner is not exc:
            exc = inner
            continue
        break
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test it first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        text = str(exc)
        marker = "Failed to establish a new connection: "
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    if isinstance(exc, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError, TimeoutError,
                        socket.timeout)):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection lost (etcd closed it mid-request)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means etcd could not be talked to (as opposed to a protocol answer like "key not found")."""
    if isinstance(exc, etcd.EtcdWatchTimedOut):
        return False
    return isinstance(
        exc,
        (etcd.EtcdConnectionFailed, urllib3.exceptions.HTTPError, socket.error, TimeoutError, ConnectionError),
    ) or (type(exc) is etcd.EtcdException)


def is_retriable_answer(exc: BaseException) -> bool:
    """Whether ``exc`` is etcd's (v2) answer that the cluster is in transition: "Raft Internal Error: etcdserver:
    request timed out" (a write forwarded to a leader that died), leader changed, no leader, election in progress."""
    if isinstance(exc, etcd.EtcdLeaderElectionInProgress):
        return True
    payload = getattr(exc, "payload", None)
    if type(exc) is not etcd.EtcdException or not isinstance(payload, dict):
        return False  # a protocol answer (key not found, compare failed, ...) or no answer at all
    if payload.get("errorCode") not in (300, 301) and payload.get("status") not in (429, 500, 503, 504):
        return False
    return any(answer in str(exc).lower() for answer in RETRIABLE_ANSWERS)


class BoundedEtcdClient(etcd.Client):
    """A python-etcd v2 client whose connects are bounded by ``connect_timeout`` and never retried.

    An answer that the cluster is in transition (:func:`is_retriable_answer`) is retried, with a short backoff, for
    up to ``failover_timeout`` seconds, as the etcd-v3 client does; python-etcd alone raised it at once (a write
    reaching a follower while the leader was being replaced failed after etcd's own 7 s request timeout). Like any
    retried write, one whose first answer was lost may land twice: a compare-and-swap then reports a lost compare.
    """

    def __init__(self, host: str, port: int, *, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT, **kwargs: Any) -> None:
        self._connect_timeout = float(connect_timeout)
        self.failover_timeout = float(failover_timeout)
        kwargs.setdefault("allow_reconnect", False)
        super().__init__(host=host, port=port, read_timeout=read_timeout, **kwargs)
        # urllib3 would otherwise retry a refused/timed-out connection 3 times before python-etcd sees it. other=0:
        # with total=None an error of no other class (an SSLError, e.g. an unreadable ca_cert) was retried without
        # limit, recursing in urllib3 until RecursionError.
        self.http.connection_pool_kw["retries"] = urllib3.Retry(
            total=None, connect=0, read=0, other=0, status=0, redirect=5)

    @property
    def read_timeout(self):  # type: ignore[override]
        return self.timeout_for(self._read_timeout)

    def api_execute(self, path, method, params=None, timeout=None):  # type: ignore[override]
        return self._retrying(super().api_execute, path, method, params, timeout)

    def api_execute_json(self, path, method, params=None, timeout=None):  # type: ignore[override]
        return self._retrying(super().api_execute_json, path, method, params, timeout)

    def _retrying(self, call, path, method, params, timeout):
        deadline = time.monotonic() + self.failover_timeout
        pause = 0.05
        while True:
            try:
                return call(path, method, params=params, timeout=timeout)
            except etcd.EtcdException as e:
                if not is_retriable_answer(e):
                    raise
                if time.monotonic() + pause > deadline:
                    raise type(e)(f"{e} (still after {self.failover_timeout:g} s of retries)", e.payload) from None
                logger.info("etcd at %s answered %s; retrying", self.endpoint, one_line(e))
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def timeout_for(self, read_seconds: float | None) -> urllib3.Timeout:
        """A urllib3 timeout reading for ``read_seconds`` (None: forever, e.g. a long watch) with a bounded connect."""
        connect = self._connect_timeout if read_seconds is None else min(self._connect_timeout, max(read_seconds, 0.001))
        return urllib3.Timeout(connect=connect, read=read_seconds)


def client_endpoint(client) -> str:
    """``host:port`` of any python-etcd client (for messages)."""
    try:
        return f"{client.host}:{client.port}"
    except Exception:  # noqa: BLE001
        return repr(client)


class EtcdConnectionOptions:
    """Validated connection options of an etcd endpoint (see :func:`connection_options`)."""

    def __init__(self, host: str, port: int, protocol: str, read_timeout: float, connect_timeout: float,
                 cert: Any, ca_cert: str | None, members: list[tuple[str, int]] | None = None) -> None:
        self.host = host
        self.port = port
        # Every member of the etcd cluster named in the endpoint (``h1:p1,h2:p2,...``); the first is host:port.
        self.members = members or [(host, port)]
        self.protocol = protocol
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.cert = cert
        self.ca_cert = ca_cert

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}"

    def v2_client(self) -> BoundedEtcdClient:
        # Several members: python-etcd's own failover (it moves to the next machine when one cannot be reached).
        cluster = len(self.members) > 1
        try:
            return BoundedEtcdClient(
                tuple(self.members) if cluster else self.host, self.port, read_timeout=self.read_timeout,
                connect_timeout=self.connect_timeout, protocol=self.protocol, cert=self.cert, ca_cert=self.ca_cert,
                allow_reconnect=cluster,
            )
        except etcd.EtcdException as e:
            raise RendezvousConnectionError(f"cannot reach etcd at {self.endpoint}: {one_line(e)}") from None


def connection_options(params: RendezvousParameters, *, cert_keys: tuple[str, str, str] = ("ssl_cert", "ssl_cert_key", "ca_cert")
                       ) -> EtcdConnectionOptions:
    """Parse endpoint, ``protocol`` (http/https), ``read_timeout``, ``connect_timeout`` and TLS files from params.

    ``cert_keys`` names the (client cert, client key, CA cert) options: the dynamic backends use upstream's
    ``ssl_cert``/``ssl_cert_key``/``ca_cert``, the legacy handler ``cert``/``key``/``cacert``.
    """
    members = []
    for part in str(params.endpoint or "").split(",") or [""]:
        if not part.strip() and members:
            raise ValueError(f"rendezvous endpoint {params.endpoint!r} has an empty member (expected h1:p1,h2:p2,...)")
        member_host, member_port = parse_rendezvous_endpoint(part, DEFAULT_PORT)
        if "/" in member_host or " " in member_host:
            raise ValueError(f"rendezvous endpoint {params.endpoint!r} is not host[:port][,host[:port]...] "
                             "(no scheme or path)")
        members.append((member_host, member_port))
    host, port = members[0]
    raw_protocol = params.get("protocol", "http")
    protocol = str(raw_protocol if raw_protocol is not None else "http").strip().lower()
    if protocol not in ("http", "https"):
        raise ValueError(f"rendezvous option protocol={raw_protocol!r} is invalid; allowed: http, https")
    read_timeout = option_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT)
    connect_timeout = option_seconds(params, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    cert_key, key_key, ca_key = cert_keys
    cert = params.get(cert_key)
    key = params.get(key_key)
    ca_cert = params.get(ca_key)
    if protocol == "http" and (cert or ca_cert):
        raise ValueError(f"rendezvous options {cert_key}/{ca_key} need protocol=https, got protocol={raw_protocol!r}")
    if cert and key:
        cert = (cert, key)
    return EtcdConnectionOptions(host, port, protocol, read_timeout, connect_timeout, cert or None, ca_cert or None,
                                 members)


class _DropReportedFailures(logging.Filter):
    """python-etcd logs every failed request at ERROR with the full urllib3 repr; we raise a one-line error for
    the same failure, so that log line is only noise (kept at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(("Request to server", "Failed to get list of machines")):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("etcd.client").addFilter(_DropReportedFailures())


def as_bytes(value, what: str, owner: str) -> bytes:
    """A store key or value as bytes; anything but str/bytes is a one-line ValueError naming ``owner``."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"{owner} {what} must be str or bytes, got {type(value).__name__}")
