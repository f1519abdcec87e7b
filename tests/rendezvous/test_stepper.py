"""The dynamic rendezvous state machine, driven step by step on a manual clock over the in-memory backend."""

from __future__ import annotations

import pytest

from elastic_impl.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from elastic_impl.rendezvous.dynamic_rendezvous import (
    NodeDesc,
    RendezvousSettings,
    RendezvousState,
    RendezvousStepper,
    RendezvousTimeout,
    num_nodes_waiting_in,
)


def make_settings(min_nodes=2, max_nodes=3, join=60.0, last_call=5.0, keep_alive=1.0, attempts=3):
    timeout = RendezvousTimeout(join=join, last_call=last_call, close=5.0, heartbeat=keep_alive)
    return RendezvousSettings("run", min_nodes, max_nodes, timeout, keep_alive, attempts)


def make_steppers(backend, clock, settings, count, first=0):
    return [RendezvousStepper(backend, settings, NodeDesc("host", 100 + i, 0), clock) for i in range(first, first + count)]


def drive_join(steppers, clock, limit=10_000):
    """Step every node's join (as a simulator would) until each is done; return node key -> StepResult."""
    for s in steppers:
        s.begin_join()
    pending = {s.node.key: (s, clock.monotonic()) for s in steppers}
    done = {}
    for _ in range(limit):
        if not pending:
            return done
        ready = [key for key, (_, at) in pending.items() if at <= clock.monotonic()]
        if not ready:
            clock.now = min(at for _, at in pending.values())
            continue
        for key in ready:
            stepper, _ = pending[key]
            r = stepper.step("join")
            if r.error is not None:
                raise r.error
            if r.done:
                done[key] = r
                del pending[key]
            else:
                pending[key] = (stepper, r.wait_until)
    raise AssertionError(f"join did not finish; pending: {sorted(pending)}")


def state_of(backend) -> RendezvousState:
    got = backend.get_state()
    return RendezvousState.from_bytes(got[0]) if got is not None else RendezvousState()


def blob_only(backend) -> None:
    if backend.supports_keys():
        pytest.skip("checks how arrivals rewrite the whole state, which keyed backends do not do")


def test_max_nodes_complete_with_contiguous_sorted_ranks(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=3)
    steppers = make_steppers(memory_backend, clock, settings, 3)
    start = clock.now
    results = drive_join(steppers, clock)
    # Reaching max_nodes completes at once, without waiting for the last call.
    assert clock.now - start < settings.timeout.last_call.total_seconds()
    assert {r.world_size for r in results.values()} == {3}
    assert {r.round for r in results.values()} == {0}
    by_key = {key: r.rank for key, r in results.items()}
    assert [by_key[k] for k in sorted(by_key)] == [0, 1, 2]


def test_min_nodes_complete_after_last_call(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=4, last_call=5.0)
    steppers = make_steppers(memory_backend, clock, settings, 2)
    start = clock.now
    results = drive_join(steppers, clock)
    assert 5.0 <= clock.now - start < 7.0
    assert sorted(r.rank for r in results.values()) == [0, 1]


def test_each_step_does_at_most_one_get_and_one_set(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=1)
    (stepper,) = make_steppers(memory_backend, clock, settings, 1)
    stepper.begin_join()
    keyed = memory_backend.supports_keys()
    for op in ("join", "keep_alive", "sync", "increment_restart_count", "leave", "close"):
        memory_backend.reset_counters()
        stepper.step(op)
        # 0 reads when the version probe proves the last state read is still current. A keyed join announces and
        # then takes its first announced step in the same call: a bounded number of small key operations more.
        assert memory_backend.get_calls <= 1 and memory_backend.version_calls <= (2 if keyed else 1), op
        assert memory_backend.set_calls <= 1, op
        assert memory_backend.key_calls <= (12 if keyed else 0), op


def test_lost_compare_and_set_is_retried_not_reported(memory_backend, clock):
    blob_only(memory_backend)
    settings = make_settings(min_nodes=1, max_nodes=2)
    a, b = make_steppers(memory_backend, clock, settings, 2)
    a.begin_join()
    b.begin_join()
    # b reads, then a writes before b's write lands: b must see done=False, no error, retry now.
    original_set = memory_backend.set_state
    interleaved = []

    def set_after_a(state, token=None):
        if not interleaved:
            interleaved.append(True)
            a.step("join")
        return original_set(state, token)

    memory_backend.set_state = set_after_a
    r = b.step("join")
    memory_backend.set_state = original_set
    # Retried almost at once (a little jitter so losers do not collide again in lockstep).
    assert not r.done and r.error is None
    assert clock.monotonic() <= r.wait_until <= clock.monotonic() + b.poll_interval
    assert a.node.key in state_of(memory_backend).participants
    # The retry decides on the state the failed compare-and-set returned: no second read.
    memory_backend.reset_counters()
    r = b.step("join")
    assert memory_backend.get_calls == 0 and memory_backend.set_calls == 1
    assert b.node.key in state_of(memory_backend).participants


