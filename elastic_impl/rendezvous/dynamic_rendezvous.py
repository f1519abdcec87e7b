"""The dynamic rendezvous: a state machine over a :class:`RendezvousBackend`, plus the handler that drives it.

Semantics (one "run" = one run id; it goes through numbered rounds):

- A round is *open* while nodes join it. Once ``min_nodes`` have joined, a *last call* window of
  ``timeout.last_call`` starts; the round *completes* when ``max_nodes`` have joined or when the last call ends.
  Ranks are ``0..world_size-1``, assigned by sorting the participants' node keys (deterministic, contiguous).
- Nodes that arrive while a round is complete go on the *wait list*; ``num_nodes_waiting()`` counts them (only while
  the round has room, i.e. fewer than ``max_nodes`` participants), which tells agents to re-rendezvous.
- A participant of a completed round that calls ``next_rendezvous`` again opens round ``r+1``: it becomes a
  participant of the new round with the waiting nodes promoted (with keyed storage: everyone, waiting nodes
  included, arrives in the new round like a fresh node); the other old participants rejoin as they notice
  (``num_nodes_waiting() > 0`` for them once the round moved on, or ``get_participants()`` changed).
- Re-formation (not upstream: there every round waits out the last call once ``min_nodes`` are in). A round
  opened by a member of the round just ended, with nobody on the wait list, *expects* back exactly that round's
  members (``RendezvousState.expected``); it completes as soon as all of them still in the run have arrived (at least
  ``min_nodes``), without the last call: after a worker failure, a node leaving, or a dead node's eviction, nobody
  else is coming. A member that leaves or is evicted stops being expected; one that died before coming back is
  evicted after its heartbeat expiry like any silent node. A round anyone else arrives in, or opened while nodes
  wait (a scale-up), keeps the last call, so nodes starting together are still gathered into one round.
- Every node heartbeats (``keep_alive_interval``) into the state; a node whose heartbeat has not changed for
  ``keep_alive_interval * keep_alive_max_attempt`` is evicted by whichever node next touches the state. Staleness
  is judged by each observer on its own monotonic clock (how long it has seen the same stamp), never by comparing
  another node's wall-clock stamp with its own: a node whose wall clock is off (a bad NTP step) is not taken for
  dead (upstream compares wall clocks and evicts it). The price: a node that has just started observing gives a
  silent peer the full expiry before evicting it. With a
  backend that has per-node liveness (``supports_liveness()``, etcd-v3: leases as heartbeats) a heartbeat renews
  the node's lease instead of rewriting the state, and the nodes the backend no longer lists as live are evicted
  (the state's timestamp is then only the node's join time: a node is given the expiry after joining before an
  absent liveness entry counts against it).
- Store outages (not upstream). Silence only counts against a peer while this node could reach the store: nobody
  can renew anything while the store is frozen or unreachable, and a frozen etcd revokes every lease that lapsed
  when it thaws. A store call that fails, or that answers only after half the keep-alive interval (a stall), marks
  an outage (:class:`StoreContact`, shared by a handler's two steppers, logged once at WARNING); no node is evicted
  until the store has answered for a whole heartbeat expiry since, by which time every live peer has renewed.
  Evictions themselves are logged at WARNING with their reason.
- ``set_closed()`` closes the run: every node's next step raises ``RendezvousClosedError``. ``shutdown()`` also
  closes it (as upstream does: it is what a launcher calls when the job ends). ``leave()`` (an extension) only
  removes this node; survivors re-form without it and the run stays open.
- The state carries a job-wide ``restart_count`` (``increment_restart_count()`` / ``get_restart_count()``) that all
  nodes share and that leaving/rejoining cannot reset.

Simulator seam. :class:`RendezvousStepper` runs the state machine one step at a time, with no threads and no
sleeping: each ``step(op)`` does at most one ``get_state`` and at most one ``set_state`` on the backend (with keyed
storage, plus a bounded number of small key operations; the step that completes a round reads and writes one key
per arrival) and returns a :class:`StepResult` saying whether the operation finished and, if not, until when (``clock.monotonic()`` scale) the
caller should wait before stepping again. Heartbeat stamps use ``clock.time()`` but are only compared for change
(see above); the last-call deadline is the one shared wall-clock time (a skewed node only sees it end early/late).
:class:`DynamicRendezvousHandler` is a thin loop around a stepper plus a keep-alive thread (with a stepper, and where
the backend offers one a store connection, of its own: heartbeats never queue behind the agent's polls).

Polling and waking. A waiting node polls after 0.05 s, backing off by half each quiet poll up to
``min(1 s, keep_alive/2)``; any change by another node resets the backoff. After a lost compare-and-set the step
is retried (with a little per-node jitter) on the state the failed write returned, without re-reading. Backends
that implement the optional ``state_version()`` let a poll move one integer instead of the whole state (a full
read still happens at least every ``max_poll_interval``), and ``wait_for_change()`` lets the handler wake as soon
as another node writes instead of sleeping out the poll interval (c10d: ``TCPStore.wait`` on a per-version key).
Backends with only get_state/set_state (etcd-v2) run the same state machine and simply re-read on every poll.

Store traffic. The state is one compact JSON blob (~40 B per node: key, rank, millisecond heartbeat; upstream's
pickled state is ~160 B per node). With a backend that has keyed storage (c10d, etcd-v3, in-memory) a node
arriving in an open round does not rewrite the blob: it announces itself with O(1)-sized key operations and one node
completes the round for everyone (see "keyed arrivals" below), so a round where N nodes arrive together writes the
blob once and moves O(N) bytes in total (in-memory backend: N=8: 1.5 kB, N=64: 12 kB, N=256: 50 kB). Backends with
only get_state/set_state (etcd-v2; etcd-v3 with ``keyed_arrivals=false``) run the same rules with every arrival
rewriting the blob: O(1) calls per node but O(N^2) bytes per round (N=8: 5.3 kB, N=64: 322 kB, N=256: 5.2 MB). Not O(N) on either path: anything that hands
every node the full membership, i.e. ``get_participants()``/``sync`` reads of a completed round's blob (the agent
polls them to notice membership changes; the version probe keeps those polls O(1) while nothing changes), the
first read of a completed round by each node that re-rendezvouses, and keep-alive heartbeats of a completed round,
which still rewrite the blob (N nodes x O(N) bytes per keep-alive interval) except with per-node liveness (etcd-v3
leases), where a heartbeat is one O(1) lease renewal and the blob is only read.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from elastic_impl.events import construct_and_record_rdzv_event
from elastic_impl.events.api import NodeState
from elastic_impl.utils.clock import REAL_CLOCK, Clock

from ._backend import RendezvousBackend
from .api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)
from .options import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_JOIN_TIMEOUT,
    DEFAULT_KEEP_ALIVE_INTERVAL,
    DEFAULT_KEEP_ALIVE_MAX_ATTEMPT,
    DEFAULT_LAST_CALL_TIMEOUT,
    check_run_id,
    keep_alive_options,
    option_seconds,
    timeout_seconds,
)

__all__ = [
    "DynamicRendezvousHandler",
    "NodeDesc",
    "RendezvousBackend",
    "RendezvousSettings",
    "RendezvousState",
    "RendezvousStepper",
    "RendezvousTimeout",
    "StepResult",
    "StoreContact",
    "create_handler",
]

logger = logging.getLogger(__name__)

STEP_OPS = ("join", "keep_alive", "close", "leave", "sync", "increment_restart_count")


def get_method_name(depth: int = 2) -> str:
    """The name of the function ``depth`` frames up the call stack (0: this function, 1: its caller, 2: the
    caller's caller), or ``"no_method_name"`` when the stack is not that deep."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:  # the stack is shallower than depth
        return "no_method_name"


class RendezvousTimeout:
    """Timeouts of the dynamic rendezvous (defaults: join 600 s, last call 30 s, close 30 s, heartbeat 5 s).

    Each accepts a ``timedelta`` (like upstream) or a number of seconds, within the bounds of the ``--rdzv-conf``
    option that sets it (``options.timeout_seconds``: positive, finite, at most 30 days; the heartbeat at least
    10 ms); anything else raises a one-line ValueError naming the value.
    """

    def __init__(
        self,
        join: timedelta | None = None,
        last_call: timedelta | None = None,
        close: timedelta | None = None,
        heartbeat: timedelta | None = None,
    ) -> None:
        self._join = timedelta(seconds=timeout_seconds("join", join, DEFAULT_JOIN_TIMEOUT))
        self._last_call = timedelta(seconds=timeout_seconds("last_call", last_call, DEFAULT_LAST_CALL_TIMEOUT))
        self._close = timedelta(seconds=timeout_seconds("close", close, DEFAULT_CLOSE_TIMEOUT))
        self._heartbeat = timedelta(seconds=timeout_seconds("heartbeat", heartbeat, DEFAULT_KEEP_ALIVE_INTERVAL))

    @property
    def join(self) -> timedelta:
        """How long a node waits for a round to complete."""
        return self._join

    @property
    def last_call(self) -> timedelta:
        """How long a round with ``min_nodes`` waits for more before completing."""
        return self._last_call

    @property
    def close(self) -> timedelta:
        """How long closing (or leaving) may take."""
        return self._close

    @property
    def heartbeat(self) -> timedelta:
        """Keep-alive interval."""
        return self._heartbeat

    def __repr__(self) -> str:
        return (
            f"RendezvousTimeout(join={self._join.total_seconds()}, last_call={self._last_call.total_seconds()}, "
            f"close={self._close.total_seconds()}, heartbeat={self._heartbeat.total_seconds()})"
        )


@dataclass(repr=False)
class RendezvousSettings:
    """Settings of one run's dynamic rendezvous; ``keep_alive_interval`` is a timedelta or seconds."""

    run_id: str
    min_nodes: int
    max_nodes: int
    timeout: RendezvousTimeout
    keep_alive_interval: timedelta | float
    keep_alive_max_attempt: int

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if not isinstance(self.min_nodes, int) or self.min_nodes < 1:
            raise ValueError(f"rendezvous min_nodes must be an integer >= 1, got {self.min_nodes!r}")
        if not isinstance(self.max_nodes, int) or self.max_nodes < self.min_nodes:
            raise ValueError(f"rendezvous max_nodes must be an integer >= min_nodes ({self.min_nodes}), got {self.max_nodes!r}")
        seconds = timeout_seconds("keep_alive_interval", self.keep_alive_interval, DEFAULT_KEEP_ALIVE_INTERVAL)
        self.keep_alive_interval = timedelta(seconds=seconds)
        if not isinstance(self.keep_alive_max_attempt, int) or self.keep_alive_max_attempt < 1:
            raise ValueError(f"rendezvous keep_alive_max_attempt must be an integer >= 1, got {self.keep_alive_max_attempt!r}")

    @property
    def keep_alive_seconds(self) -> float:
        return self.keep_alive_interval.total_seconds()

    @property
    def heartbeat_expiry_seconds(self) -> float:
        """A node silent for longer than this is evicted."""
        return self.keep_alive_seconds * self.keep_alive_max_attempt

    def __repr__(self) -> str:
        return (
            f"RendezvousSettings(run_id={self.run_id!r}, min_nodes={self.min_nodes}, max_nodes={self.max_nodes}, "
            f"timeout={self.timeout!r}, keep_alive_interval={self.keep_alive_seconds}, "
            f"keep_alive_max_attempt={self.keep_alive_max_attempt})"
        )


@dataclass(frozen=True, order=True)
class NodeDesc:
    """Identifies one rendezvous participant: host address, process id, and a per-process counter."""

    addr: str
    pid: int
    local_id: int = 0

    @property
    def key(self) -> str:
        """The compact key the node has in the shared state (also its sort key for rank assignment)."""
        return f"{self.addr}_{self.pid}_{self.local_id}"

    def __str__(self) -> str:
        return self.key


_node_counter_lock = threading.Lock()
_node_counter = 0


def new_node_desc(local_addr: str | None = None) -> NodeDesc:
    """A NodeDesc unique to this process (each handler in a process gets a fresh ``local_id``)."""
    global _node_counter
    with _node_counter_lock:
        local_id = _node_counter
        _node_counter += 1
    return NodeDesc(local_addr or socket.getfqdn(), os.getpid(), local_id)


@dataclass
class RendezvousState:
    """The shared state of a run, serialized compactly as JSON.

    ``participants`` maps node key -> rank (-1 until the round completes); ``heartbeats`` maps node key -> last
    heartbeat (``clock.time()``); ``deadline`` is the end of the last call (``clock.time()``) or None.
    """

    round: int = 0
    complete: bool = False
    closed: bool = False
    deadline: float | None = None
    participants: dict[str, int] = field(default_factory=dict)
    wait_list: list[str] = field(default_factory=list)
    heartbeats: dict[str, float] = field(default_factory=dict)
    restart_count: int = 0
    # Size of the round when it completed (participants may leave afterwards; late readers still need it).
    world_size: int = 0
    # Of an open round re-formed by the members of the previous one: the members still expected back (see
    # "Re-formation" in the module notes). None: a first round, or a scale-up; the last call applies as usual.
    expected: list[str] | None = None

    def to_bytes(self) -> bytes:
        # Millisecond heartbeats keep the blob small; nothing here needs finer resolution.
        data = {"r": self.round, "p": self.participants, "h": {k: round(v, 3) for k, v in self.heartbeats.items()}}
        if self.complete:
            data["c"] = 1
        if self.closed:
            data["x"] = 1
        if self.deadline is not None:
            data["d"] = round(self.deadline, 3)
        if self.wait_list:
            data["w"] = self.wait_list
        if self.restart_count:
            data["n"] = self.restart_count
        if self.world_size:
            data["s"] = self.world_size
        if self.expected is not None:
            data["e"] = self.expected
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> RendezvousState:
        try:
            data = json.loads(blob)
            return cls(
                round=int(data["r"]),
                complete=bool(data.get("c", 0)),
                closed=bool(data.get("x", 0)),
                deadline=data.get("d"),
                participants={str(k): int(v) for k, v in data["p"].items()},
                wait_list=[str(k) for k in data.get("w", [])],
                heartbeats={str(k): float(v) for k, v in data["h"].items()},
                restart_count=int(data.get("n", 0)),
                world_size=int(data.get("s", 0)),
                expected=None if data.get("e") is None else [str(k) for k in data["e"]],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RendezvousStateError(f"rendezvous state is corrupt ({type(e).__name__}: {e}): {blob[:80]!r}") from None

    def copy(self) -> RendezvousState:
        return RendezvousState(
            self.round,
            self.complete,
            self.closed,
            self.deadline,
            dict(self.participants),
            list(self.wait_list),
            dict(self.heartbeats),
            self.restart_count,
            self.world_size,
            None if self.expected is None else list(self.expected),
        )


@dataclass
class StepResult:
    """Outcome of one :meth:`RendezvousStepper.step`.

    ``done``: the operation finished (for ``join``: this node is in a completed round, ``round``/``rank``/
    ``world_size`` are set). ``error``: the operation failed for good (closed, timed out, backend unreachable);
    raise it. Otherwise step again at ``wait_until`` (``clock.monotonic()`` scale; "now" after a lost
    compare-and-set).
    """

    done: bool
    wait_until: float | None = None
    error: RendezvousError | None = None
    round: int | None = None
    rank: int | None = None
    world_size: int | None = None


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


class RendezvousStepper:
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
        self.backend = backend
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
        # Per-node liveness (backends with supports_liveness()): when this node last renewed its own liveness
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
            construct_and_record_rdzv_event(
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
            version = self.backend.state_version()
            if version is not None and version == cached[1]:
                self.seen_version = version
                return cached[2]
        else:
            version = self.backend.state_version() if self._versioned is not False else None
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

    def step(self, op: str) -> StepResult:
        if op not in STEP_OPS:
            raise ValueError(f"unknown rendezvous step op {op!r}; allowed: {', '.join(STEP_OPS)}")
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

    # ------------------------------------------------------------------ keyed arrivals (O(N) bytes per round)
    #
    # With a backend that has keyed storage, a node arriving in an open round does not rewrite the state. Keys of
    # round R (the backend namespaces them by run id): ``gR.n`` arrival counter (atomic add gives each arrival its
    # slot i), ``gR.a<i>`` the node key in slot i ("-": withdrawn), ``gR.h<i>`` the slot's heartbeat, ``gR.dl`` the
    # last-call deadline (first writer wins), ``gR.claim`` who completes the round ("<node>|<time>"; "-": released),
    # ``gR.r<i>`` slot i's result ("<rank>,<world size>,<restart count>" or "wait"); the claim becomes "!" once all results are out.
    # The node whose arrival reaches max_nodes, or any node once the last call ended with min_nodes arrived, claims
    # the round, reads the slots once, applies the same join rules to each live arrival (participant while there is
    # room, else the wait list; ranks by sorted node key), writes the completed state once and publishes the
    # results. Everyone else only reads its own result key. The state of an open round holds no participants, so
    # reading it stays cheap; a claim older than the heartbeat expiry (a completer that died) can be taken over.

    def _keyed(self) -> bool:
        return bool(self.backend.supports_keys())

    @staticmethod
    def _k(round_: int, name: str) -> str:
        return f"g{round_}.{name}"

    def _delete_round_keys(self, round_: int) -> None:
        """Remove an old round's keys (O(N) deletes by the one node that opened a newer round)."""
        k = self._k
        try:
            arrived = self.backend.key_add(k(round_, "n"), 0)
            keys = [k(round_, name) for name in ("n", "dl", "claim")]
            keys += [k(round_, f"{kind}{j}") for j in range(1, arrived + 1) for kind in ("a", "h", "r")]
            self.backend.key_delete_many(keys)
        except RendezvousError as e:  # leftovers cost memory, not correctness
            logger.debug("rendezvous %s: could not delete keys of round %s: %s", self.settings.run_id, round_, e)

    def _withdraw(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self.backend.key_set(self._k(slot[0], f"a{slot[1]}"), b"-")

    def _announce(self, round_: int) -> StepResult:
        self._announce_round = None
        now = self.clock.time()
        try:
            slot = self.backend.key_add(self._k(round_, "n"), 1)
            self.backend.key_set(self._k(round_, f"a{slot}"), self.node.key.encode())
            self.backend.key_set(self._k(round_, f"h{slot}"), repr(now).encode())
        except RendezvousError as e:
            return self._store_failed(e)
        self._slot, self._slot_beat = (round_, slot), self.clock.monotonic()
        self._events = []
        self._note("rdzv.join", f"joined round {round_}")
        self._record_events()
        return self._step_announced()

    def _step_announced(self) -> StepResult:
        assert self._slot is not None
        round_, slot = self._slot
        settings = self.settings
        now, mono = self.clock.time(), self.clock.monotonic()
        self._events = []
        k = self._k
        try:
            mine, claim = self.backend.key_get_many([k(round_, f"r{slot}"), k(round_, "claim")])
            done = claim == _ROUND_DONE
            if mine is not None:
                self._slot = None
                if mine == b"wait":
                    # The round filled up before this node: it is on the wait list now, like a late classic arrival.
                    return StepResult(done=False, wait_until=mono)
                rank, world_size, *restarts = (int(x) for x in mine.split(b","))
                return self._finish_join(round_, rank, world_size, restarts[0] if restarts else None)
            if done:
                # Completed without this node (taken for dead, or arrived too late): start over on the state.
                self._slot = None
                return StepResult(done=False, wait_until=mono)
            if self._join_deadline is not None and now > self._join_deadline:
                arrived = self.backend.key_add(k(round_, "n"), 0)
                self._withdraw()
                error = RendezvousTimeoutError(
                    f"rendezvous run {settings.run_id!r} round {round_} did not complete within the join timeout of "
                    f"{settings.timeout.join.total_seconds()} s ({arrived} of min {settings.min_nodes} nodes joined)"
                )
                self._note("rdzv.error", f"join failed: {error}", NodeState.FAILED)
                self._record_events()
                return StepResult(done=False, error=error)
            if mono - self._slot_beat >= settings.keep_alive_seconds / 2:
                self.backend.key_set(k(round_, f"h{slot}"), repr(now).encode())
                self._slot_beat = mono
            if self._liveness():
                self._beat()
                self._refresh_live()
            claim_live = (claim is not None and claim != _CLAIM_RELEASED
                          and not claim.startswith(self.node.key.encode() + b"|")  # ours: finish the job
                          and self._silent_for(("claim", round_), claim) <= settings.heartbeat_expiry_seconds)
            if claim_live:
                # Someone is completing the round: wait for the results without reading the state (it is about to
                # hold every participant).
                self.seen_version = None
                return StepResult(done=False, wait_until=mono + self.poll_interval)
            got = self._read("join")
        except RendezvousError as e:
            return self._store_failed(e)
        state = RendezvousState.from_bytes(got[0]) if got is not None else RendezvousState()
        self.state = state
        if state.closed:
            try:
                self._withdraw()
            except RendezvousError:
                pass
            return StepResult(done=False, error=RendezvousClosedError(f"rendezvous run {settings.run_id!r} is closed"))
        if state.round != round_ or state.complete:
            # The round is over or was replaced (everyone left and it reopened): start over on the state.
            self._slot = None
            return StepResult(done=False, wait_until=mono)
        try:
            arrived = self.backend.key_add(k(round_, "n"), 0)
            deadline = None
            if arrived >= settings.min_nodes:
                # One call either starts the last call (first node to see min_nodes) or reads when it ends.
                proposed = repr(now + settings.timeout.last_call.total_seconds()).encode()
                deadline = float(self.backend.key_compare_set(k(round_, "dl"), None, proposed))
            if (arrived >= settings.max_nodes or (deadline is not None and now >= deadline)
                    or self._may_be_reformed(round_, arrived, state)):
                return self._try_complete(round_, arrived, claim, state, got, now, mono, deadline)
        except RendezvousError as e:
            return self._store_failed(e)
        poll_until = now + self._next_poll_delay()
        wait_until = min(deadline, poll_until) if deadline is not None else poll_until
        return StepResult(done=False, wait_until=mono + max(0.0, wait_until - now))

    def _try_complete(self, round_, arrived, claim, state, got, now, mono, deadline) -> StepResult:
        settings, k, me = self.settings, self._k, self.node.key
        mine = f"{me}|{now!r}".encode()
        if self.backend.key_compare_set(k(round_, "claim"), claim, mine) != mine:
            return StepResult(done=False, wait_until=mono + self.poll_interval)
        names = [k(round_, f"a{j}") for j in range(1, arrived + 1)]
        beats = [k(round_, f"h{j}") for j in range(1, arrived + 1)]
        values = self.backend.key_get_many(names + beats)
        expiry = settings.heartbeat_expiry_seconds
        slots: dict[str, int] = {}
        suspects = []
        for j in range(arrived):
            name, beat = values[j], values[arrived + j]
            if name is None or name == b"-" or beat is None:
                continue  # not written yet, or withdrawn
            silent, changed = self._observe(("slot", round_, j + 1), beat)
            if silent > expiry and self._may_evict():
                continue  # the same beat for longer than the expiry, on this node's clock: dead
            if (silent > expiry or (not changed and now - float(beat) > expiry)) and name != me.encode():
                # Old by the wall clock but never watched: dead, or alive with a skewed clock. Watch it (at most the
                # expiry) rather than drop a live node or admit a dead one.
                suspects.append(name.decode())
            slots[name.decode()] = j + 1
        if suspects:
            # Keep the claim (a fresh value tells the others this completer is alive) and look again shortly.
            self.backend.key_set(k(round_, "claim"), f"{me}|{self.clock.time()!r}".encode())
            return StepResult(done=False, wait_until=mono + min(self.max_poll_interval, settings.keep_alive_seconds / 4))
        s = state.copy()
        self._evict_dead(s, now)
        for key in sorted(slots, key=slots.get):
            if len(s.participants) < settings.max_nodes:
                s.participants[key] = -1
                if key in s.wait_list:
                    s.wait_list.remove(key)
            elif key not in s.wait_list:
                s.wait_list.append(key)
            s.heartbeats[key] = now
        count = len(s.participants)
        if not (count >= settings.max_nodes or (count >= settings.min_nodes and deadline is not None and now >= deadline)
                or self._reformed(s)):
            # Some arrivals were withdrawn or dead: not enough live nodes yet. Let go and wait for more.
            self.backend.key_set(k(round_, "claim"), _CLAIM_RELEASED)
            return StepResult(done=False, wait_until=mono + self._next_poll_delay())
        self._complete(s)
        written = self.backend.set_state(s.to_bytes(), got[1] if got is not None else None)
        self._cached = None
        self.seen_version = None
        if written is None or not written[2]:
            self.backend.key_set(k(round_, "claim"), _CLAIM_RELEASED)
            return StepResult(done=False, wait_until=mono)
        self.state = s
        self._watch_heartbeats(s)
        for key, j in slots.items():
            rank = s.participants.get(key)
            # "<rank>,<world size>,<restart count>": a node learns its round without reading the O(N) state
            result = f"{rank},{s.world_size},{s.restart_count}".encode()
            self.backend.key_set(k(round_, f"r{j}"), b"wait" if rank is None else result)
        self.backend.key_set(k(round_, "claim"), _ROUND_DONE)
        self._slot = None
        if me not in s.participants:
            return StepResult(done=False, wait_until=mono)
        return self._finish_join(round_, s.participants[me], s.world_size, s.restart_count)

    def _reformed(self, s: RendezvousState) -> bool:
        """Whether the open round holds exactly the members expected back, enough of them, and nobody else."""
        return (s.expected is not None and len(s.participants) >= self.settings.min_nodes
                and set(s.participants) == set(s.expected) and not s.wait_list)

    def _may_be_reformed(self, round_: int, arrived: int, s: RendezvousState) -> bool:
        """Whether the arrivals may be exactly the expected members: worth a claim that reads them (once per
        arrival count and expected count, so a round where that is not the case costs no repeated O(N) reads)."""
        if s.expected is None or arrived < max(len(s.expected), self.settings.min_nodes):
            return False
        attempt = (round_, arrived, len(s.expected))
        if attempt == self._reform_tried:
            return False
        self._reform_tried = attempt
        return True

    def _finish_join(self, round_: int, rank: int, world_size: int, restart_count: int | None) -> StepResult:
        self._slot = None
        self.completed_round = round_
        self.completed_restart_count = restart_count
        self._join_deadline = None
        self._note("rdzv.complete", f"round={round_} rank={rank} world_size={world_size}", NodeState.SUCCEEDED, rank)
        self._record_events()
        return StepResult(done=True, round=round_, rank=rank, world_size=world_size)

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

    # ------------------------------------------------------------------ per-node liveness (optional in the seam)

    def _liveness(self) -> bool:
        probe = getattr(self.backend, "supports_liveness", None)
        return bool(probe()) if probe is not None else False

    def _beat(self) -> None:
        """Renew this node's liveness once half a keep-alive interval has passed (TTL: the heartbeat expiry)."""
        mono = self.clock.monotonic()
        if mono - self._beat_at >= self.settings.keep_alive_seconds / 2:
            self.backend.heartbeat(self.node.key, self.settings.heartbeat_expiry_seconds)
            self._beat_at = mono

    def _refresh_live(self) -> None:
        """Re-read the live set unless it was read within ``max_poll_interval`` (which bounds how stale it is)."""
        mono = self.clock.monotonic()
        if self._live is None or mono - self._live_read_at >= self.max_poll_interval:
            self._live = set(self.backend.live_nodes())
            self._live_read_at = mono

    def _forget(self) -> None:
        self._beat_at = float("-inf")
        try:
            self.backend.forget(self.node.key)
        except RendezvousError as e:  # the entry lapses by itself within the expiry
            logger.debug("rendezvous %s: could not drop the liveness of %s: %s", self.settings.run_id, self.node, e)


_CLAIM_RELEASED = b"-"
_ROUND_DONE = b"!"


def num_nodes_waiting_in(state: RendezvousState, settings: RendezvousSettings, completed_round: int | None) -> int:
    """How many nodes wait for this node to re-rendezvous.

    If the run already moved past the round this node completed, everybody in the newer round is waiting for it
    (at least 1); otherwise the wait list counts while the round has room for them.
    """
    if state.closed:
        return 0
    if completed_round is not None and state.round > completed_round:
        return max(1, len(state.participants) + len(state.wait_list))
    if len(state.participants) < settings.max_nodes:
        return len(state.wait_list)
    return 0


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
    ) -> None:
        self._node = node
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
        self._failover = getattr(backend, "failover", None)
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
    ) -> DynamicRendezvousHandler:
        """Build a handler for ``run_id`` over ``backend``; ``store`` is what ``next_rendezvous`` hands out."""
        timeout = timeout or RendezvousTimeout()
        settings = RendezvousSettings(run_id, min_nodes, max_nodes, timeout, keep_alive_interval, keep_alive_max_attempt)
        return cls(new_node_desc(local_addr), settings, backend.name, store, backend, clock, local_addr)

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
        except RendezvousError as e:
            logger.error("rendezvous %s: %s", self._settings.run_id, e)
            self._failover = None  # nothing more to try: calls fail with the store's own error from now on
            return False
        self._backend, self._store = backend, store
        self._stepper.switch_backend(backend)
        if self._keep_alive_stepper is not None:
            try:
                self._keep_alive_stepper.switch_backend(backend.connection_for_heartbeats())
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
        from .c10d_failover import StoreHostDeposed

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
        """Step ``op`` until done; errors raise; bounded by ``timeout`` seconds for non-join ops."""
        deadline = self._clock.monotonic() + timeout
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
                raise result.error
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
                if self._backend.wait_for_change(version, seconds) is not None:
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
                backend = self._backend.connection_for_heartbeats()
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
            self._check_deposed()

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
    """Create a handler from ``params`` (options: join_timeout, last_call_timeout, close_timeout,
    keep_alive_interval, keep_alive_max_attempt)."""
    keep_alive, max_attempt = keep_alive_options(params)
    timeout = RendezvousTimeout(
        join=option_seconds(params, "join_timeout", None),
        last_call=option_seconds(params, "last_call_timeout", None),
        close=option_seconds(params, "close_timeout", None),
        heartbeat=keep_alive,
    )
    return DynamicRendezvousHandler.from_backend(
        params.run_id,
        store,
        backend,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        timeout,
        timeout.heartbeat.total_seconds(),
        max_attempt,
    )
