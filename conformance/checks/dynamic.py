"""torch.distributed.elastic.rendezvous.dynamic_rendezvous: the handler, its backend seam and timeouts."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from datetime import timedelta

from conformance.checks._rdzv import Concurrent, c10d_handler, in_threads, timeout
from conformance.registry import check

DR = "rendezvous.dynamic_rendezvous"
# Keep-alive interval (whole seconds: upstream's type) and attempts: a node silent for 3 s is dead. Fewer attempts
# make a node that heartbeats once per ~1 s poll look dead to itself under load.
KEEP_ALIVE = (1, 3)
LAST_CALL_S = 3.5  # longer than that expiry, so a node judging staleness by its own clock evicts in time
# The node that must NOT evict yet: 2 s x 4 = 8 s. A peer joining (heartbeating about every second) is killed; this
# node completes about 3 s later, when the peer's last heartbeat is at most ~5 s old: well inside 8 s, and older than
# a wrong expiry of one interval (2 s).
EARLY_KEEP_ALIVE = (2, 4)
EARLY_JOIN_AFTER_S = 2.5


def _memory_backend_class(ctx):
    """A user-written RendezvousBackend (the documented extension point): CAS over a dict, counting calls."""
    base = ctx.get(f"{DR}.RendezvousBackend")

    class MemoryBackend(base):
        def __init__(self) -> None:
            self.state: bytes | None = None
            self.token = 0
            self.calls = {"get_state": 0, "set_state": 0, "name": 0}

        @property
        def name(self) -> str:
            self.calls["name"] += 1
            return "conformance-memory"

        def get_state(self):
            self.calls["get_state"] += 1
            return None if self.state is None else (self.state, self.token)

        def set_state(self, state, token=None):
            self.calls["set_state"] += 1
            if (self.state is None and token is None) or token == self.token:
                self.state, self.token = state, self.token + 1
                return self.state, self.token, True
            return None if self.state is None else (self.state, self.token, False)

    return MemoryBackend


def _memory_rendezvous(ctx):
    backend = _memory_backend_class(ctx)()
    store = ctx.resources.tcp_store_client()
    handler = ctx.get(f"{DR}.DynamicRendezvousHandler").from_backend(
        run_id=ctx.run_id("mem"), store=store, backend=backend, min_nodes=1, max_nodes=1, timeout=timeout(ctx)
    )
    ctx.add_cleanup(handler.shutdown)
    info = handler.next_rendezvous()
    return backend, handler, info


@check(f"{DR}.create_handler", timeout=30)
def create_handler(ctx) -> None:
    rp = ctx.get("rendezvous.RendezvousParameters")
    run_id = ctx.run_id("create")
    store = ctx.resources.tcp_store_client()
    backend = ctx.get("rendezvous.c10d_rendezvous_backend.C10dRendezvousBackend")(store, run_id)
    params = rp(backend="c10d", endpoint="", run_id=run_id, min_nodes=2, max_nodes=2, join_timeout="1",
                last_call_timeout="1", close_timeout="1")
    handler = ctx.get(f"{DR}.create_handler")(store, backend, params)
    ctx.add_cleanup(handler.shutdown)
    ctx.expect(isinstance(handler, ctx.get(f"{DR}.DynamicRendezvousHandler")), "create_handler() type")
    ctx.expect_equal(handler.get_run_id(), run_id, "run id from params")
    started = time.monotonic()
    ctx.expect_raises(ctx.get("rendezvous.api.RendezvousTimeoutError"), handler.next_rendezvous,
                      what="next_rendezvous() with join_timeout=1 from params and 1 of 2 nodes")
    ctx.expect(time.monotonic() - started < 15, "join_timeout from params was not honoured")
    bad = rp(backend="c10d", endpoint="", run_id=run_id, min_nodes=1, max_nodes=1, join_timeout="-1")
    ctx.expect_raises(ValueError, ctx.get(f"{DR}.create_handler"), store, backend, bad,
                      what="create_handler() with join_timeout=-1")


@check(f"{DR}.DynamicRendezvousHandler", timeout=60)
def dynamic_handler(ctx) -> None:
    run_id = ctx.run_id("dyn")
    nodes = [c10d_handler(ctx, run_id, 2, 2) for _ in range(2)]
    infos = in_threads(ctx, [n.next_rendezvous for n in nodes])
    ctx.expect_equal(sorted(i.rank for i in infos), [0, 1], "ranks of a 2-node rendezvous over TCPStore")
    ctx.expect_equal({i.world_size for i in infos}, {2}, "world_size of a 2-node rendezvous")
    # A second round (as after a worker failure): both nodes re-rendezvous and get a consistent new round.
    again = in_threads(ctx, [n.next_rendezvous for n in nodes])
    ctx.expect_equal(sorted(i.rank for i in again), [0, 1], "ranks of the second round")


@check(f"{DR}.DynamicRendezvousHandler.from_backend")
def from_backend(ctx) -> None:
    backend, handler, info = _memory_rendezvous(ctx)
    ctx.expect(isinstance(handler, ctx.get(f"{DR}.DynamicRendezvousHandler")), "from_backend() type")
    ctx.expect_equal(handler.get_backend(), "conformance-memory", "get_backend() is the backend's name")
    ctx.expect_equal((info.rank, info.world_size), (0, 1), "1-node rendezvous over a user backend")
    dh = ctx.get(f"{DR}.DynamicRendezvousHandler")
    ctx.expect_raises(ValueError, dh.from_backend, run_id="x", store=ctx.resources.tcp_store_client(),
                      backend=backend, min_nodes=2, max_nodes=1, what="from_backend() with max_nodes < min_nodes")


@check(f"{DR}.RendezvousBackend")
def rendezvous_backend(ctx) -> None:
    base = ctx.get(f"{DR}.RendezvousBackend")
    ctx.expect_raises(TypeError, base, what="instantiating the abstract RendezvousBackend")
    ctx.expect({"get_state", "set_state", "name"} <= set(base.__abstractmethods__),
               f"abstract methods {sorted(base.__abstractmethods__)}")
    backend, _, info = _memory_rendezvous(ctx)
    ctx.expect_equal(info.world_size, 1, "rendezvous completed over a user-written backend")


@check(f"{DR}.RendezvousBackend.get_state")
def backend_get_state(ctx) -> None:
    backend, _, _ = _memory_rendezvous(ctx)
    ctx.expect(backend.calls["get_state"] >= 1, "the handler never read the state through get_state()")
    ctx.expect(backend.state is not None, "the handler left no state in the backend")


@check(f"{DR}.RendezvousBackend.set_state")
def backend_set_state(ctx) -> None:
    backend, _, _ = _memory_rendezvous(ctx)
    ctx.expect(backend.calls["set_state"] >= 1, "the handler never wrote the state through set_state()")
    ctx.expect(backend.token >= 1, "no set_state() call succeeded")


@check(f"{DR}.RendezvousBackend.name")
def backend_name(ctx) -> None:
    backend, handler, _ = _memory_rendezvous(ctx)
    ctx.expect_equal(handler.get_backend(), "conformance-memory", "get_backend() is RendezvousBackend.name")


@check(f"{DR}.RendezvousTimeout")
def rendezvous_timeout(ctx) -> None:
    rt = ctx.get(f"{DR}.RendezvousTimeout")
    default = rt()
    ctx.expect_equal((default.join, default.last_call, default.close, default.heartbeat),
                     (timedelta(seconds=600), timedelta(seconds=30), timedelta(seconds=30), timedelta(seconds=5)),
                     "RendezvousTimeout() defaults (join, last_call, close, heartbeat)")
    for field in ("join", "last_call", "close", "heartbeat"):
        ctx.expect_raises(ValueError, rt, **{field: timedelta(seconds=0)}, what=f"RendezvousTimeout({field}=0)")


def _timeout_property(ctx, field: str, default_s: float) -> None:
    rt = ctx.get(f"{DR}.RendezvousTimeout")
    ctx.expect_equal(getattr(rt(), field), timedelta(seconds=default_s), f"default {field}")
    ctx.expect_equal(getattr(rt(**{field: timedelta(seconds=7)}), field), timedelta(seconds=7), f"given {field}")
    ctx.expect_equal(getattr(rt(**{field: None}), field), timedelta(seconds=default_s), f"{field}=None falls back")
    ctx.expect(isinstance(vars(rt).get(field) or getattr(rt, field), property), f"{field} is not a property")


def _contended_backend(ctx, run_id: str):
    """The real C10dRendezvousBackend on the shared TCPStore, behind a user-written RendezvousBackend that, while
    ``contended``, lets a rival node write first on every ``set_state``: the rival stores one of ``rival_states``
    (three real states of this run) that is neither the current state nor the one the caller's token stands for, so
    the caller's compare-and-set really fails in the store, every time (a rendezvous whose state somebody else
    always changes first). The third state rules out ABA: with two, a rival write could restore the very state an
    older token of the caller stands for, and that write would win; the lock keeps the handler's heartbeat thread
    from slipping a write between the rival's and the caller's. ``gone``: every call raises
    RendezvousConnectionError (it stops a handler that would otherwise retry longer than the check can wait)."""
    c10d = ctx.get("rendezvous.c10d_rendezvous_backend.C10dRendezvousBackend")
    connection_error = ctx.get("rendezvous.api.RendezvousConnectionError")

    class ContendedBackend(ctx.get(f"{DR}.RendezvousBackend")):
        def __init__(self) -> None:
            self.real = c10d(ctx.resources.tcp_store_client(), run_id)
            self.rival = c10d(ctx.resources.tcp_store_client(), run_id)
            self.contended = False
            self.rival_states: tuple[bytes, ...] = ()
            self.gone = False
            self.lost_writes = 0
            self.lock = threading.Lock()

        @property
        def name(self) -> str:
            return self.real.name

        def _reachable(self) -> None:
            if self.gone:
                raise connection_error("the conformance check cut this node off the store")

        def get_state(self):
            self._reachable()
            return self.real.get_state()

        def set_state(self, state, token=None):
            self._reachable()
            with self.lock:
                if self.contended:
                    self._rival_writes_first(token)
                result = self.real.set_state(state, token)
            if result is not None and not result[2]:
                self.lost_writes += 1
            return result

        def _rival_writes_first(self, token) -> None:
            for candidate in self.rival_states:
                current, rival_token = self.rival.get_state()
                if candidate == current:
                    continue
                ctx.expect(self.rival.set_state(candidate, rival_token)[2], "the rival's compare-and-set failed")
                if self.rival.get_state()[1] != token:
                    return
            ctx.expect(False, "the rival found no state that would make the caller's compare-and-set fail")

    return ContendedBackend()


@check(f"{DR}.RendezvousTimeout.close", timeout=60)
def timeout_close(ctx) -> None:
    _timeout_property(ctx, "close", 30)
    # Behaviour: set_closed() gives up after the close timeout when it cannot get its write in -- here every
    # compare-and-set it makes loses to a rival writer in the real store -- instead of retrying indefinitely.
    # (A store behind a blackholing proxy does not test this: both upstream and ours then block in TCPStore's
    # compare_set, which has no receive timeout, for minutes whatever the close timeout says.)
    close_s = 2.0
    run_id = ctx.run_id("close")
    store = ctx.resources.tcp_store_client()
    backend = _contended_backend(ctx, run_id)
    handler = ctx.get(f"{DR}.DynamicRendezvousHandler").from_backend(
        run_id=run_id, store=store, backend=backend, min_nodes=1, max_nodes=1, timeout=timeout(ctx, close=close_s))
    ctx.add_cleanup(handler.shutdown)
    states = []
    for _ in range(3):  # three real, different states of this run for the rival to write (rounds 1 to 3)
        handler.next_rendezvous()
        states.append(backend.real.get_state()[0])
    ctx.expect(len(set(states)) == 3, "the run's state did not change from round to round")
    backend.rival_states = tuple(states)
    backend.contended = True
    started = time.monotonic()
    closing = Concurrent([handler.set_closed])
    bound_s = close_s + 8  # the close timeout plus slack for a loaded machine
    for t in closing.threads:
        t.join(bound_s)
    waited = time.monotonic() - started
    still_running = any(t.is_alive() for t in closing.threads)
    backend.gone = True  # ends a set_closed() still retrying (its next store call fails)
    ctx.expect(not still_running, f"set_closed() with close timeout {close_s} s was still retrying a contended store "
                                  f"after {waited:.1f} s ({backend.lost_writes} lost compare-and-sets)")
    timeout_error = ctx.get("rendezvous.api.RendezvousTimeoutError")
    ctx.expect_raises(timeout_error, closing.results_within, ctx, 5,
                      what=f"set_closed() whose every compare-and-set loses (close timeout {close_s} s)")
    ctx.expect(waited >= close_s * 0.9, f"set_closed() gave up after {waited:.2f} s, before the close timeout "
                                        f"({close_s} s)")
    ctx.expect(backend.lost_writes >= 1, "set_closed() never tried to write the closed state")
    # Without the rival the same node closes the run (the contention alone kept it from closing).
    backend.contended, backend.gone = False, False
    handler.set_closed()
    ctx.expect(handler.is_closed(), "is_closed() after set_closed() once the contention ended")


@check(f"{DR}.RendezvousTimeout.heartbeat", timeout=90)
def timeout_heartbeat(ctx) -> None:
    _timeout_property(ctx, "heartbeat", 5)
    # Behaviour (heartbeat expiry, both bounds): two participants (processes waiting for a 2-node round, one per run)
    # are SIGKILLed together and stop heartbeating.
    # - Not before: keep_alive_max_attempt is "the maximum number of failed heartbeat attempts after which a node is
    #   considered dead", so a node joining one run ~2.5 s after the kill, with keep-alive 2 s x 4 (min 1, max 3), still
    #   counts the dead peer in (world size 2): evicting it there means a node is declared dead too early.
    # - Not much after: once the other run's peer's last heartbeat is older than keep_alive_interval x
    #   keep_alive_max_attempt (1 s x 3) it is evicted, so a node joining later (min 1, max 3) completes the round at
    #   the end of its last call alone instead of counting the dead node in (world size 2).
    run_id, early_run_id = ctx.run_id("evict"), ctx.run_id("evict-early")
    peer, early_peer = (_rdzv_peer(ctx, run, KEEP_ALIVE) for run in (run_id, early_run_id))
    for proc in (peer, early_peer):
        _expect_line(ctx, proc, "joining", 60)
    time.sleep(1)  # they join and heartbeat (participants of their open rounds)
    _kill_group(peer)
    _kill_group(early_peer)
    killed = time.monotonic()
    time.sleep(EARLY_JOIN_AFTER_S)
    # min 2: upstream starts the last call when a join makes the count reach min_nodes exactly (not when it passes it)
    early = c10d_handler(ctx, early_run_id, 2, 3, keep_alive=EARLY_KEEP_ALIVE, join=10, last_call=0.5)
    early_expiry = EARLY_KEEP_ALIVE[0] * EARLY_KEEP_ALIVE[1]
    too_early = (f"the only other participant, killed {EARLY_JOIN_AFTER_S} s before this node joined, was evicted "
                 f"with keep-alive {EARLY_KEEP_ALIVE[0]} s x {EARLY_KEEP_ALIVE[1]} (dead only once its last heartbeat "
                 f"is {early_expiry} s old)")
    try:
        info = early.next_rendezvous()
    except ctx.get("rendezvous.api.RendezvousTimeoutError"):
        ctx.expect(False, f"a node joining a run whose other participant was killed {EARLY_JOIN_AFTER_S} s earlier "
                          f"(keep-alive {EARLY_KEEP_ALIVE[0]} s x {EARLY_KEEP_ALIVE[1]}, last call 0.5 s) did not "
                          f"complete the 2-node round within its join timeout (10 s; "
                          f"{time.monotonic() - killed:.1f} s after the kill): either the dead participant was "
                          f"evicted before its heartbeat was {early_expiry} s old, or the last call ran far too long")
    else:
        done = time.monotonic() - killed
        ctx.expect_equal(info.world_size, 2, f"world size of a round completed {done:.1f} s after the kill ({too_early} "
                                             f"if not 2)")
    # The other peer's last heartbeat (written at most one poll, ~1 s, before the kill) is stale after this;
    # upstream counts a stale node it has not evicted yet into a join for good, so the survivor must not arrive
    # earlier.
    expiry = KEEP_ALIVE[0] * KEEP_ALIVE[1]
    time.sleep(max(0.0, killed + expiry + 1 - time.monotonic()))
    survivor = c10d_handler(ctx, run_id, 1, 3, keep_alive=KEEP_ALIVE, join=20, last_call=LAST_CALL_S)
    started = time.monotonic()
    info = survivor.next_rendezvous()
    ctx.expect_equal((info.rank, info.world_size), (0, 1),
                     f"(rank, world size) of a node joining {started - killed:.1f} s after the only other participant "
                     f"was killed (keep-alive {KEEP_ALIVE[0]} s x {KEEP_ALIVE[1]}): the dead node was not evicted")
    waited = time.monotonic() - started
    ctx.expect(waited >= LAST_CALL_S * 0.9, f"the lone node completed after {waited:.2f} s, before its last call")


def _rdzv_peer(ctx, run_id: str, keep_alive: tuple[int, int]):
    """A process joining ``run_id`` (min 2, max 2) and heartbeating until it is killed."""
    port = str(ctx.resources.tcp_store().port)
    entry, args = ctx.worker_command("rdzv_node", port, run_id, *map(str, keep_alive))
    proc = subprocess.Popen([entry, *args], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **ctx.worker_env()}, cwd=str(ctx.tmpdir))
    ctx.add_cleanup(lambda: _kill_group(proc))
    return proc


def _kill_group(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _expect_line(ctx, proc, prefix: str, timeout_s: float) -> None:
    """Wait for a line starting with ``prefix`` on ``proc``'s stdout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return
    ctx.expect(False, f"the peer process did not print {prefix!r} within {timeout_s} s (exit {proc.poll()})")