def test_waiting_node_polls_fast_then_backs_off_until_something_changes(memory_backend, clock):
    settings = make_settings(min_nodes=3, max_nodes=3, keep_alive=5.0)
    a, b = make_steppers(memory_backend, clock, settings, 2)
    a.begin_join()
    delays = []
    for _ in range(12):
        r = a.step("join")
        delays.append(r.wait_until - clock.monotonic())
        clock.now = r.wait_until
    # First polls are short (a round where everyone arrives together completes in tens of ms)...
    assert min(delays[:2]) <= 0.1
    # ...then grow while nothing changes, never beyond the cap (half the keep-alive interval, at most 1 s).
    assert delays == sorted(delays) and delays[-1] == a.max_poll_interval == 1.0
    if memory_backend.supports_keys():
        return  # keyed arrivals do not touch the state, so nobody has news for a; completion wakes it instead
    b.begin_join()
    b.step("join")  # the state changes: a's next poll is short again
    r = a.step("join")
    assert r.wait_until - clock.monotonic() <= 0.1


def test_bad_poll_intervals_are_one_line_errors(memory_backend, clock):
    with pytest.raises(ValueError, match=r"0 < poll_interval <= max_poll_interval, got 2.0 and 1.0"):
        RendezvousStepper(memory_backend, make_settings(), NodeDesc("h", 1), clock, poll_interval=2.0, max_poll_interval=1.0)


def test_late_node_waits_then_next_round_admits_it(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=3, last_call=2.0)
    first = make_steppers(memory_backend, clock, settings, 2)
    drive_join(first, clock)
    (late,) = make_steppers(memory_backend, clock, settings, 1, first=2)
    late.begin_join()
    r = late.step("join")
    assert not r.done and r.error is None
    state = state_of(memory_backend)
    assert late.node.key in state.wait_list
    assert num_nodes_waiting_in(state, settings, first[0].completed_round) == 1
    # The agents of round 0 re-rendezvous; the late node keeps stepping too.
    results = drive_join([*first, late], clock)
    assert {r.round for r in results.values()} == {1}
    assert sorted(r.rank for r in results.values()) == [0, 1, 2]
    assert state_of(memory_backend).wait_list == []


def test_full_round_does_not_report_waiting_nodes(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=2)
    drive_join(make_steppers(memory_backend, clock, settings, 2), clock)
    (extra,) = make_steppers(memory_backend, clock, settings, 1, first=5)
    extra.begin_join()
    extra.step("join")
    state = state_of(memory_backend)
    assert extra.node.key in state.wait_list
    # No room: re-rendezvous would not admit it, so agents are not told to restart.
    assert num_nodes_waiting_in(state, settings, 0) == 0


def test_silent_node_is_evicted(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2, keep_alive=1.0, attempts=3)
    a, b = make_steppers(memory_backend, clock, settings, 2)
    drive_join([a, b], clock)
    clock.advance(2.0)
    a.step("keep_alive")  # b stays silent
    assert b.node.key in state_of(memory_backend).participants
    clock.advance(1.5)
    a.step("keep_alive")
    # b's stamp is 3.5 s old by the clock, but (keyed) a has only watched it for 1.5 s: staleness is judged by
    # how long an observer saw the same stamp, never by comparing clocks
    assert b.node.key in state_of(memory_backend).participants or not memory_backend.supports_keys()
    clock.advance(2.0)  # watched unchanged for 3.5 s (keyed) / 5.5 s > 3 x 1 s
    a.step("keep_alive")
    state = state_of(memory_backend)
    assert b.node.key not in state.participants and b.node.key not in state.heartbeats
    assert a.node.key in state.participants


def test_close_stops_joining_nodes(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2)
    a, b = make_steppers(memory_backend, clock, settings, 2)
    a.begin_join()
    assert not a.step("join").done
    assert b.step("close").done
    r = a.step("join")
    assert isinstance(r.error, RendezvousClosedError)


def test_join_timeout_reports_error_and_removes_node(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2, join=10.0)
    (a,) = make_steppers(memory_backend, clock, settings, 1)
    a.begin_join()
    a.step("join")
    clock.advance(10.5)
    r = a.step("join")
    assert isinstance(r.error, RendezvousTimeoutError)
    assert "10.0 s" in str(r.error)
    assert a.node.key not in state_of(memory_backend).participants


