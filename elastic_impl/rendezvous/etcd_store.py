"""A ``torch.distributed.Store`` kept in etcd (v2 API), for the etcd rendezvous backends.

Layout: every key lives directly under ``etcd_store_prefix`` (one etcd directory), named by the URL-safe base64 of
the key bytes; values are standard base64 (etcd v2 values are text). URL-safe because a ``/`` in an etcd v2 key
makes a sub-directory: with standard base64 some keys (e.g. ``b"\\xff\\xff\\xff"`` → ``////``) would vanish from
the directory listing and a ``get`` of them would wait forever.

Blocking reads (``get``, ``wait``) read the keys, then watch the prefix from the etcd index of that read, so a key
written in between is never missed and no time is spent polling. They raise ``LookupError`` after the store's
timeout (``set_timeout`` / the constructor's ``timeout``; c10d's default of 300 s otherwise). Failing to reach
etcd raises :class:`EtcdStoreUnreachableError` naming host:port: a ``torch.distributed.DistNetworkError`` (what
c10d stores raise) that is also python-etcd's ``etcd.EtcdConnectionFailed`` (what upstream's EtcdStore lets
through), so code catching either keeps working.
"""

from __future__ import annotations

import datetime
import operator
import random
import time
from base64 import b64decode, b64encode, urlsafe_b64encode

import etcd
from torch.distributed import DistNetworkError, Store

from ._etcd_client import as_bytes, client_endpoint, is_unreachable, one_line

__all__ = ["EtcdStore", "EtcdStoreUnreachableError"]


class EtcdStoreUnreachableError(DistNetworkError, etcd.EtcdConnectionFailed):
    """etcd could not be reached: both c10d's DistNetworkError and python-etcd's EtcdConnectionFailed."""


def cas_delay() -> None:
    """Sleep a random 0-100 ms: spreads out writers that retry a lost compare-and-swap, so fewer collide again."""
    time.sleep(random.uniform(0, 0.1))