@check(f"{DR}.RendezvousTimeout.join", timeout=30)
def timeout_join(ctx) -> None:
    _timeout_property(ctx, "join", 600)
    # Behaviour: a lone node of a 2-node job gives up after the join timeout, not before and not much later.
    handler = c10d_handler(ctx, ctx.run_id("join"), 2, 2, join=1.0)
    started = time.monotonic()
    ctx.expect_raises(ctx.get("rendezvous.api.RendezvousTimeoutError"), handler.next_rendezvous,
                      what="next_rendezvous() of 1 of 2 nodes with join=1 s")
    waited = time.monotonic() - started
    ctx.expect(0.9 <= waited < 6, f"join timeout 1 s: next_rendezvous() gave up after {waited:.2f} s")


@check(f"{DR}.RendezvousTimeout.last_call", timeout=60)
def timeout_last_call(ctx) -> None:
    _timeout_property(ctx, "last_call", 30)
    # Behaviour: with min 1 / max 2 a lone node completes only after last_call has passed.
    handler = c10d_handler(ctx, ctx.run_id("lastcall"), 1, 2, last_call=1.0)
    started = time.monotonic()
    info = handler.next_rendezvous()
    waited = time.monotonic() - started
    ctx.expect_equal(info.world_size, 1, "world size after last call with one node")
    ctx.expect(waited >= 0.9, f"rendezvous completed after {waited:.2f} s, before last_call (1 s) passed")
    # ... and not much after it: a last_call that was ignored (the 30 s default) must not pass.
    ctx.expect(waited <= 8, f"rendezvous completed after {waited:.2f} s, long after last_call (1 s) passed")