def test_leave_is_not_close_and_survivors_reform(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=3, last_call=1.0)
    nodes = make_steppers(memory_backend, clock, settings, 3)
    drive_join(nodes, clock)
    assert nodes[2].step("leave").done
    state = state_of(memory_backend)
    assert not state.closed
    assert nodes[2].node.key not in state.participants
    results = drive_join(nodes[:2], clock)
    assert {r.round for r in results.values()} == {1}
    assert sorted(r.rank for r in results.values()) == [0, 1]


def test_restart_count_is_shared_and_survives_leave_and_rejoin(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=2, last_call=1.0)
    a, b = make_steppers(memory_backend, clock, settings, 2)
    drive_join([a, b], clock)
    a.step("increment_restart_count")
    b.step("increment_restart_count")
    b.step("leave")
    a.step("leave")
    drive_join([a, b], clock)
    assert state_of(memory_backend).restart_count == 2


def test_rounds_increase_monotonically(memory_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2)
    nodes = make_steppers(memory_backend, clock, settings, 2)
    rounds = [next(iter(drive_join(nodes, clock).values())).round for _ in range(4)]
    assert rounds == [0, 1, 2, 3]


def test_backend_failure_is_returned_as_connection_error(memory_backend, clock):
    settings = make_settings()
    (a,) = make_steppers(memory_backend, clock, settings, 1)
    a.begin_join()
    memory_backend.fail_next(1)
    r = a.step("join")
    assert isinstance(r.error, RendezvousConnectionError)
    assert a.step("join").error is None


def test_unknown_op_is_a_one_line_error(memory_backend, clock):
    (a,) = make_steppers(memory_backend, clock, make_settings(), 1)
    with pytest.raises(ValueError, match=r"unknown rendezvous step op 'jump'; allowed: join"):
        a.step("jump")


@pytest.mark.parametrize("nodes", [8, 32])
def test_state_stays_compact(memory_backend, clock, nodes):
    settings = make_settings(min_nodes=nodes, max_nodes=nodes)
    drive_join(make_steppers(memory_backend, clock, settings, nodes), clock)
    size = len(memory_backend.get_state()[0])
    # Upstream's pickled state costs ~160 B per node; ours must stay well under that.
    assert size / nodes < 80, size


def test_world_size_is_fixed_at_completion_even_if_peers_leave_before_reading(memory_backend, clock):
    settings = make_settings(min_nodes=3, max_nodes=3)
    a, b, c = make_steppers(memory_backend, clock, settings, 3)
    for s in (a, b, c):
        s.begin_join()
    a.step("join")
    b.step("join")
    rc = c.step("join")
    assert rc.done  # c completes the round
    c.step("leave")
    ra, rb = a.step("join"), b.step("join")
    assert (ra.world_size, rb.world_size) == (3, 3)
    assert {ra.rank, rb.rank, rc.rank} == {0, 1, 2}


def test_events_record_joins_completion_and_eviction(memory_backend, clock):
    from elastic_impl import events

    seen = []
    events.add_listener(seen.append)
    try:
        settings = make_settings(min_nodes=2, max_nodes=2, keep_alive=1.0, attempts=2)
        a, b = make_steppers(memory_backend, clock, settings, 2)
        drive_join([a, b], clock)
        clock.advance(1.0)
        a.step("keep_alive")
        clock.advance(2.5)  # b's stamp unchanged for longer than 2 x 1 s, as a saw it
        a.step("keep_alive")
    finally:
        events.remove_listener(seen.append)
    names = [e.name for e in seen]
    assert names.count("rdzv.join") == 2 and names.count("rdzv.complete") == 2
    assert "rdzv.evict" in names
    complete = [e for e in seen if e.name == "rdzv.complete"]
    assert sorted(e.rank for e in complete) == [0, 1]
    assert {e.pid for e in complete} == {a.node.pid, b.node.pid}


@pytest.mark.parametrize("nodes", [8, 32])
def test_backend_calls_per_node_per_round_are_constant(memory_backend, clock, nodes):
    """Calls stay O(1) per node; bytes are O(N) per call (one blob), so O(N^2) per round: see the module docs."""
    blob_only(memory_backend)
    settings = make_settings(min_nodes=nodes, max_nodes=nodes)
    drive_join(make_steppers(memory_backend, clock, settings, nodes), clock)
    # Everyone arrives at once: each node writes itself in once; all but the completer read once more to see the end.
    assert memory_backend.set_calls == nodes
    assert memory_backend.get_calls == 2 * nodes - 1
    blob = len(memory_backend.get_state()[0])
    assert memory_backend.bytes_written <= nodes * blob