class EtcdStore(Store):
    """A c10d ``Store`` over an etcd v2 client (python-etcd ``etcd.Client``), under ``etcd_store_prefix``."""

    def __init__(self, etcd_client, etcd_store_prefix: str, timeout: datetime.timedelta | None = None):
        super().__init__()  # the pybind11 trampoline needs it
        if not isinstance(etcd_store_prefix, str):
            raise ValueError(f"EtcdStore etcd_store_prefix must be a str (an etcd directory), got {etcd_store_prefix!r}")
        self.client = etcd_client
        # As given, with a trailing '/' (upstream's attribute); keys are absolute either way (python-etcd adds '/').
        self.prefix = etcd_store_prefix if etcd_store_prefix.endswith("/") else etcd_store_prefix + "/"
        if timeout is not None:
            self.set_timeout(timeout)

    # ------------------------------------------------------------------ encoding

    def _etcd_key(self, key) -> str:
        return self.prefix + urlsafe_b64encode(as_bytes(key, "key", "EtcdStore")).decode()

    @staticmethod
    def _encode_value(value) -> str:
        return b64encode(as_bytes(value, "value", "EtcdStore")).decode()

    @staticmethod
    def _decode_value(text: str | None) -> bytes:
        return b64decode((text or "").encode())

    def _call(self, fn, *args, **kwargs):
        """Run one client call; unreachable etcd becomes DistNetworkError naming where etcd is."""
        try:
            return fn(*args, **kwargs)
        except etcd.EtcdException as e:
            if is_unreachable(e):
                raise self._unreachable(e) from None
            raise
        except OSError as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: BaseException) -> EtcdStoreUnreachableError:
        return EtcdStoreUnreachableError(f"EtcdStore: etcd at {client_endpoint(self.client)} is unreachable: {one_line(e)}")

    # ------------------------------------------------------------------ Store API

    def set(self, key, value) -> None:
        """Write ``value`` (str or bytes) under ``key`` (str or bytes), overwriting."""
        self._call(self.client.write, self._etcd_key(key), self._encode_value(value))

    def get(self, key) -> bytes:
        """The value of ``key``, waiting up to the store timeout for it to appear (LookupError after)."""
        found = self._read_when_present([self._etcd_key(key)], self.timeout)
        if found is None:
            raise LookupError(f"EtcdStore: key {key!r} not set within {self.timeout.total_seconds()} s")
        return next(iter(found.values()))

    def add(self, key, num: int) -> int:
        """Atomically add ``num`` to the decimal integer stored under ``key`` (0 if absent); return the new value."""
        try:
            num = operator.index(num)  # an int (or int-like): 1.5 or "3" is a mistake, not a number to round
        except TypeError:
            raise ValueError(f"EtcdStore: add() needs an integer amount, got {num!r}") from None
        etcd_key = self._etcd_key(key)
        try:
            node = self._call(self.client.write, etcd_key, self._encode_value(str(num)), prevExist=False)
            return int(self._decode_value(node.value))
        except etcd.EtcdAlreadyExist:
            pass
        while True:
            node = self._call(self.client.read, etcd_key)
            try:
                current = int(self._decode_value(node.value))
            except ValueError:
                raise ValueError(f"EtcdStore: add() on key {key!r} whose value is not an integer") from None
            try:
                node = self._call(self.client.write, etcd_key, self._encode_value(str(current + num)),
                                  prevIndex=node.modifiedIndex)
                return current + num
            except etcd.EtcdCompareFailed:
                time.sleep(random.uniform(0, 0.02))  # another writer won; spread the retries

    def check(self, keys) -> bool:
        """Whether every key in ``keys`` is present right now (never waits)."""
        present, _ = self._read_keys([self._etcd_key(k) for k in keys])
        return len(present) == len(set(self._etcd_key(k) for k in keys))

    def wait(self, keys, override_timeout: datetime.timedelta | None = None) -> None:
        """Block until every key in ``keys`` is set; LookupError after the timeout (the store's by default)."""
        timeout = self.timeout if override_timeout is None else override_timeout
        if self._read_when_present([self._etcd_key(k) for k in keys], timeout) is None:
            raise LookupError(f"EtcdStore: keys {list(keys)!r} not all set within {timeout.total_seconds()} s")

    # ------------------------------------------------------------------ blocking reads

    def _read_keys(self, etcd_keys: list[str]) -> tuple[dict[str, bytes], int]:
        """Values of the present keys, and the etcd index to watch after so no later write is missed.

        The index is the smallest one seen across the reads: a key written between two reads is then still ahead
        of the watch (a spurious wake-up at worst, never a missed write).
        """
        present: dict[str, bytes] = {}
        index: int | None = None
        for etcd_key in dict.fromkeys(etcd_keys):
            try:
                node = self._call(self.client.read, etcd_key)
            except etcd.EtcdKeyNotFound as e:
                seen = int((e.payload or {}).get("index", 0))
            else:
                present[etcd_key] = self._decode_value(node.value)
                seen = int(node.etcd_index or 0)
            index = seen if index is None else min(index, seen)
        return present, index or 0

    def _read_when_present(self, etcd_keys: list[str], timeout: datetime.timedelta) -> dict[str, bytes] | None:
        deadline = time.monotonic() + max(timeout.total_seconds(), 0.0)
        wanted = list(dict.fromkeys(etcd_keys))
        while True:
            present, index = self._read_keys(wanted)
            if len(present) == len(wanted):
                return present
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self._call(
                    self.client.watch, self.prefix, index=index + 1 if index else None, recursive=True,
                    timeout=self._watch_timeout(remaining),
                )
            except (etcd.EtcdWatchTimedOut, etcd.EtcdEventIndexCleared, etcd.EtcdKeyNotFound):
                pass

    def _watch_timeout(self, seconds: float):
        timeout_for = getattr(self.client, "timeout_for", None)
        return timeout_for(seconds) if timeout_for is not None else seconds
