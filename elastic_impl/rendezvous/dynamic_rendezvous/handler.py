"""The rendezvous handler: a thin loop around a stepper, a keep-alive thread, store-host failover (c10d)."""


from __future__ import annotations

import logging
import os
import threading

from elastic_impl.utils.clock import REAL_CLOCK, Clock

from .._backend import ChangeNotification, RendezvousBackend, SeparateHeartbeatConnection, StoreHostFailover
from ..api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)
from ..options import (
    DEFAULT_KEEP_ALIVE_MAX_ATTEMPT,
    keep_alive_options,
    option_seconds,
    store_liveness_timeout,
)
from .outage import JoinOutageRideOut
from .state import (
    NodeDesc,
    RendezvousSettings,
    RendezvousState,
    RendezvousTimeout,
    StepResult,
    new_node_desc,
    num_nodes_waiting_in,
)
from .stepper import RendezvousStepper, StoreContact

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package


def _heartbeat_connection(backend: RendezvousBackend) -> RendezvousBackend:
    """The backend the keep-alive thread uses: its own connection where the backend offers one, else the same."""
    return backend.connection_for_heartbeats() if isinstance(backend, SeparateHeartbeatConnection) else backend


class DynamicRendezvousHandler(RendezvousHandler):
    """A :class:`RendezvousHandler` running the dynamic rendezvous over any :class:`RendezvousBackend`.

    Extensions beyond upstream: ``leave()`` (this node goes away, the run goes on), ``get_round()``,
    ``get_participants()``, ``get_restart_count()``, ``increment_restart_count()``. ``shutdown()`` closes the run
    for everyone, like upstream.
    """

    def __init__(
        self,
        node: NodeDesc,
        settings: RendezvousSettings,
        backend_name: str,
        store,
        backend: RendezvousBackend,
        clock: Clock = REAL_CLOCK,
        local_addr: str | None = None,
        store_outage_timeout: float | None = None,
    ) -> None:
        self._node = node
        # How long a join rides out a store that does not answer (see _run); default: the heartbeat expiry.
        self._store_outage_timeout = float(store_outage_timeout if store_outage_timeout is not None
                                           else settings.heartbeat_expiry_seconds)
        self._settings = settings
        self._backend_name = backend_name
        self._store = store
        self._backend = backend
        self._clock = clock
        self._local_addr = local_addr
        # One view of store outages for both of this node's steppers (see StoreContact).
        self._store_contact = StoreContact()
        self._stepper = RendezvousStepper(backend, settings, node, clock, store_contact=self._store_contact)
        # Re-entrant: leave() may run in a signal handler that interrupted a step on the same thread.
        self._lock = threading.RLock()
        self._keep_alive_stop = threading.Event()
        self._keep_alive_thread: threading.Thread | None = None
        # The keep-alive thread's own stepper (and, where the backend offers one, its own store connection), so a
        # heartbeat never waits for the agent's polls (handler lock, or one store connection) -- on a slow store
        # that wait alone outlasted the heartbeat expiry. Compare-and-set keeps the two steppers' writes apart.
        self._keep_alive_stepper: RendezvousStepper | None = None
        self._left = False
        # Store-host failover, where the backend offers it (c10d over TCP: see c10d_failover).
        self._failover = backend.failover if isinstance(backend, StoreHostFailover) else None
        self._standby_announced = False
        # Set when this node hosted the store and the others failed over without it (every later step raises it).
        self._deposed: RendezvousError | None = None

    @classmethod
    def from_backend(
        cls,
        run_id: str,
        store,
        backend: RendezvousBackend,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: float = 5,
        keep_alive_max_attempt: int = DEFAULT_KEEP_ALIVE_MAX_ATTEMPT,
        clock: Clock = REAL_CLOCK,
        store_outage_timeout: float | None = None,
    ) -> DynamicRendezvousHandler:
        """Build a handler for ``run_id`` over ``backend``; ``store`` is what ``next_rendezvous`` hands out.

        ``store_outage_timeout``: how long a join keeps retrying a store that does not answer before it fails
        (default: the heartbeat expiry)."""
        timeout = timeout or RendezvousTimeout()
        settings = RendezvousSettings(run_id, min_nodes, max_nodes, timeout, keep_alive_interval, keep_alive_max_attempt)
        return cls(new_node_desc(local_addr), settings, backend.name, store, backend, clock, local_addr,
                   store_outage_timeout)

    @property
    def settings(self) -> RendezvousSettings:
        return self._settings

    @property
    def node(self) -> NodeDesc:
        return self._node

    def get_backend(self) -> str:
        return self._backend_name

    @property
    def use_agent_store(self) -> bool:
        # Read at every call, as upstream: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 opts out of sharing the store.
        return os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1"

    def _step(self, op: str) -> StepResult:
        with self._lock:
            if self._deposed is not None:
                return StepResult(done=False, error=self._deposed)
            result = self._stepper.step(op)
            if isinstance(result.error, RendezvousConnectionError) and self._fail_over():
                result = self._stepper.step(op)
            return result

    # ------------------------------------------------------------------ store-host failover (c10d)

    def _fail_over(self) -> bool:
        """If the store is gone and a successor can take over, move both steppers to its store. Call with the
        lock held. Returns whether this node now talks to a new store."""
        failover = self._failover
        if failover is None or not failover.store_gone(self._backend):
            return False
        known = max(self._stepper.state.restart_count,
                    self._keep_alive_stepper.state.restart_count if self._keep_alive_stepper else 0)
        try:
            backend, store = failover.take_over(self._node.key, self._last_seen_state())
        except (RendezvousError, OSError, RuntimeError) as e:  # (a socket or TCPStore error outside a candidate)
            logger.error("rendezvous %s: %s", self._settings.run_id, e)
            self._failover = None  # nothing more to try: calls fail with the store's own error from now on
            return False
        self._backend, self._store = backend, store
        self._stepper.switch_backend(backend)
        if self._keep_alive_stepper is not None:
            try:
                self._keep_alive_stepper.switch_backend(_heartbeat_connection(backend))
            except RendezvousError:
                self._keep_alive_stepper.switch_backend(backend)
        # Peers need a moment to reach the new store: nobody's silence counts until it answered for an expiry.
        self._store_contact.lost(self._clock.monotonic(), self._settings, "the store host is gone; failing over")
        try:
            failover.announce(backend, self._node.key)
            self._raise_restart_count_to(known)
        except RendezvousError as e:
            logger.warning("rendezvous %s: after the failover: %s", self._settings.run_id, e)
        return True

    def _check_deposed(self) -> None:
        """On the store host, once per keep-alive: did the others fail over while this node was cut off or frozen?
        Then every later step raises, so the agent stops its workers instead of training on as a second group."""
        failover = self._failover
        if failover is None or self._deposed is not None:
            return
        successor = failover.deposed_by(self._node.key)
        if successor is None:
            return
        from ..c10d_failover import StoreHostDeposed

        self._deposed = StoreHostDeposed(
            f"rendezvous {self._settings.run_id}: this node hosted the store but was cut off or frozen long enough "
            f"for the others to fail over; the job goes on at {successor}. Stopping this node."
        )
        logger.error("%s", self._deposed)

    def _last_seen_state(self) -> RendezvousState:
        """The newest state this node's steppers saw (the successor seeds the new store with it)."""
        states = [self._stepper.state]
        if self._keep_alive_stepper is not None:
            states.append(self._keep_alive_stepper.state)
        return max(states, key=lambda s: (s.round, s.complete, len(s.participants)))

    def _raise_restart_count_to(self, known: int) -> None:
        """The job-wide restart count never goes down in a failover: a successor that saw an older state gets the
        count the others knew."""
        for _ in range(16):
            got = self._backend.get_state()
            if got is None:
                return
            s = RendezvousState.from_bytes(got[0])
            if s.restart_count >= known:
                return
            s.restart_count = known
            written = self._backend.set_state(s.to_bytes(), got[1])
            if written is not None and written[2]:
                return

    def _announce_standby(self) -> None:
        """Before the first join: publish where this node would host the store (once)."""
        if self._failover is None or self._standby_announced:
            return
        try:
            with self._lock:
                self._failover.announce(self._backend, self._node.key)
            self._standby_announced = True
        except RendezvousError as e:
            logger.warning("rendezvous %s: could not announce this node's standby store: %s", self._settings.run_id, e)

    def _learn_succession(self) -> None:
        """After a completed round: read who takes over the store if its host dies."""
        failover = self._failover
        if failover is None:
            return
        try:
            failover.learn(self._backend, sorted(self._read().participants))
        except RendezvousError as e:
            logger.warning("rendezvous %s: could not read the store-host succession plan: %s", self._settings.run_id, e)

    def _raise_if_left(self) -> None:
        if self._left:
            raise RendezvousGracefulExitError(f"rendezvous node {self._node} left run {self._settings.run_id!r}")

    def _run(self, op: str, timeout: float) -> StepResult:
        """Step ``op`` until done; errors raise; bounded by ``timeout`` seconds for non-join ops.

        A join rides out a store that does not answer (a cut network, a restarting store, a host failing over) for
        up to ``store_outage_timeout`` (the store liveness bound: as long as a running agent's monitoring rides out
        an outage) instead of failing the agent on the first error: a node that gave up at once was the only one
        to lose the job (seen in the netns scenarios)."""
        deadline = self._clock.monotonic() + timeout
        outage = JoinOutageRideOut(self._settings, self._node, self._store_outage_timeout) if op == "join" else None
        while True:
            if op == "join":
                self._raise_if_left()
            result = self._step(op)
            if op == "join" and self._left:
                # leave() ran while this step was in flight (a signal handler on this thread): make sure the
                # step did not put this node back in.
                self._step("leave")
                self._raise_if_left()
            if result.error is not None:
                if outage is None or not isinstance(result.error, RendezvousConnectionError):
                    raise result.error
                self._clock.sleep(outage.failed(result.error, self._clock.monotonic()))
                continue
            if outage is not None:
                outage.answered(self._clock.monotonic())
            if result.done:
                return result
            if self._clock.monotonic() > deadline:
                raise RendezvousTimeoutError(f"rendezvous run {self._settings.run_id!r}: {op} did not finish within {timeout} s")
            self._wait(max(0.0, (result.wait_until or 0.0) - self._clock.monotonic()))

    def _wait(self, seconds: float) -> None:
        """Wait until the next step is due, waking early when the backend reports the state changed.

        Blocking in the store is real time, so it is used only on the real clock (an injected clock, like the
        simulator's, sleeps on its own time) and only when the stepper knows the version its state goes with.
        """
        version = self._stepper.seen_version
        if seconds > 0.005 and version is not None and self._clock is REAL_CLOCK:
            try:
                backend = self._backend
                if isinstance(backend, ChangeNotification) and backend.wait_for_change(version, seconds) is not None:
                    return
            except RendezvousError:
                return  # the next step reads the store again and reports the failure
        self._clock.sleep(seconds)

    def next_rendezvous(self) -> RendezvousInfo:
        self._raise_if_left()
        self._announce_standby()
        with self._lock:
            self._stepper.begin_join()
        result = self._run("join", float("inf"))
        logger.info(
            "rendezvous %s round %s complete: node %s rank %s of %s",
            self._settings.run_id, result.round, self._node, result.rank, result.world_size,
        )
        self._start_keep_alive()
        self._learn_succession()
        store = self._round_store(result.round)
        return RendezvousInfo(store, result.rank, result.world_size, self._bootstrap_info(store, result.rank))

    def _round_store(self, round_: int):
        if self._store is None:
            return None
        from torch.distributed import PrefixStore

        return PrefixStore(f"torch.rendezvous.{self._settings.run_id}.{round_}", self._store)

    def _bootstrap_info(self, store, rank: int) -> RendezvousStoreInfo | None:
        if not self.use_agent_store:  # opted out: rank 0 publishes its own address and a free port
            return RendezvousStoreInfo.build(rank, store, self._node.addr)
        # The shared TCPStore already has an address everyone knows; no need for rank 0 to publish one.
        host = getattr(self._store, "host", None)
        port = getattr(self._store, "port", None)
        if host is not None and port is not None:
            return RendezvousStoreInfo(host, int(port))
        return None

    def _start_keep_alive(self) -> None:
        if self._keep_alive_thread is not None and self._keep_alive_thread.is_alive():
            return
        if self._keep_alive_stepper is None:
            try:
                backend = _heartbeat_connection(self._backend)
            except RendezvousError as e:
                logger.debug("rendezvous %s: heartbeats share the agent's connection (%s)", self._settings.run_id, e)
                backend = self._backend
            self._keep_alive_stepper = RendezvousStepper(backend, self._settings, self._node, self._clock,
                                                         store_contact=self._store_contact,
                                                         versioned_reads=False)
        self._keep_alive_stop.clear()
        self._keep_alive_thread = threading.Thread(
            target=self._keep_alive_loop, name=f"rdzv-keep-alive-{self._node}", daemon=True
        )
        self._keep_alive_thread.start()

    def _keep_alive_loop(self) -> None:
        interval = self._settings.keep_alive_seconds
        while not self._clock.wait(self._keep_alive_stop, interval):
            # A heartbeat that lost its compare-and-set to a peer's write is retried on the winner's state until it
            # lands, however long that takes: on a slow store (each call a fraction of the interval) the peers'
            # own heartbeats keep winning the race, and giving up after one interval starved a live node into
            # eviction (the straggler scenario).
            stepper = self._keep_alive_stepper
            result = stepper.step("keep_alive")
            while result.error is None and not result.done:
                now = self._clock.monotonic()
                retry_at = result.wait_until if result.wait_until is not None else now
                if self._clock.wait(self._keep_alive_stop, max(0.0, retry_at - now)):
                    return
                result = stepper.step("keep_alive")
            if result.error is not None:
                logger.warning("rendezvous keep-alive of %s failed: %s", self._node, result.error)
                if isinstance(result.error, RendezvousConnectionError):
                    with self._lock:
                        self._fail_over()
            try:
                self._check_deposed()
            except Exception as e:  # noqa: BLE001 - the fence is best effort; the heartbeats must go on
                logger.error("rendezvous %s: the deposed-store-host check failed: %s: %s", self._settings.run_id,
                             type(e).__name__, e, exc_info=True)

    def _stop_keep_alive(self) -> None:
        self._keep_alive_stop.set()
        thread = self._keep_alive_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._settings.timeout.close.total_seconds())
        self._keep_alive_thread = None

    def _read(self) -> RendezvousState:
        result = self._step("sync")
        if result.error is not None:
            raise result.error
        return self._stepper.state

    def is_closed(self) -> bool:
        return self._read().closed

    def set_closed(self) -> None:
        self._run("close", self._settings.timeout.close.total_seconds())

    def num_nodes_waiting(self) -> int:
        state = self._read()
        return num_nodes_waiting_in(state, self._settings, self._stepper.completed_round)

    def get_run_id(self) -> str:
        return self._settings.run_id

    def get_round(self) -> int:
        """The current round number of the run (monotonically increasing)."""
        return self._read().round

    def last_round(self) -> tuple[int, int | None] | None:
        """(round, job-wide restart count at its completion) of this node's last completed rendezvous, from what the
        join already saw (no store read; the count is None when the join did not see it). None before any."""
        stepper = self._stepper
        if stepper.completed_round is None:
            return None
        return stepper.completed_round, stepper.completed_restart_count

    def get_participants(self) -> list[str]:
        """Node keys of the current round's participants, sorted (rank order once the round is complete)."""
        return sorted(self._read().participants)

    def get_restart_count(self) -> int:
        """The job-wide restart counter kept in the rendezvous state (the same on every node)."""
        return self._read().restart_count

    def increment_restart_count(self) -> int:
        """Atomically add one to the job-wide restart counter; return the new value."""
        self._run("increment_restart_count", self._settings.timeout.close.total_seconds())
        return self._stepper.state.restart_count

    def leave(self) -> bool:
        """Leave the run without closing it (extension; upstream has no equivalent); return whether it succeeded.

        Stops heartbeating and removes this node from the participants or the wait list in one compare-and-set.
        The other nodes see ``get_participants()`` change (or, if this node never completed a round, simply do not
        count it) and re-form without it; the run stays open for them and for nodes joining later.

        Contract with the agent/launcher: call ``leave()`` when *this node* goes away while the job goes on
        (SIGTERM/SIGINT, preemption, scale-down) and :meth:`shutdown` only when the *job* ends (success, or restarts
        exhausted). After ``leave()`` this handler is finished: a ``next_rendezvous`` in progress or started later
        raises ``RendezvousGracefulExitError``. Safe to call more than once, and from a signal handler that
        interrupted this handler's own thread (the step lock is re-entrant).
        """
        self._stop_keep_alive()
        self._failover = None  # a node on its way out needs no new store (nor should it host one)
        if self._left:
            return True
        self._left = True
        try:
            self._run("leave", self._settings.timeout.close.total_seconds())
            return True
        except RendezvousError as e:
            logger.warning("rendezvous %s: node %s could not leave cleanly: %s", self._settings.run_id, self._node, e)
            return False

    def shutdown(self) -> bool:
        """End the run for every node, like upstream: stop heartbeating and close the rendezvous.

        Every node's next rendezvous step (and ``is_closed()``) then sees the run closed and stops with
        ``RendezvousClosedError``. Call it only when the job ends; a node that merely goes away calls
        :meth:`leave`. Returns False (after logging why) when the store cannot be reached to close the run.
        """
        self._stop_keep_alive()
        # The job is over: a store host that already left is not replaced (the run would be closed on a new store
        # that nobody reads, after waiting out successors that left too).
        self._failover = None
        try:
            self._run("close", self._settings.timeout.close.total_seconds())
            return True
        except RendezvousError as e:
            logger.warning("rendezvous %s: node %s failed to close the run: %s", self._settings.run_id, self._node, e)
            return False


