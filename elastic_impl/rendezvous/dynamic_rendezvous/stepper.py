"""The rendezvous state machine, one step at a time (see the package notes): decisions, store outages."""


from __future__ import annotations

import logging
import random
import threading
from typing import Any

# events named as they are (rdzv.<step>), without the public function's '<file>:' prefix
from elastic_impl.events import _construct_and_record as record_rdzv_event_named
from elastic_impl.events.api import NodeState
from elastic_impl.utils.clock import REAL_CLOCK, Clock

from .._backend import KeyedStorage, NodeLiveness, RendezvousBackend, StateVersions
from ..api import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousTimeoutError,
)
from .keyed import KeyedArrivals
from .liveness import PerNodeLiveness
from .state import (
    STEP_OPS,
    NodeDesc,
    RendezvousSettings,
    RendezvousState,
    StepOp,
    StepResult,
)

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package


class StoreContact:
    """When a node last lost contact with its store: a store call failed, or answered only after a stall.

    Shared by the steppers of one handler (the agent's and the keep-alive's), since either may be the one that
    was blocked in the store while it was frozen, and either may evict.
    """

    def __init__(self) -> None:
        self.lost_at = float("-inf")
        self._lock = threading.Lock()

    @staticmethod
    def stall_seconds(settings: RendezvousSettings) -> float:
        """A store call slower than this counts as an outage: half the smaller of the keep-alive interval and the
        expiry (a slower store could let a live peer's renewal lapse; a faster one cannot)."""
        return min(settings.keep_alive_seconds, settings.heartbeat_expiry_seconds) / 2

    def lost(self, mono: float, settings: RendezvousSettings, why: str) -> None:
        with self._lock:
            first = mono - self.lost_at > settings.heartbeat_expiry_seconds
            self.lost_at = max(self.lost_at, mono)
        if first:
            logger.warning(
                "rendezvous %s: lost contact with the store (%s); no node is evicted for silence until the store has "
                "answered for %.1f s", settings.run_id, why, settings.heartbeat_expiry_seconds,
            )

    def in_contact_for(self, mono: float) -> float:
        return mono - self.lost_at


