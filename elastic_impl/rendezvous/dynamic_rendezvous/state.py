"""Settings, node identity, the shared state and step results of the dynamic rendezvous (see the package notes)."""


from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

from ..api import (
    RendezvousError,
    RendezvousStateError,
)
from ..options import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_JOIN_TIMEOUT,
    DEFAULT_KEEP_ALIVE_INTERVAL,
    DEFAULT_LAST_CALL_TIMEOUT,
    check_handler_run_id,
    timeout_seconds,
)

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package


class StepOp(str, Enum):
    """What a :meth:`RendezvousStepper.step` does (a ``str``: the plain names are accepted too)."""

    JOIN = "join"
    KEEP_ALIVE = "keep_alive"
    CLOSE = "close"
    LEAVE = "leave"
    SYNC = "sync"
    INCREMENT_RESTART_COUNT = "increment_restart_count"


STEP_OPS = tuple(op.value for op in StepOp)


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
        check_handler_run_id(self.run_id)
        if not isinstance(self.min_nodes, int):
            raise ValueError(f"rendezvous min_nodes must be an integer >= 1, got {self.min_nodes!r}")
        if not isinstance(self.max_nodes, int):
            raise ValueError(f"rendezvous max_nodes must be an integer >= min_nodes ({self.min_nodes}), got {self.max_nodes!r}")
        # upstream's words (DynamicRendezvousHandler's; its tests match them)
        if self.min_nodes < 1:
            raise ValueError(f"The minimum number of nodes ({self.min_nodes}) must be greater than zero.")
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"The maximum number of nodes ({self.max_nodes}) must be greater than or equal to the "
                             f"minimum number of nodes ({self.min_nodes}).")
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
