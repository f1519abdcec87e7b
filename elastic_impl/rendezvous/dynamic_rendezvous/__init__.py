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
  backend that has per-node liveness (``NodeLiveness`` switched on, etcd-v3: leases as heartbeats) a heartbeat renews
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
offering ``StateVersions`` (``state_version()``) let a poll move one integer instead of the whole state (a full
read still happens at least every ``max_poll_interval``), and ``ChangeNotification`` (``wait_for_change()``) lets
the handler wake as soon as another node writes instead of sleeping out the poll interval (c10d: ``TCPStore.wait``
on a per-version key).
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


from elastic_impl.events import construct_and_record_rdzv_event  # noqa: F401 -- upstream's module has it
from elastic_impl.events.api import NodeState  # noqa: F401 -- upstream's module has it

from .._backend import RendezvousBackend
from ..api import (  # noqa: F401 -- importable from here as from upstream's module
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
from .handler import DynamicRendezvousHandler, create_handler
from .state import (  # noqa: F401 -- the module's names, as before it became a package
    _CLAIM_RELEASED,
    _ROUND_DONE,
    STEP_OPS,
    NodeDesc,
    RendezvousSettings,
    RendezvousState,
    RendezvousTimeout,
    StepOp,
    StepResult,
    get_method_name,
    logger,
    new_node_desc,
    num_nodes_waiting_in,
)
from .stepper import RendezvousStepper, StoreContact

__all__ = [
    "DynamicRendezvousHandler",
    "NodeDesc",
    "RendezvousBackend",
    "RendezvousSettings",
    "RendezvousState",
    "RendezvousStepper",
    "RendezvousTimeout",
    "StepResult",
    "StepOp",
    "StoreContact",
    "create_handler",
]