class RendezvousStepper(KeyedArrivals, PerNodeLiveness):
    """Non-blocking driver of the rendezvous state machine for one node.

    Usage (the handler does exactly this; a simulator does it on virtual time)::

        stepper = RendezvousStepper(backend, settings, node, clock)
        stepper.begin_join()                 # starts the join timeout
        while not (r := stepper.step("join")).done:
            if r.error: raise r.error
            clock.sleep(max(0.0, r.wait_until - clock.monotonic()))
        r.round, r.rank, r.world_size

    Ops: ``join``, ``keep_alive`` (heartbeat, and evict dead nodes), ``leave`` (remove this node), ``close`` (close
    the run), ``sync`` (just read), ``increment_restart_count``. Every step reads the state once and writes it at most
    once; a lost compare-and-set returns ``done=False`` with ``wait_until`` = now, and the step is simply repeated.
    :attr:`state` is the last state seen. Not thread-safe: callers serialize steps.
    """

    def __init__(
        self,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
        node: NodeDesc,
        clock: Clock = REAL_CLOCK,
        poll_interval: float | None = None,
        max_poll_interval: float | None = None,
        versioned_reads: bool = True,
        store_contact: StoreContact | None = None,
    ) -> None:
        self.backend = backend  # (a property: also notes which optional capabilities it offers)
        self.settings = settings
        self.node = node
        self.clock = clock
        # A waiting node re-reads the state after ``poll_interval``; while nothing changes the interval grows by
        # half each poll up to ``max_poll_interval`` (bounded by half the keep-alive interval, so heartbeats stay
        # fresh). Any change seen resets it: a round where nodes arrive together completes in a few short polls
        # instead of waiting out a fixed 1 s period.
        cap = min(1.0, settings.keep_alive_seconds / 2)
        self.max_poll_interval = max_poll_interval if max_poll_interval is not None else cap
        self.poll_interval = poll_interval if poll_interval is not None else min(0.05, self.max_poll_interval)
        if self.poll_interval <= 0 or self.max_poll_interval < self.poll_interval:
            raise ValueError(
                f"rendezvous poll intervals must satisfy 0 < poll_interval <= max_poll_interval, got "
                f"{self.poll_interval} and {self.max_poll_interval}"
            )
        self._idle_polls = 0
        self._last_seen: bytes | None = None
        # The state (and token) a lost compare-and-set returned: the next step decides on it without re-reading.
        # (monotonic time, (state, token)); only reused right away, never for a plain read ("sync").
        self._pending: tuple[float, tuple[bytes, Any]] | None = None
        # Keyed arrivals (see _announce): the (round, slot) this node announced itself in, and its last slot beat.
        self._slot: tuple[int, int] | None = None
        self._slot_beat = float("-inf")
        self._announce_round: int | None = None
        self._cleanup_round: int | None = None
        # The last (round, arrivals, expected members) a re-formation was checked at (see _may_be_reformed).
        self._reform_tried: tuple[int, int, int] | None = None
        # Version-checked reads (see _read): (monotonic time of the full read, version, (state, token) or None).
        self._cached: tuple[float, int, tuple[bytes, Any] | None] | None = None
        # None: not known yet whether the backend has versions. False also when the caller reads too rarely for a
        # version probe to ever save a read (the keep-alive: one read per interval, longer than max_poll_interval).
        self._versioned: bool | None = None if versioned_reads else False
        # The backend's state version that goes with :attr:`state` (None: unknown); callers wait for it to change.
        self.seen_version: int | None = None
        # Deterministic per node (the simulator replays runs): spreads retries after a lost compare-and-set.
        self._jitter = random.Random(node.key)
        self.state = RendezvousState()
        self._join_deadline: float | None = None
        # The round this node last completed (so a new join knows it must open the next one).
        self.completed_round: int | None = None
        # The job-wide restart count as of that round's completion (None: not known without a read).
        self.completed_restart_count: int | None = None
        # Events of the decision in progress; recorded only once its write landed (a lost CAS discards them).
        self._events: list[tuple[str, str, NodeState, int | None]] = []
        # Per-node liveness (backends offering NodeLiveness): when this node last renewed its own liveness
        # (clock.monotonic()), and the live set last read from the backend with when it was read.
        self._beat_at = float("-inf")
        self._live: set[str] | None = None
        self._live_read_at = float("-inf")
        # Heartbeat freshness by local observation: per stamp-bearing thing (a node's state heartbeat, an arrival
        # slot's beat, a round's claim), the value this node last saw and when (its clock.monotonic()) it first
        # saw that value. Something is stale once the same value has been seen for longer than the expiry.
        self._observed: dict[Any, tuple[Any, float, bool]] = {}  # what -> (value, first seen, changed while seen)
        # When this node last failed to reach the store, or waited on it for too long (shared by the steppers of one
        # handler): see "Store outages" in the module notes.
        self.store_contact = store_contact if store_contact is not None else StoreContact()
        self._step_began = float("-inf")

    def _observe(self, what: Any, value: Any) -> tuple[float, bool]:
        """How long (this node's monotonic seconds) ``what`` has shown ``value`` (0 the first time it shows it),
        and whether this node has ever seen it change (which proves its writer was alive then)."""
        mono = self.clock.monotonic()
        seen = self._observed.get(what)
        if seen is None:
            self._observed[what] = (value, mono, False)
            return 0.0, False
        if seen[0] != value:
            self._observed[what] = (value, mono, True)
            return 0.0, True
        return mono - seen[1], seen[2]

    def _silent_for(self, what: Any, value: Any) -> float:
        return self._observe(what, value)[0]

    def _seen_before_live_read(self, s: RendezvousState, key: str) -> bool:
        """Whether the live set was read after this node first saw ``key``'s entry in the state.

        A node renews its liveness before the state lists it, so a live set read after that which lacks it means
        its lease lapsed; one read earlier may simply predate the node. Both times are this node's monotonic clock.
        Called by _evict_dead after it has watched every stamp of ``s``, so the first sighting is on record.
        """
        if key not in s.heartbeats:
            return True
        return self._observed[("hb", key)][1] < self._live_read_at

    def _watch_heartbeats(self, s: RendezvousState) -> None:
        """Start the clock on the stamps of a state this node wrote (it saw them then, as much as on a read)."""
        for key, stamp in s.heartbeats.items():
            if key != self.node.key:
                self._silent_for(("hb", key), stamp)

    def _forget_observed(self, keep) -> None:
        for what in [w for w in self._observed if w not in keep]:
            del self._observed[what]

    def _note(self, name: str, message: str, node_state: NodeState = NodeState.RUNNING, rank: int | None = None) -> None:
        self._events.append((name, message, node_state, rank))

    def _record_events(self) -> None:
        events, self._events = self._events, []
        for name, message, node_state, rank in events:
            record_rdzv_event_named(
                run_id=self.settings.run_id,
                message=message,
                node_state=node_state,
                name=name,
                hostname=self.node.addr,
                pid=self.node.pid,
                local_id=self.node.local_id,
                rank=rank,
            )

    def _read(self, op: str) -> tuple[bytes, Any] | None:
        """The current state and token: reused when provably current, otherwise read from the backend.

        Reused (a) within ``max_poll_interval`` of a lost compare-and-set, which returned the winner's state (not for
        "sync": a plain read must be fresh); (b) when the backend supports versions and its version did not move since the last
        full read, unless that read is older than ``max_poll_interval`` (a writer that died between writing and
        bumping the version cannot hide a change for longer than that).
        """
        mono = self.clock.monotonic()
        pending, self._pending = self._pending, None
        if pending is not None and op != "sync" and mono - pending[0] <= self.max_poll_interval:
            self.seen_version = None
            return pending[1]
        cached = self._cached
        if self._versioned is not False and cached is not None and mono - cached[0] <= self.max_poll_interval:
            version = self._state_version()
            if version is not None and version == cached[1]:
                self.seen_version = version
                return cached[2]
        else:
            version = self._state_version() if self._versioned is not False else None
        if version is None:
            self._versioned = False
        else:
            self._versioned = True
        # The version is read before the state: a write landing in between makes the next probe differ, never the
        # reverse (a version newer than the state it vouches for).
        got = self.backend.get_state()
        self.seen_version = version
        self._cached = (mono, version, got) if version is not None else None
        return got

    @property
    def backend(self) -> RendezvousBackend:
        return self._backend

    @backend.setter
    def backend(self, backend: RendezvousBackend) -> None:
        # Checked once per backend, not per call: an isinstance against a protocol costs tens of microseconds.
        self._backend = backend
        self._offers_versions = isinstance(backend, StateVersions)
        self._offers_keys = isinstance(backend, KeyedStorage)
        self._offers_liveness = isinstance(backend, NodeLiveness)

    def _state_version(self) -> int | None:
        return self._backend.state_version() if self._offers_versions else None

    def switch_backend(self, backend: RendezvousBackend) -> None:
        """Continue on another backend holding the same run (a store failover): nothing read from the old one is
        reused (cached reads, a pending compare-and-set answer, an arrival slot, the live set)."""
        self.backend = backend
        self._pending = None
        self._cached = None
        self.seen_version = None
        self._slot = None
        self._live = None
        self._last_seen = None
        if self._versioned is not False:
            self._versioned = None

    def begin_join(self) -> None:
        """Start a new ``join`` operation: arm its timeout."""
        self._join_deadline = self.clock.time() + self.settings.timeout.join.total_seconds()
        self._slot = None

    def step(self, op: StepOp | str) -> StepResult:
        if op not in STEP_OPS:
            raise ValueError(f"unknown rendezvous step op {op!r}; allowed: {', '.join(STEP_OPS)}")
        op = StepOp(op)
        self._step_began = began = self.clock.monotonic()
        result = self._step(op)
        ended = self.clock.monotonic()
        if ended - began > self.store_contact.stall_seconds(self.settings):
            self.store_contact.lost(ended, self.settings, f"the store took {ended - began:.1f} s to answer")
        return result

    def _step(self, op: str) -> StepResult:
        if op == "join" and self._slot is not None:
            return self._step_announced()
        if op == "leave" and self._slot is not None:
            try:
                self._withdraw()
            except RendezvousError as e:
                return self._store_failed(e)
        self._announce_round = None
        self._cleanup_round = None
        try:
            if self._liveness():
                if op in ("join", "keep_alive"):
                    # Before the state can list this node, its liveness entry must exist (or others evict it).
                    self._beat()
                self._refresh_live()
            got = self._read(op)
        except RendezvousError as e:
            return self._store_failed(e)
        token = None
        state = RendezvousState()
        if got is not None:
            state = RendezvousState.from_bytes(got[0])
            token = got[1]
            if got[0] != self._last_seen:
                self._last_seen = got[0]
                self._idle_polls = 0
        now = self.clock.time()
        mono = self.clock.monotonic()
        self._events = []
        new_state, result = self._decide(op, state, now)
        self.state = state
        if new_state is not None:
            blob = new_state.to_bytes()
            try:
                written = self.backend.set_state(blob, token)
            except RendezvousError as e:
                return self._store_failed(e)
            self._cached = None
            self.seen_version = None
            if written is None or not written[2]:
                self._events = []
                if written is not None:
                    self.state = RendezvousState.from_bytes(written[0])
                    # Aged from when the answer came back: with a slow store the winner's state is still the
                    # freshest there is (the retry's compare-and-set guards it anyway).
                    self._pending = (self.clock.monotonic(), (written[0], written[1]))
                # Retry on the winner's state; a little jitter keeps N losers from colliding again in lockstep.
                return StepResult(done=False, wait_until=mono + self._jitter.uniform(0.0, self.poll_interval / 5))
            self.state = new_state
            self._watch_heartbeats(new_state)
            # Our own write is not news: only others' changes reset the poll backoff.
            self._last_seen = blob
        if result.error is not None:
            self._note("rdzv.error", f"{op} failed: {result.error}", NodeState.FAILED)
        elif result.done and op == "join":
            self._note("rdzv.complete", f"round={result.round} rank={result.rank} world_size={result.world_size}",
                       NodeState.SUCCEEDED, result.rank)
        self._record_events()
        if result.done and op == "join":
            self.completed_round = result.round
            self.completed_restart_count = self.state.restart_count
            self._join_deadline = None
        if self._cleanup_round is not None and new_state is not None:
            self._delete_round_keys(self._cleanup_round)
        if op == "leave" and result.done and self._liveness():
            self._forget()
        if self._announce_round is not None and result.error is None:
            return self._announce(self._announce_round)
        if result.wait_until is not None:
            # Decisions are made on clock.time(); callers wait on clock.monotonic().
            result.wait_until = mono + max(0.0, result.wait_until - now)
        return result

    # ------------------------------------------------------------------ store outages

    def _store_failed(self, error: RendezvousError) -> StepResult:
        self.store_contact.lost(self.clock.monotonic(), self.settings, f"{type(error).__name__}: {error}")
        return StepResult(done=False, error=error)

    def _may_evict(self) -> bool:
        """Whether silence may count as death now: this node has been in contact with the store for a whole
        heartbeat expiry (this step's store calls included), so every peer has had that long to show a sign of life."""
        mono = self.clock.monotonic()
        waited = mono - self._step_began
        if waited > self.store_contact.stall_seconds(self.settings):
            self.store_contact.lost(mono, self.settings, f"the store took {waited:.1f} s to answer")
        return self.store_contact.in_contact_for(mono) > self.settings.heartbeat_expiry_seconds

    # ------------------------------------------------------------------ decisions (pure: state in, state out)

    def _decide(self, op: str, state: RendezvousState, now: float) -> tuple[RendezvousState | None, StepResult]:
        s = state.copy()
        # A closed run's membership no longer matters: evicting from it would only reopen rounds nobody may join.
        changed = self._evict_dead(s, now) if not s.closed else False
        me = self.node.key
        if op == "sync":
            return (s if changed else None), StepResult(done=True)
        if op == "close":
            s.closed = True
            self._note("rdzv.close", f"closed the run at round {s.round}")
            return s, StepResult(done=True)
        if op == "increment_restart_count":
            s.restart_count += 1
            return s, StepResult(done=True)
        if op == "leave":
            if self._remove(s, me):
                changed = True
                self._note("rdzv.leave", f"left at round {s.round}")
            return (s if changed else None), StepResult(done=True)
        if op == "keep_alive":
            # With per-node liveness the heartbeat already happened (a lease renewal): only evictions write.
            if (me in s.participants or me in s.wait_list or me in (s.expected or ())) and not self._liveness():
                s.heartbeats[me] = now
                changed = True
            return (s if changed else None), StepResult(done=True)
        return self._decide_join(s, changed, now)

    def _decide_join(self, s: RendezvousState, changed: bool, now: float) -> tuple[RendezvousState | None, StepResult]:
        me = self.node.key
        settings = self.settings
        if s.closed:
            return None, StepResult(done=False, error=RendezvousClosedError(f"rendezvous run {settings.run_id!r} is closed"))
        if self._join_deadline is not None and now > self._join_deadline:
            if not s.complete or me not in s.participants:
                changed |= self._remove(s, me)
            error = RendezvousTimeoutError(
                f"rendezvous run {settings.run_id!r} round {s.round} did not complete within the join timeout of "
                f"{settings.timeout.join.total_seconds()} s ({len(s.participants)} of min {settings.min_nodes} nodes joined)"
            )
            return (s if changed else None), StepResult(done=False, error=error)

        # A stamp from the future (this node's clock stepped back) is due as well: others only look for a change.
        since_beat = now - s.heartbeats.get(me, float("-inf"))
        heartbeat_due = not (0.0 <= since_beat < settings.keep_alive_seconds / 2) and not self._liveness()
        poll_until = now + self._next_poll_delay()

        if s.complete and not s.participants:
            self._open_next_round(s, now)
            changed = True
        if s.complete:
            if me in s.participants:
                if s.round != self.completed_round:
                    result = StepResult(done=True, round=s.round, rank=s.participants[me], world_size=s.world_size)
                    return (s if changed else None), result
                # A participant of the round it already got asks for the next one: open it.
                self._open_next_round(s, now)
                self._note("rdzv.open_round", f"opened round {s.round}")
                if self._keyed():
                    self._announce_round = s.round  # joins it like every other arrival
                    # Nobody reads the keys of the round before the one just completed any more: drop them.
                    self._cleanup_round = s.round - 2 if s.round >= 2 else None
                    return s, StepResult(done=False, wait_until=now)
                # The promoted waiters may already fill the round: then the opener waits for the next one too.
                if len(s.participants) < settings.max_nodes:
                    s.participants[me] = -1
                else:
                    s.wait_list.append(me)
                s.heartbeats[me] = now
                return s, StepResult(done=False, wait_until=now)
            if me not in s.wait_list:
                s.wait_list.append(me)
                s.heartbeats[me] = now
                changed = True
                self._note("rdzv.wait", f"waiting for the round after {s.round}")
            elif heartbeat_due:
                s.heartbeats[me] = now
                changed = True
            return (s if changed else None), StepResult(done=False, wait_until=poll_until)

        # The round is open.
        if me not in s.participants and self._keyed():
            # Arrive without rewriting the state (O(1) bytes); the node completing the round adds everyone at once.
            self._announce_round = s.round
            return (s if changed else None), StepResult(done=False, wait_until=now)
        if me not in s.participants:
            if len(s.participants) < settings.max_nodes:
                if me in s.wait_list:
                    s.wait_list.remove(me)
                s.participants[me] = -1
                self._note("rdzv.join", f"joined round {s.round}")
            elif me not in s.wait_list:
                s.wait_list.append(me)
            s.heartbeats[me] = now
            changed = True
        elif heartbeat_due:
            s.heartbeats[me] = now
            changed = True
        if me not in s.participants:
            return (s if changed else None), StepResult(done=False, wait_until=poll_until)

        count = len(s.participants)
        if (count >= settings.max_nodes or (count >= settings.min_nodes and s.deadline is not None and now >= s.deadline)
                or self._reformed(s)):
            self._complete(s)
            result = StepResult(done=True, round=s.round, rank=s.participants[me], world_size=count)
            return s, result
        if count >= settings.min_nodes:
            if s.deadline is None:
                s.deadline = now + settings.timeout.last_call.total_seconds()
                changed = True
            return (s if changed else None), StepResult(done=False, wait_until=min(s.deadline, poll_until))
        if s.deadline is not None:
            s.deadline = None
            changed = True
        return (s if changed else None), StepResult(done=False, wait_until=poll_until)

    def _reformed(self, s: RendezvousState) -> bool:
        """Whether the open round holds exactly the members expected back, enough of them, and nobody else."""
        return (s.expected is not None and len(s.participants) >= self.settings.min_nodes
                and set(s.participants) == set(s.expected) and not s.wait_list)

    def _next_poll_delay(self) -> float:
        delay = min(self.max_poll_interval, self.poll_interval * (1.5 ** self._idle_polls))
        self._idle_polls = min(self._idle_polls + 1, 64)
        return delay

    def _complete(self, s: RendezvousState) -> None:
        for rank, key in enumerate(sorted(s.participants)):
            s.participants[key] = rank
        s.complete = True
        s.deadline = None
        s.expected = None
        s.world_size = len(s.participants)

    def _open_next_round(self, s: RendezvousState, now: float) -> None:
        """Round r+1: empty, with waiting nodes promoted (up to max_nodes, in arrival order).

        With keyed arrivals the waiting nodes stay on the wait list (still counted by ``num_nodes_waiting``) and
        announce themselves in the new round like everyone else; the completing node takes them off the list.
        """
        members = sorted(s.participants)
        # Only the members of the round just ended are expected back; with anyone waiting it is a scale-up.
        s.expected = members if members and not s.wait_list else None
        s.round += 1
        s.complete = False
        s.deadline = None
        s.world_size = 0
        # Expected members keep their heartbeat entry: one that died before coming back is evicted (and no longer
        # waited for) like any silent node.
        keep = set(s.wait_list) | set(members if s.expected is not None else ())
        s.participants = {}
        if not self._keyed():
            while s.wait_list and len(s.participants) < self.settings.max_nodes:
                s.participants[s.wait_list.pop(0)] = -1
        s.heartbeats = {k: v for k, v in s.heartbeats.items() if k in keep}

    def _remove(self, s: RendezvousState, key: str) -> bool:
        present = key in s.participants or key in s.wait_list or key in s.heartbeats
        s.participants.pop(key, None)
        if key in s.wait_list:
            s.wait_list.remove(key)
        s.heartbeats.pop(key, None)
        if s.expected is not None and key in s.expected:
            s.expected.remove(key)
            present = True
            if not s.expected:
                s.expected = None
        if s.complete and not s.participants and not s.closed:
            # Nobody is left in the completed round: the next one opens for whoever comes (waiters first).
            self._open_next_round(s, 0.0)
        elif not s.complete and len(s.participants) < self.settings.min_nodes:
            s.deadline = None
        return present

    def _evict_dead(self, s: RendezvousState, now: float) -> bool:
        expiry = self.settings.heartbeat_expiry_seconds
        me = self.node.key
        # Every stamp is watched on every read, whatever the verdict needs: staleness is judged on this node's clock
        # (how long it has seen the same stamp, see the module notes), so the watch must start early.
        silent = {k: self._silent_for(("hb", k), t) for k, t in s.heartbeats.items() if k != me}
        self._forget_observed(
            {("hb", k) for k in silent} | {w for w in self._observed if w[0] != "hb" and w[1] >= s.round - 1}
        )
        if self._liveness():
            live = self._live
            if live is None:
                return False
            # The state's timestamp is the node's join time here (keep-alives renew leases, not the state): a node
            # listed only after the live set was read may be missing from it without being dead.
            members = set(s.participants) | set(s.wait_list) | set(s.heartbeats) | set(s.expected or ())
            dead = sorted(k for k in members if k != me and k not in live and self._seen_before_live_read(s, k))
            why = "its liveness lease lapsed"
        else:
            dead = [k for k, quiet in silent.items() if quiet > expiry]
            # Nodes present without a heartbeat entry cannot be judged; they are removed with their first heartbeat lapse.
            why = f"heartbeat unchanged for > {expiry} s"
        if dead and not self._may_evict():
            return False  # the store itself was silent lately: so was everyone
        for key in dead:
            logger.warning("rendezvous %s: evicting node %s (%s)", self.settings.run_id, key, why)
            self._remove(s, key)
            self._note("rdzv.evict", f"evicted {key} at round {s.round} ({why})")
        return bool(dead)
