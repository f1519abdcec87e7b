"""The legacy ``etcd`` rendezvous (etcd v2 API through python-etcd), protocol-compatible with upstream's.

Protocol. All keys live under ``<etcd_prefix>/run_<run_id>/`` (a directory whose TTL of two hours is renewed while
any handler of the run is alive). ``rdzv/active_version`` holds the state of the current rendezvous as JSON and every
transition is a compare-and-set on it:

``setup`` (short TTL, while one node allocates the next version number from ``rdzv/version_counter``) →
``joinable`` (nodes append themselves to ``participants``; their rank is their position) → ``frozen`` (when
``max_workers`` joined, or when the *last call* — ``last_call_timeout`` seconds after ``min_workers`` joined, run by
the node whose rank is ``min_workers - 1`` — ends; every participant then writes its keep-alive key
``rdzv/v_<version>/rank_<rank>`` and adds it to ``keep_alives``) → ``final`` (all confirmed; the result of the
round). ``closed`` ends the run for everyone.

A node that arrives while the state is ``final`` increments ``num_workers_waiting`` (what ``num_nodes_waiting()``
reports, so agents re-rendezvous) and watches; a participant whose keep-alive key expired (its node stopped
renewing it) makes that node delete ``active_version``, and a new version starts. Transitional states carry TTLs
(``setup`` 5 s, ``frozen`` 10 s, ``joinable`` once it has ``min_workers`` 10 s, renewed by the last-call node) so a
node dying mid-transition cannot wedge the run.

Keys, values and TTL defaults are upstream's, so handlers of this module and upstream's can share a run.

Differences from upstream: an unreachable etcd raises :class:`RendezvousConnectionError` naming host:port at once
(upstream retries every second until the rendezvous timeout, 10 minutes by default); ``set_closed()`` also works
before any rendezvous state exists; the keep-alive TTL is configurable (``keep_alive_ttl``, default 10 s); the
store keys are URL-safe base64 (see :mod:`.etcd_store`); ``last_call_timeout`` and ``timeout`` accept fractions;
a node re-entering the rendezvous deletes its own keep-alive key (upstream lets it expire, ~10 s);
``num_nodes_waiting()`` is at least 1 once the run moved past the version this node completed.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any

import etcd

from ._etcd_client import client_endpoint, connection_options, is_unreachable, one_line
from .api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)
from .etcd_store import EtcdStore, cas_delay  # noqa: F401 -- cas_delay: upstream exposes it here
from .options import option_seconds
from .utils import parse_rendezvous_endpoint  # noqa: F401 -- upstream exposes the parser here

__all__ = [
    "EtcdRendezvous",
    "EtcdRendezvousHandler",
    "EtcdRendezvousRetryImmediately",
    "EtcdRendezvousRetryableFailure",
    "create_rdzv_handler",
]

logger = logging.getLogger(__name__)

_DEFAULT_TIMEOUT = 600
_DEFAULT_LAST_CALL_TIMEOUT = 30
_DEFAULT_PREFIX = "/torchelastic/p2p"

# Seconds a state survives without its owner refreshing it (upstream's values: part of the protocol).
CONST_ETCD_SETUP_TTL = 5
CONST_ETCD_FROZEN_TTL = 10
CONST_ETCD_JOINABLE_EPHEMERAL_TTL = 10
CONST_WORKER_KEEPALIVE_TTL = 10
CONST_RUNID_SUBROOT_TTL = 7200


class EtcdRendezvousRetryableFailure(Exception):
    """The state moved on in a way that needs a new attempt after a short pause."""


class EtcdRendezvousRetryImmediately(Exception):
    """The state moved on; a new attempt can start right away."""


def _backoff() -> None:
    """Spread compare-and-set retries of nodes racing on the same key."""
    time.sleep(random.uniform(0, 0.05))


class EtcdRendezvous:
    """One node's view of the legacy etcd rendezvous of run ``run_id`` (see the module docstring)."""

    def __init__(self, client, prefix: str, run_id: str, num_min_workers: int, num_max_workers: int,
                 timeout: float, last_call_timeout: float, keep_alive_ttl: int = CONST_WORKER_KEEPALIVE_TTL):
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"rendezvous run_id must be a non-empty string, got {run_id!r}")
        if not 1 <= num_min_workers <= num_max_workers:
            raise ValueError(f"rendezvous needs 1 <= min_nodes <= max_nodes, got {num_min_workers} and {num_max_workers}")
        if not timeout > 0:
            raise ValueError(f"rendezvous option timeout={timeout!r} must be a positive number of seconds")
        if not last_call_timeout >= 0:  # 0 (as upstream): freeze as soon as min_workers joined
            raise ValueError(f"rendezvous option last_call_timeout={last_call_timeout!r} must be a number of seconds >= 0")
        if int(keep_alive_ttl) < 1:
            raise ValueError(f"rendezvous option keep_alive_ttl={keep_alive_ttl!r} must be a whole number of seconds >= 1")
        self.client = client
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        if not self._prefix.startswith("/"):
            self._prefix = "/" + self._prefix
        self._run_id = run_id
        self._num_min_workers = int(num_min_workers)
        self._num_max_workers = int(num_max_workers)
        self._timeout = float(timeout)
        self._last_call_timeout = float(last_call_timeout)
        self._keep_alive_ttl = int(keep_alive_ttl)
        self._rendezvous_deadline = time.monotonic() + self._timeout
        self._lease_run_id_stop: threading.Event | None = None
        self._lease_this_rank_stop: threading.Event | None = None
        self._this_rank_key: str | None = None

        if self._prefix != "/":
            self.create_path_if_not_exists(self._prefix)
        self.create_path_if_not_exists(self.get_path(""), ttl=CONST_RUNID_SUBROOT_TTL)
        self._lease_run_id_stop = self.setup_lease_renewal(self.get_path(""), ttl=CONST_RUNID_SUBROOT_TTL)
        self.create_path_if_not_exists(self.get_path("/rdzv"))
        try:
            self._etcd(self.client.write, self.get_path("/rdzv/version_counter"), "0", prevExist=False)
        except etcd.EtcdAlreadyExist:
            pass

    def __del__(self):
        self.stop_leases()

    @property
    def _endpoint(self) -> str:
        # the member the client talks to now: given several, python-etcd moves on from a dead first one
        return client_endpoint(self.client)

    def stop_leases(self) -> None:
        """Stop renewing this node's keys (the run directory and the rank keep-alive)."""
        for event in (getattr(self, "_lease_run_id_stop", None), getattr(self, "_lease_this_rank_stop", None)):
            if event is not None:
                event.set()

    # ------------------------------------------------------------------ talking to etcd

    def _etcd(self, fn, *args, **kwargs):
        """One python-etcd call; "cannot talk to etcd" becomes RendezvousConnectionError naming the endpoint."""
        try:
            return fn(*args, **kwargs)
        except etcd.EtcdWatchTimedOut:
            raise
        except etcd.EtcdException as e:
            if is_unreachable(e):
                raise self._unreachable(e) from None
            raise
        except OSError as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: BaseException) -> RendezvousConnectionError:
        return RendezvousConnectionError(f"etcd at {self._endpoint} is unreachable (rendezvous run {self._run_id!r}): {one_line(e)}")

    def _watch(self, key: str, index: int | None, timeout: float, recursive: bool = False) -> None:
        """Wait for a change of ``key`` at or after ``index``, at most ``timeout`` seconds (never unbounded)."""
        seconds = max(timeout, 0.05)  # python-etcd reads a 0 timeout as "wait forever"
        # A watch is one long read: cap it at the client's read timeout so a hung (paused) etcd is noticed by the
        # next read within about two read timeouts instead of at the rendezvous deadline.
        read_timeout = getattr(self.client, "_read_timeout", None)
        if isinstance(read_timeout, (int, float)) and read_timeout > 0:
            seconds = min(seconds, float(read_timeout))
        timeout_for = getattr(self.client, "timeout_for", None)
        try:
            self._etcd(self.client.watch, key, index=index, recursive=recursive,
                       timeout=timeout_for(seconds) if timeout_for else seconds)
        except (etcd.EtcdWatchTimedOut, etcd.EtcdEventIndexCleared):
            pass

    def _remaining(self) -> float:
        return self._rendezvous_deadline - time.monotonic()

    def _check_deadline(self) -> None:
        if self._remaining() < 0:
            raise RendezvousTimeoutError(
                f"rendezvous run {self._run_id!r} at etcd {self._endpoint}: no rendezvous completed within "
                f"{self._timeout} s (min_nodes={self._num_min_workers})"
            )

    def get_path(self, path: str) -> str:
        """Absolute etcd key of ``path`` inside this run's directory."""
        if not path.startswith("/"):
            path = "/" + path
        return f"{self._prefix}run_{self._run_id}{path}"

    def create_path_if_not_exists(self, full_path: str, ttl: int | None = None) -> None:
        try:
            self._etcd(self.client.write, full_path, None, dir=True, prevExist=False, ttl=ttl)
        except etcd.EtcdAlreadyExist:
            pass

    def get_rdzv_state(self) -> tuple[Any, dict]:
        """The ``active_version`` node and its decoded state (EtcdKeyNotFound when there is none)."""
        node = self._etcd(self.client.read, self.get_path("/rdzv/active_version"))
        try:
            return node, json.loads(node.value)
        except (TypeError, ValueError):
            raise RendezvousStateError(
                f"rendezvous state {self.get_path('/rdzv/active_version')} at etcd {self._endpoint} is not JSON"
            ) from None

    def _cas_state(self, node, state: dict, ttl: int | None = None):
        """Replace the state iff it is still ``node``; EtcdCompareFailed (or KeyNotFound, if it expired) otherwise."""
        return self._etcd(self.client.write, self.get_path("/rdzv/active_version"), json.dumps(state), ttl=ttl,
                          prevIndex=node.modifiedIndex)

    def try_wait_for_state_change(self, etcd_index: int, timeout: float | None = None) -> tuple[Any, dict]:
        """Wait (bounded by the rendezvous deadline) for ``active_version`` to change, then read it."""
        limit = max(self._remaining(), 0.0)
        self._watch(self.get_path("/rdzv/active_version"), etcd_index, limit if timeout is None else min(timeout, limit))
        self._check_deadline()
        return self.get_rdzv_state()

    # ------------------------------------------------------------------ the rendezvous

    def rendezvous_barrier(self) -> tuple[str, int, int]:
        """Take part in the next rendezvous; ``(version, rank, world_size)`` once it is final.

        Raises RendezvousTimeoutError (``timeout`` seconds), RendezvousClosedError (the run was closed),
        RendezvousConnectionError (etcd unreachable).
        """
        self._rendezvous_deadline = time.monotonic() + self._timeout
        while True:
            self._check_deadline()
            self._leave_previous_round()
            try:
                return self.init_phase()
            except EtcdRendezvousRetryImmediately:
                continue
            except EtcdRendezvousRetryableFailure:
                time.sleep(min(0.25, max(self._remaining(), 0.0)))
            except RendezvousError:
                raise
            except (etcd.EtcdKeyError, etcd.EtcdCompareFailed, etcd.EtcdEventIndexCleared) as e:
                # A state expired or was replaced between two of our steps: start over.
                logger.info("rendezvous %s: state changed under us (%s); retrying", self._run_id, one_line(e))
                time.sleep(min(0.25, max(self._remaining(), 0.0)))

    def _leave_previous_round(self) -> None:
        """Stop renewing our keep-alive of the last round and delete it, so a waiting node sees the round lapse
        now rather than after the keep-alive TTL (upstream lets it expire: a re-rendezvous then takes ~10 s)."""
        if self._lease_this_rank_stop is not None:
            self._lease_this_rank_stop.set()
            self._lease_this_rank_stop = None
        if self._this_rank_key is not None:
            key, self._this_rank_key = self._this_rank_key, None
            try:
                self._etcd(self.client.delete, key)
            except etcd.EtcdKeyNotFound:
                pass

    def init_phase(self) -> tuple[str, int, int]:
        """Create the state if there is none, then act on what it is."""
        try:
            node = self.try_create_rendezvous()
            state = json.loads(node.value)
        except etcd.EtcdAlreadyExist:
            node, state = self.get_rdzv_state()
        status = state.get("status")
        if status == "closed":
            raise RendezvousClosedError(f"rendezvous run {self._run_id!r} at etcd {self._endpoint} is closed")
        if status == "joinable":
            return self.join_phase(state["version"])
        if status == "final":
            self.handle_existing_rendezvous(state["version"])
            raise EtcdRendezvousRetryImmediately()
        # setup or frozen: someone else is mid-transition; wait for it to move.
        self.try_wait_for_state_change(node.etcd_index + 1)
        raise EtcdRendezvousRetryableFailure()

    def try_create_rendezvous(self):
        """Claim the empty state (``setup``), allocate the next version, publish it ``joinable``."""
        setup = self._etcd(self.client.write, self.get_path("/rdzv/active_version"), json.dumps({"status": "setup"}),
                           prevExist=False, ttl=CONST_ETCD_SETUP_TTL)
        counter_key = self.get_path("/rdzv/version_counter")
        try:
            counter = self._etcd(self.client.read, counter_key)
            version = str(int(counter.value) + 1)
            self._etcd(self.client.write, counter_key, version, prevIndex=counter.modifiedIndex)
        except (etcd.EtcdKeyNotFound, etcd.EtcdCompareFailed, ValueError) as e:
            # Only the holder of the setup state may bump the counter: anything else is corruption.
            raise RendezvousStateError(f"rendezvous run {self._run_id!r}: version counter {counter_key} is inconsistent ({one_line(e)})") from None
        self._etcd(self.client.write, self.get_path(f"/rdzv/v_{version}"), None, dir=True, prevExist=False)
        return self._cas_state(setup, {"status": "joinable", "version": version, "participants": []})

    def join_phase(self, expected_version: str) -> tuple[str, int, int]:
        node, this_rank = self.join_rendezvous(expected_version)
        state = json.loads(node.value)
        logger.info("rendezvous %s: joined version %s as rank %s", self._run_id, expected_version, this_rank)
        if this_rank == self._num_min_workers - 1 and state["status"] == "joinable":
            self.handle_join_last_call(expected_version, time.monotonic() + self._last_call_timeout)
        self.wait_for_peers(expected_version)
        return self.confirm_phase(expected_version, this_rank)

    def join_rendezvous(self, expected_version: str):
        """Append this node to the participants of ``expected_version``; ``(state node, rank)``."""
        while True:
            _backoff()
            node, state = self.get_rdzv_state()
            if state.get("status") != "joinable":
                raise EtcdRendezvousRetryableFailure()
            if state["version"] != expected_version:
                raise EtcdRendezvousRetryImmediately()
            if len(state["participants"]) >= self._num_max_workers:
                raise RendezvousStateError(f"rendezvous run {self._run_id!r}: joinable version {expected_version} is already full")
            this_rank = len(state["participants"])
            state["participants"].append(this_rank)
            ttl = None
            if len(state["participants"]) == self._num_max_workers:
                state["status"] = "frozen"
                state["keep_alives"] = []
                ttl = CONST_ETCD_FROZEN_TTL
            elif len(state["participants"]) >= self._num_min_workers:
                ttl = CONST_ETCD_JOINABLE_EPHEMERAL_TTL
            try:
                return self._cas_state(node, state, ttl), this_rank
            except etcd.EtcdCompareFailed:
                continue

    def handle_join_last_call(self, expected_version: str, deadline: float) -> None:
        """Keep the joinable state alive until ``deadline``, then freeze it (unless max_workers froze it first)."""
        node, state = self.get_rdzv_state()
        while True:
            if state.get("status") == "frozen" and state.get("version") == expected_version:
                return
            if state.get("status") != "joinable" or state.get("version") != expected_version:
                raise EtcdRendezvousRetryableFailure()
            now = time.monotonic()
            try:
                if now >= deadline:
                    state["status"] = "frozen"
                    state["keep_alives"] = []
                    self._cas_state(node, state, CONST_ETCD_FROZEN_TTL)
                    return
                node = self._cas_state(node, state, CONST_ETCD_JOINABLE_EPHEMERAL_TTL)  # renew the TTL
                node, state = self.try_wait_for_state_change(
                    node.etcd_index + 1, timeout=min(CONST_ETCD_JOINABLE_EPHEMERAL_TTL / 2, deadline - now))
            except etcd.EtcdCompareFailed:
                _backoff()
                node, state = self.get_rdzv_state()

    def wait_for_peers(self, expected_version: str):
        """Wait until ``expected_version`` is frozen."""
        node, state = self.get_rdzv_state()
        while True:
            if state.get("version") == expected_version and state.get("status") == "frozen":
                return node
            if state.get("version") == expected_version and state.get("status") == "joinable":
                node, state = self.try_wait_for_state_change(node.etcd_index + 1)
                continue
            raise EtcdRendezvousRetryableFailure()

    def confirm_phase(self, expected_version: str, this_rank: int) -> tuple[str, int, int]:
        self.confirm_membership(expected_version, this_rank)
        node = self.wait_for_final(expected_version)
        state = json.loads(node.value)
        logger.info("rendezvous %s: version %s final, rank %s of %s", self._run_id, expected_version, this_rank,
                    len(state["participants"]))
        return state["version"], this_rank, len(state["participants"])

    def confirm_membership(self, expected_version: str, this_rank: int):
        """Write this rank's keep-alive key and record it in the frozen state (the last one makes it final)."""
        lease_key = self.get_path(f"/rdzv/v_{expected_version}/rank_{this_rank}")
        while True:
            _backoff()
            node, state = self.get_rdzv_state()
            if state.get("status") != "frozen" or state.get("version") != expected_version:
                raise EtcdRendezvousRetryImmediately()
            self._etcd(self.client.write, lease_key, None, ttl=self._keep_alive_ttl)
            state["keep_alives"].append(lease_key)
            final = len(state["keep_alives"]) == len(state["participants"])
            if final:
                state["status"] = "final"
                state["num_workers_waiting"] = 0
            try:
                node = self._cas_state(node, state, None if final else CONST_ETCD_FROZEN_TTL)
            except etcd.EtcdCompareFailed:
                continue
            self._lease_this_rank_stop = self.setup_lease_renewal(lease_key, ttl=self._keep_alive_ttl)
            self._this_rank_key = lease_key
            return node

    def wait_for_final(self, expected_version: str):
        node, state = self.get_rdzv_state()
        while True:
            if state.get("version") == expected_version and state.get("status") == "final":
                return node
            if state.get("version") == expected_version and state.get("status") == "frozen":
                node, state = self.try_wait_for_state_change(node.etcd_index + 1)
                continue
            raise EtcdRendezvousRetryableFailure()

    def handle_existing_rendezvous(self, expected_version: str) -> None:
        """A final rendezvous exists: count ourselves waiting, then wait until it ends or a member is gone."""
        self.announce_self_waiting(expected_version)
        self.wait_for_rendezvous_to_free(expected_version)

    def announce_self_waiting(self, expected_version: str):
        while True:
            _backoff()
            node, state = self.get_rdzv_state()
            if state.get("status") != "final" or state.get("version") != expected_version:
                raise EtcdRendezvousRetryImmediately()
            state["num_workers_waiting"] = int(state.get("num_workers_waiting", 0)) + 1
            try:
                return self._cas_state(node, state)
            except etcd.EtcdCompareFailed:
                continue

    def wait_for_rendezvous_to_free(self, expected_version: str) -> None:
        """Return when the final ``expected_version`` is replaced, or after tearing it down because a member's
        keep-alive key expired (that member stopped renewing it: it is gone)."""
        node, state = self.get_rdzv_state()
        while True:
            if state.get("status") != "final" or state.get("version") != expected_version:
                return
            members = self._etcd(self.client.read, self.get_path(f"/rdzv/v_{expected_version}"))
            alive = {child.key for child in members.children}
            lapsed = [key for key in state.get("keep_alives", []) if key not in alive]
            if lapsed:
                logger.info("rendezvous %s: keep-alive %s lapsed; ending version %s", self._run_id, lapsed[0], expected_version)
                try:
                    self._etcd(self.client.delete, self.get_path("/rdzv/active_version"), prevIndex=node.modifiedIndex)
                except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
                    pass  # someone else changed or removed it first: same outcome
                return
            self._watch(self.get_path("/rdzv"), max(node.etcd_index, members.etcd_index) + 1,
                        max(self._remaining(), 0.0), recursive=True)
            self._check_deadline()
            node, state = self.get_rdzv_state()

    def set_closed(self) -> None:
        """Close the run: every node's next (or current) rendezvous raises RendezvousClosedError."""
        key = self.get_path("/rdzv/active_version")
        while True:
            try:
                node, state = self.get_rdzv_state()
            except etcd.EtcdKeyNotFound:
                try:
                    self._etcd(self.client.write, key, json.dumps({"status": "closed"}), prevExist=False)
                    return
                except etcd.EtcdAlreadyExist:
                    continue
            if state.get("status") == "closed":
                return
            state["status"] = "closed"
            try:
                self._cas_state(node, state)
                return
            except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
                _backoff()

    # ------------------------------------------------------------------ keep-alives, extra data, store

    def setup_lease_renewal(self, full_path: str, ttl: int) -> threading.Event:
        """Refresh ``full_path``'s TTL every ``ttl / 2`` s in a daemon thread until the returned event is set."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.is_set():
                try:
                    self.client.refresh(full_path, ttl=ttl)
                except etcd.EtcdKeyNotFound:
                    return  # it expired or was removed: nothing left to keep alive
                except Exception as e:  # noqa: BLE001 - etcd gone: the rendezvous calls report it, not this thread
                    logger.debug("rendezvous %s: renewing %s failed: %s", self._run_id, full_path, one_line(e))
                if stop.wait(ttl / 2):
                    return

        threading.Thread(target=renew, name=f"etcd-lease-{full_path}", daemon=True).start()
        return stop

    def store_extra_data(self, rdzv_version: str, key: str, value: Any) -> None:
        """Add ``key: value`` to the JSON object ``rdzv/v_<version>/extra_data``."""
        path = self.get_path(f"/rdzv/v_{rdzv_version}/extra_data")
        try:
            self._etcd(self.client.write, path, json.dumps({key: value}), prevExist=False)
            return
        except etcd.EtcdAlreadyExist:
            pass
        while True:
            node = self._etcd(self.client.read, path)
            data = json.loads(node.value)
            data[key] = value
            try:
                self._etcd(self.client.write, path, json.dumps(data), prevIndex=node.modifiedIndex)
                return
            except etcd.EtcdCompareFailed:
                _backoff()

    def load_extra_data(self, rdzv_version: str, key: str, timeout: float | None = None) -> Any:
        """The value stored for ``key`` by :meth:`store_extra_data`, waiting for it (LookupError after ``timeout``)."""
        path = self.get_path(f"/rdzv/v_{rdzv_version}/extra_data")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                node = self._etcd(self.client.read, path)
                data = json.loads(node.value)
                if key in data:
                    return data[key]
                index = node.etcd_index
            except etcd.EtcdKeyNotFound as e:
                index = int((e.payload or {}).get("index", 0))
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise LookupError(f"rendezvous extra data {key!r} of version {rdzv_version} not set within {timeout} s")
            self._watch(path, index + 1, remaining)

    def setup_kv_store(self, rdzv_version: str) -> EtcdStore:
        """The c10d store of rendezvous ``rdzv_version`` (directory ``rdzv/v_<version>/kv``)."""
        path = self.get_path(f"/rdzv/v_{rdzv_version}/kv")
        self.create_path_if_not_exists(path)
        return EtcdStore(self.client, path)


class EtcdRendezvousHandler(RendezvousHandler):
    """The ``etcd`` backend's handler: drives :class:`EtcdRendezvous` (see the module docstring).

    Configure it with :func:`create_rdzv_handler` (or ``--rdzv-backend etcd``): options ``timeout`` (600 s),
    ``last_call_timeout`` (30 s), ``etcd_prefix`` (``/torchelastic/p2p``), ``protocol``, ``cacert``, ``cert``,
    ``key``, and ours: ``keep_alive_ttl`` (10 s), ``read_timeout`` (60 s), ``connect_timeout`` (5 s).
    """

    def __init__(self, rdzv_impl: EtcdRendezvous, local_addr: str | None):
        self._rdzv_impl = rdzv_impl
        self._local_addr = local_addr
        self._completed_version: str | None = None

    def __del__(self):
        impl = getattr(self, "_rdzv_impl", None)
        if impl is not None:
            impl.stop_leases()

    def get_backend(self) -> str:
        return "etcd"

    def next_rendezvous(self) -> RendezvousInfo:
        version, rank, world_size = self._rdzv_impl.rendezvous_barrier()
        self._completed_version = version
        store = self._rdzv_impl.setup_kv_store(version)
        bootstrap = RendezvousStoreInfo.build(rank, store, local_addr=self._local_addr)
        return RendezvousInfo(store, rank, world_size, bootstrap)

    def _state(self) -> dict | None:
        try:
            return self._rdzv_impl.get_rdzv_state()[1]
        except etcd.EtcdKeyNotFound:
            return None

    def is_closed(self) -> bool:
        state = self._state()
        return state is not None and state.get("status") == "closed"

    def set_closed(self) -> None:
        self._rdzv_impl.set_closed()

    def num_nodes_waiting(self) -> int:
        """Nodes waiting for a new version; at least 1 once the run moved past the version this node completed.

        Upstream reports only the ``num_workers_waiting`` counter of a final state, so a node that polls a moment
        too late (after the others already tore its version down and formed the next) sees 0 forever; here the
        run having moved on counts as "someone waits for you".
        """
        state = self._state()
        completed = self._completed_version
        if state is None or state.get("status") == "closed":
            return 1 if completed is not None and state is None else 0
        if completed is not None and state.get("version") != completed:
            return max(1, len(state.get("participants", [])))
        if state.get("status") == "final":
            return int(state.get("num_workers_waiting", 0))
        return 0

    def get_run_id(self) -> str:
        return self._rdzv_impl._run_id

    def shutdown(self) -> bool:
        """Close the run (upstream's semantics for this backend) and stop renewing our keys; False if closing failed."""
        try:
            self.set_closed()
            return True
        except (RendezvousError, etcd.EtcdException, OSError) as e:
            logger.warning("rendezvous %s: shutdown could not close the run: %s", self.get_run_id(), one_line(e))
            return False
        finally:
            self._rdzv_impl.stop_leases()


def _is_zero(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and float(str(value).strip()) == 0
    except ValueError:
        return False


def create_rdzv_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create an :class:`EtcdRendezvousHandler` from ``params`` (options: see the handler's docstring)."""
    options = connection_options(params, cert_keys=("cert", "key", "cacert"))
    timeout = option_seconds(params, "timeout", _DEFAULT_TIMEOUT)
    # 0 is allowed here (upstream's legacy handler freezes the round as soon as min_workers joined)
    last_call = 0.0 if _is_zero(params.get("last_call_timeout")) else option_seconds(
        params, "last_call_timeout", _DEFAULT_LAST_CALL_TIMEOUT)
    keep_alive_ttl = params.get_as_int("keep_alive_ttl", CONST_WORKER_KEEPALIVE_TTL)
    prefix = params.get("etcd_prefix", _DEFAULT_PREFIX)
    # '' is the etcd root (as upstream); whitespace alone is a typo, not a directory anyone meant
    if not isinstance(prefix, str) or (prefix and not prefix.strip()):
        raise ValueError(f"rendezvous option etcd_prefix={prefix!r} must be an etcd path ('' or '/' for the root)")
    client = options.v2_client()
    try:
        rdzv = EtcdRendezvous(client, prefix, params.run_id, params.min_nodes, params.max_nodes, timeout, last_call,
                              keep_alive_ttl)
    except RendezvousConnectionError:
        raise
    except etcd.EtcdException as e:
        raise RendezvousConnectionError(f"etcd at {options.endpoint} refused the rendezvous setup: {one_line(e)}") from None
    return EtcdRendezvousHandler(rdzv, params.local_addr)


rendezvous_handler_registry.register("etcd", create_rdzv_handler)