def create_handler(store, backend: RendezvousBackend, params: RendezvousParameters) -> DynamicRendezvousHandler:
    """Create a handler from ``params`` (options: join_timeout, last_call_timeout, close_timeout, heartbeat_timeout,
    keep_alive_interval, keep_alive_max_attempt; a join rides out a store that does not answer for
    ``store_liveness_timeout``, see options.store_liveness_timeout)."""
    for key in ("keep_alive_interval", "keep_alive_max_attempt"):
        if key in params.config and params.config[key] is None:  # upstream's error, word for word
            raise TypeError(f"You passed '{key}=None' as a rendezvous configuration option")
    keep_alive, max_attempt = keep_alive_options(params)
    timeout = RendezvousTimeout(
        join=option_seconds(params, "join_timeout", None),
        last_call=option_seconds(params, "last_call_timeout", None),
        close=option_seconds(params, "close_timeout", None),
        # As upstream: the option heartbeat_timeout (not the keep-alive interval, which is separate).
        heartbeat=option_seconds(params, "heartbeat_timeout", None),
    )
    return DynamicRendezvousHandler.from_backend(
        params.run_id,
        store,
        backend,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        timeout,
        keep_alive,
        max_attempt,
        store_outage_timeout=store_liveness_timeout(params),
    )