@pytest.mark.parametrize("nodes", [8, 64])
def test_waiting_polls_probe_the_version_not_the_whole_state(memory_backend, clock, nodes):
    """While nothing changes, a waiting node's poll moves a version number, not the O(N) state; a change is seen."""
    blob_only(memory_backend)
    settings = make_settings(min_nodes=nodes + 1, max_nodes=nodes + 1, keep_alive=10.0)
    steppers = make_steppers(memory_backend, clock, settings, nodes)
    for s in steppers:
        s.begin_join()
        s.step("join")
    waiter = steppers[0]
    r = waiter.step("join")  # a full read after its own write
    memory_backend.reset_counters()
    polls, start = 0, clock.now
    while clock.now - start < 3.0:
        clock.now = r.wait_until
        r = waiter.step("join")
        polls += 1
    assert not r.done and polls >= 5
    full_reads, probes, bytes_read = memory_backend.get_calls, memory_backend.version_calls, memory_backend.bytes_read
    # Full reads only when the cached state is older than max_poll_interval (1 s here): about once a second.
    assert full_reads <= 3.0 / waiter.max_poll_interval + 1
    assert probes >= polls
    blob = len(memory_backend.get_state()[0])
    assert bytes_read <= probes * memory_backend.VERSION_BYTES + full_reads * blob
    # Another node's write moves the version: the next poll reads the new state.
    (late,) = make_steppers(memory_backend, clock, settings, 1, first=nodes)
    late.begin_join()
    assert late.step("join").done
    clock.now = r.wait_until
    assert waiter.step("join").done


def test_in_memory_wait_for_change_wakes_on_a_write_and_times_out(memory_backend):
    import threading

    memory_backend.set_state(b"{}")
    version = memory_backend.state_version()
    assert memory_backend.wait_for_change(version, 0.05) is False
    timer = threading.Timer(0.1, lambda: memory_backend.set_state(b"{ }", memory_backend.get_state()[1]))
    timer.start()
    try:
        assert memory_backend.wait_for_change(version, 30) is True
    finally:
        timer.cancel()
    assert memory_backend.state_version() == version + 1


def test_backend_without_versions_is_read_every_step(clock):
    """A backend with only get_state/set_state (like the etcd ones) still works: every step reads the state."""
    from elastic_impl.rendezvous._backend import KeyedStorage, RendezvousBackend, StateVersions
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend

    class BlobOnly(RendezvousBackend):
        def __init__(self):
            self.inner = InMemoryRendezvousBackend()

        @property
        def name(self):
            return "blob-only"

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state, token=None):
            return self.inner.set_state(state, token)

    backend = BlobOnly()
    assert not isinstance(backend, (StateVersions, KeyedStorage))
    settings = make_settings(min_nodes=3, max_nodes=3)
    results = drive_join(make_steppers(backend, clock, settings, 3), clock)
    assert sorted(r.rank for r in results.values()) == [0, 1, 2]
    assert backend.inner.version_calls == 0


def _round_cost(nodes: int, keyed: bool) -> tuple[int, int, int]:
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend
    from tests.rendezvous.conftest import ManualClock

    backend, clock = InMemoryRendezvousBackend(), ManualClock()
    backend.keyed = keyed
    results = drive_join(make_steppers(backend, clock, make_settings(min_nodes=nodes, max_nodes=nodes), nodes), clock)
    assert sorted(r.rank for r in results.values()) == list(range(nodes))
    calls = backend.get_calls + backend.set_calls + backend.version_calls + backend.key_calls
    return calls, backend.bytes_read + backend.bytes_written, backend.set_calls


def test_keyed_round_costs_linear_bytes_and_calls_at_8_64_256_nodes():
    """With keyed storage (c10d, in-memory) a round where everyone arrives together moves O(N) bytes: arrivals are
    O(1)-sized key operations, one node writes the completed state once and publishes per-slot results."""
    cost = {n: _round_cost(n, keyed=True) for n in (8, 64, 256)}
    assert cost[256][1] / cost[64][1] < 5.5 and cost[64][1] / cost[8][1] < 11, cost
    assert cost[256][0] / cost[64][0] < 4.5, cost
    assert {c[2] for c in cost.values()} == {1}, cost  # the state is written once per round


def test_blob_round_cost_grows_linearly_in_calls_at_8_64_256_nodes():
    """Without keyed storage (etcd-v2-like backends) calls stay linear, bytes grow as N^2: every write and full read
    moves the whole O(N) state (see the module docs, "Store traffic")."""
    cost = {n: _round_cost(n, keyed=False) for n in (8, 64, 256)}
    assert cost[256][0] / cost[64][0] < 4.5 and cost[64][0] / cost[8][0] < 9, cost


def _keyed_setup(min_nodes, max_nodes, count, **kw):
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend
    from tests.rendezvous.conftest import ManualClock

    backend, clock = InMemoryRendezvousBackend(), ManualClock()
    settings = make_settings(min_nodes=min_nodes, max_nodes=max_nodes, **kw)
    steppers = make_steppers(backend, clock, settings, count)
    for s in steppers:
        s.begin_join()
    return backend, clock, settings, steppers


def test_keyed_last_call_completes_once_for_everyone():
    backend, clock, settings, (a, b, c) = _keyed_setup(2, 4, 3, last_call=5.0)
    for _ in range(5):  # everyone keeps polling (and heartbeating) through the last call
        for s in (a, b, c):
            assert not s.step("join").done
        clock.advance(1.0)
    clock.advance(0.5)
    results = [s.step("join") for s in (a, b, c)]
    results = [r if r.done else s.step("join") for r, s in zip(results, (a, b, c), strict=True)]
    assert all(r.done for r in results) and backend.set_calls == 1
    assert sorted(r.rank for r in results) == [0, 1, 2] and {r.world_size for r in results} == {3}


def _step_joins(*steppers, clock, passes, advance=1.0, advance_first=False):
    """Step each stepper's join once per pass (moving the clock ``advance`` between passes) until all are done or the
    passes run out; return stepper -> its done StepResult. No step may fail."""
    done = {}
    for _ in range(passes):
        if advance_first:
            clock.advance(advance)
        for s in steppers:
            if s not in done:
                r = s.step("join")
                assert r.error is None
                if r.done:
                    done[s] = r
        if len(done) == len(steppers):
            break
        if not advance_first:
            clock.advance(advance)
    return done


def test_keyed_withdrawn_and_silent_arrivals_are_left_out():
    backend, clock, settings, (a, b, d) = _keyed_setup(2, 3, 3, last_call=5.0, keep_alive=1.0, attempts=3)
    a.step("join")
    b.step("join")
    assert b.step("leave").done  # withdraws b's arrival
    d.step("join")  # d arrives, then goes silent
    clock.advance(5.5)
    r = a.step("join")  # last call over; d's beat is old, but a never watched it change or stay: a watches it
    assert not r.done and r.error is None and state_of(backend).participants == {}
    (c,) = make_steppers(backend, clock, settings, 1, first=7)
    c.begin_join()
    assert not c.step("join").done  # the 4th arrival; a is still judging d
    # d's beat stays the same for longer than the expiry (3 s) while a and c beat
    done = _step_joins(a, c, clock=clock, passes=5, advance_first=True)
    assert set(done) == {a, c}, "a and c must complete without the silent d and the withdrawn b"
    assert {r.world_size for r in done.values()} == {2} and {r.rank for r in done.values()} == {0, 1}
    assert set(state_of(backend).participants) == {a.node.key, c.node.key}


def test_keyed_claim_of_a_dead_completer_is_taken_over():
    backend, clock, settings, (a, b) = _keyed_setup(2, 2, 2, keep_alive=1.0, attempts=3)
    backend.key_set("g0.claim", f"ghost|{clock.time()!r}".encode())  # a completer that died right after claiming
    assert not a.step("join").done
    r = b.step("join")
    assert not r.done and r.error is None
    for _ in range(4):  # the claim grows older than the heartbeat expiry while a and b keep heartbeating
        clock.advance(1.0)
        assert not a.step("join").done
    # a took the claim over first; b's beat looks old to a, who never watched it: a waits for it to change
    assert not b.step("join").done  # b beats (and waits on a's live claim)
    clock.advance(0.5)
    r = a.step("join")
    assert r.done and r.world_size == 2
    assert b.step("join").done


def test_keyed_close_reaches_announced_nodes_and_join_timeout_withdraws():
    backend, clock, settings, (a, b) = _keyed_setup(3, 3, 2, join=10.0)
    a.step("join")
    b.step("join")
    clock.advance(10.5)
    r = a.step("join")
    assert isinstance(r.error, RendezvousTimeoutError) and "2 of min 3" in str(r.error)
    assert backend.key_get_many(["g0.a1"]) == [b"-"]
    (closer,) = make_steppers(backend, clock, settings, 1, first=9)
    assert closer.step("close").done
    b.begin_join()  # b's join timeout re-armed: only the close can stop it now
    b.step("join")
    r = b.step("join")
    assert isinstance(r.error, RendezvousClosedError)


def test_keyed_old_rounds_keys_are_deleted():
    """Keys of round r-1 go away when round r+1 opens, so a long job does not grow the store round after round."""
    backend, clock, settings, nodes = _keyed_setup(3, 3, 3)
    counts = []
    for _ in range(6):
        drive_join(nodes, clock)
        counts.append(backend.key_count())
    assert counts[2] > 0 and counts[-1] == counts[2] == counts[3], counts


# ---------------------------------------------------------------------------------------------- per-node liveness


@pytest.fixture(params=["keyed", "blob"])
def leased_backend(request, clock):
    """The in-memory backend plus per-node liveness that lapses on the manual clock, the way etcd-v3 leases do."""
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend

    class LeasedBackend(InMemoryRendezvousBackend):
        def __init__(self) -> None:
            super().__init__()
            self.expiries: dict[str, float] = {}
            self.beats = 0

        def supports_liveness(self) -> bool:
            return True

        def heartbeat(self, node_key: str, ttl: float) -> None:
            self.beats += 1
            self.expiries[node_key] = clock.now + ttl

        def live_nodes(self) -> set[str]:
            return {k for k, at in self.expiries.items() if at > clock.now}

        def forget(self, node_key: str) -> None:
            self.expiries.pop(node_key, None)

    backend = LeasedBackend()
    backend.keyed = request.param == "keyed"
    return backend


def test_lease_heartbeats_do_not_rewrite_the_state_and_keep_nodes_in(leased_backend, clock):
    settings = make_settings(min_nodes=3, max_nodes=3, keep_alive=1.0, attempts=3)
    steppers = make_steppers(leased_backend, clock, settings, 3)
    drive_join(steppers, clock)
    writes, beats = leased_backend.set_calls, leased_backend.beats
    for _ in range(10):  # 10 keep-alive intervals: far past the 3 s expiry of the join-time timestamps
        clock.advance(1.0)
        for s in steppers:
            assert s.step("keep_alive").done
    assert leased_backend.set_calls == writes
    assert leased_backend.beats - beats == 30
    assert len(state_of(leased_backend).participants) == 3


def test_node_whose_lease_lapses_is_evicted_not_before(leased_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2, keep_alive=1.0, attempts=3)
    survivor, victim = make_steppers(leased_backend, clock, settings, 2)
    drive_join([survivor, victim], clock)
    clock.advance(1.0)
    assert victim.step("keep_alive").done  # its last renewal: live until now + 3 s
    for _ in range(2):
        clock.advance(1.0)
        survivor.step("keep_alive")
        assert victim.node.key in state_of(leased_backend).participants
    clock.advance(1.5)
    survivor.step("keep_alive")
    assert list(state_of(leased_backend).participants) == [survivor.node.key]


def test_leaving_drops_the_nodes_liveness(leased_backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2)
    a, b = make_steppers(leased_backend, clock, settings, 2)
    drive_join([a, b], clock)
    assert leased_backend.live_nodes() == {a.node.key, b.node.key}
    assert b.step("leave").done
    assert leased_backend.live_nodes() == {a.node.key}
    assert list(state_of(leased_backend).participants) == [a.node.key]


def test_a_closed_run_is_not_reopened_by_a_late_node_evicting_its_silent_peers(memory_backend, clock):
    """Seen live (cascade scenario): a node thawed after the others finished and closed the run evicted them, which
    emptied the completed round and opened a new one on the closed run."""
    settings = make_settings(min_nodes=2, max_nodes=3)
    a, b, c = make_steppers(memory_backend, clock, settings, 3)
    drive_join([a, b, c], clock)
    assert a.step("close").done
    closed = state_of(memory_backend)
    clock.now += 10 * settings.heartbeat_expiry_seconds  # a and b are long gone; c wakes up
    c.step("keep_alive")
    c.begin_join()
    r = c.step("join")
    assert isinstance(r.error, RendezvousClosedError)
    after = state_of(memory_backend)
    assert after.closed and after.round == closed.round
    assert sorted(after.participants) == sorted(closed.participants)  # nobody evicted from the closed run


class _SkewedClock:
    """Another node's view of the same manual clock: its wall clock is ``offset`` seconds off, monotonic is fine."""

    def __init__(self, base, offset: float) -> None:
        self.base, self.offset = base, offset

    def monotonic(self) -> float:
        return self.base.monotonic()

    def time(self) -> float:
        return self.base.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.base.sleep(seconds)

    def wait(self, event, timeout):
        return self.base.wait(event, timeout)


@pytest.mark.parametrize("offset", [-8.0, 8.0])
def test_a_node_with_a_skewed_wall_clock_is_not_evicted_while_it_beats(memory_backend, clock, offset):
    settings = make_settings(min_nodes=2, max_nodes=2, keep_alive=1.0, attempts=3)
    (a,) = make_steppers(memory_backend, clock, settings, 1)
    b = RendezvousStepper(memory_backend, settings, NodeDesc("host", 101, 0), _SkewedClock(clock, offset))
    drive_join([a, b], clock)
    for _ in range(12):  # b's stamps are 8 s off a's clock (more than the 3 s expiry) but change every second
        clock.advance(1.0)
        assert b.step("keep_alive").done
        assert a.step("keep_alive").done
    state = state_of(memory_backend)
    assert set(state.participants) == {a.node.key, b.node.key}
    for _ in range(4):  # and once b does fall silent, it is evicted after the expiry as a sees it
        clock.advance(1.0)
        a.step("keep_alive")
    assert set(state_of(memory_backend).participants) == {a.node.key}


@pytest.mark.parametrize("offset", [-8.0, 8.0])
def test_keyed_arrival_with_a_skewed_clock_is_admitted(offset):
    backend, clock, settings, (a,) = _keyed_setup(2, 2, 1, keep_alive=1.0, attempts=3)
    b = RendezvousStepper(backend, settings, NodeDesc("host", 101, 0), _SkewedClock(clock, offset))
    b.begin_join()
    # whoever completes the round sees the other's beat change before it would give up on it
    done = _step_joins(b, a, clock=clock, passes=20, advance=0.5)
    assert set(done) == {a, b} and {r.world_size for r in done.values()} == {2}


@pytest.mark.parametrize("keyed", [True, False])
def test_the_join_tells_the_round_and_the_restart_count_it_completed_with(keyed):
    from elastic_impl.rendezvous.in_memory_backend import InMemoryRendezvousBackend
    from tests.rendezvous.conftest import ManualClock

    backend, clock = InMemoryRendezvousBackend(), ManualClock()
    backend.keyed = keyed
    settings = make_settings(min_nodes=2, max_nodes=2)
    a, b = make_steppers(backend, clock, settings, 2)
    drive_join([a, b], clock)
    assert a.step("increment_restart_count").done and a.step("increment_restart_count").done
    for s in (a, b):  # the next round, opened by a
        s.begin_join()
    drive_join([a, b], clock)
    assert {(s.completed_round, s.completed_restart_count) for s in (a, b)} == {(1, 2)}


# ---------------------------------------------------------------- re-formation after a loss (issue 13)
#
# A round opened by a member of the previous round completes as soon as every surviving member of that round is
# back, without waiting out the last call for nodes nobody expects; a round that anyone else arrives in (a scale-up)
# keeps the last call.


def test_survivors_of_a_leave_reform_without_waiting_out_the_last_call(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=3, last_call=30.0)
    nodes = make_steppers(memory_backend, clock, settings, 3)
    drive_join(nodes, clock)  # 3 = max_nodes: completes at once
    assert nodes[2].step("leave").done
    start = clock.now
    results = drive_join(nodes[:2], clock)
    assert {r.world_size for r in results.values()} == {2}
    assert clock.now - start < 2.0, f"re-formed after {clock.now - start:.1f} s: waited out the last call"


def test_survivors_of_an_eviction_reform_without_waiting_out_the_last_call(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=3, last_call=30.0, keep_alive=1.0, attempts=3)
    a, b, dead = make_steppers(memory_backend, clock, settings, 3)
    drive_join([a, b, dead], clock)
    for _ in range(6):  # the dead node stays silent past the 3 s expiry; the others beat
        clock.advance(1.0)
        a.step("keep_alive")
        b.step("keep_alive")
    assert dead.node.key not in state_of(memory_backend).participants
    start = clock.now
    results = drive_join([a, b], clock)
    assert {r.world_size for r in results.values()} == {2}
    assert clock.now - start < 2.0, f"re-formed after {clock.now - start:.1f} s: waited out the last call"


def test_a_member_that_died_after_the_round_reopened_is_not_waited_for_past_its_eviction(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=3, last_call=30.0, keep_alive=1.0, attempts=3)
    a, b, dead = make_steppers(memory_backend, clock, settings, 3)
    drive_join([a, b, dead], clock)
    start = clock.now
    # a and b re-rendezvous (say, a worker failed) while the third node is already dead: they wait for it only
    # until its silence evicts it (3 s), not for the 30 s last call.
    for s in (a, b):
        s.begin_join()
    pending = {s.node.key: s for s in (a, b)}
    while pending and clock.now - start < 60:
        clock.advance(0.25)
        for key, s in list(pending.items()):
            r = s.step("join")
            assert r.error is None
            if r.done:
                assert r.world_size == 2
                del pending[key]
            s.step("keep_alive")
    assert not pending
    assert clock.now - start < 10.0, f"re-formed after {clock.now - start:.1f} s: waited out the last call"


def test_a_scale_up_keeps_the_last_call(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=4, last_call=5.0)
    a, b, newcomer = make_steppers(memory_backend, clock, settings, 3)
    drive_join([a, b], clock)
    newcomer.begin_join()
    newcomer.step("join")  # waits for the next round: the members re-rendezvous to admit it
    assert num_nodes_waiting_in(state_of(memory_backend), settings, a.completed_round) == 1
    start = clock.now
    results = drive_join([a, b, newcomer], clock)
    assert {r.world_size for r in results.values()} == {3}
    assert clock.now - start >= 5.0, "a round with a new node completed before its last call ended"


def test_a_new_node_arriving_while_members_reform_keeps_the_last_call(memory_backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=4, last_call=5.0)
    a, b, newcomer = make_steppers(memory_backend, clock, settings, 3)
    drive_join([a, b], clock)
    a.begin_join()
    a.step("join")  # a opens the next round; the newcomer arrives in it before b
    start = clock.now
    results = drive_join([newcomer, a, b], clock)
    assert {r.world_size for r in results.values()} == {3}
    assert clock.now - start >= 5.0, "a round with a new node completed before its last call ended"


# ---------------------------------------------------------------- store outages (issue 13.3)
#
# Nobody can renew anything while the store is frozen or unreachable: that silence must not evict anyone.


_STORE_CALLS = ("get_state", "set_state", "state_version", "heartbeat", "live_nodes")


def _freeze_next_read(backend, clock, seconds: float) -> None:
    """The next store call blocks for ``seconds`` (the store is frozen), then answers."""
    originals = {name: getattr(backend, name) for name in _STORE_CALLS if hasattr(backend, name)}

    def frozen(original):
        def call(*args, **kwargs):
            for name, method in originals.items():
                setattr(backend, name, method)
            clock.advance(seconds)
            return original(*args, **kwargs)

        return call

    for name, method in originals.items():
        setattr(backend, name, frozen(method))


def _fail_reads_until(backend, clock, until: float) -> None:
    """Every store call fails (store unreachable) until the manual clock reaches ``until``."""
    from elastic_impl.rendezvous.api import RendezvousConnectionError

    def unreachable(original):
        def call(*args, **kwargs):
            if clock.now < until:
                raise RendezvousConnectionError("store unreachable")
            return original(*args, **kwargs)

        return call

    for name in _STORE_CALLS:
        if hasattr(backend, name):
            setattr(backend, name, unreachable(getattr(backend, name)))


def _beat_both(a, b, clock, seconds: float, step: float = 0.5) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(step)
        a.step("keep_alive")
        b.step("keep_alive")


def test_a_frozen_store_evicts_nobody(memory_backend, clock):
    _frozen_store_evicts_nobody(memory_backend, clock)


def test_a_frozen_store_lets_no_lease_lapse_count(leased_backend, clock):
    _frozen_store_evicts_nobody(leased_backend, clock)


def _frozen_store_evicts_nobody(backend, clock):
    settings = make_settings(min_nodes=2, max_nodes=2, keep_alive=1.0, attempts=3)
    a, b = make_steppers(backend, clock, settings, 2)
    drive_join([a, b], clock)
    _beat_both(a, b, clock, 2.0)
    a.step("sync")  # a has seen b's last stamp before the store froze
    _freeze_next_read(backend, clock, 10.0)  # > the 3 s expiry: every lease and stamp looks lapsed after it
    a.step("keep_alive")
    # b's own call went out during the freeze too and came back at the thaw (steps run one at a time here).
    _freeze_next_read(backend, clock, 1.0)
    b.step("keep_alive")
    _beat_both(a, b, clock, 6.0)
    assert sorted(state_of(backend).participants) == sorted([a.node.key, b.node.key])


def test_an_unreachable_store_evicts_nobody_and_a_real_death_after_it_still_counts(memory_backend, clock):
    _unreachable_store_evicts_nobody(memory_backend, clock)


def test_an_unreachable_store_lets_no_lease_lapse_count(leased_backend, clock):
    _unreachable_store_evicts_nobody(leased_backend, clock)


def _unreachable_store_evicts_nobody(backend, clock):
    settings = make_settings(min_nodes=1, max_nodes=2, keep_alive=1.0, attempts=3)
    a, b = make_steppers(backend, clock, settings, 2)
    drive_join([a, b], clock)
    _beat_both(a, b, clock, 2.0)
    back_at = clock.now + 10.0
    _fail_reads_until(backend, clock, back_at)
    while clock.now + 0.5 < back_at:  # a keeps trying; b (same store) cannot renew either
        clock.advance(0.5)
        assert a.step("keep_alive").error is not None
    last_failure = clock.now
    clock.advance(1.0)
    assert a.step("keep_alive").error is None
    assert b.node.key in state_of(backend).participants, "a peer was evicted for the store's silence"
    # b really died at the outage: it is evicted once the store has answered for a whole expiry (3 s), not before.
    while clock.now + 0.5 <= last_failure + 3.0:
        clock.advance(0.5)
        a.step("keep_alive")
    assert b.node.key in state_of(backend).participants
    # (by observation, b's silence counts from when a first saw its last stamp, up to one step later)
    for _ in range(4):
        clock.advance(0.5)
        a.step("keep_alive")
    assert b.node.key not in state_of(backend).participants
