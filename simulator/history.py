"""The history of a simulated run: a time-ordered list of event records, shared by live and virtual mode.

One record per line in JSON-lines files. Field meanings (the checker relies on them):

- ``t``: seconds since the scenario started (virtual seconds in virtual mode, wall seconds in live mode).
- ``node``: the node (agent) the record is about, e.g. ``"node0"``; ``"nemesis"`` for faults, ``"client"`` for ops,
  ``"job"`` for job-wide outcomes.
- ``round``: the rendezvous round. ``rank`` / ``world_size``:
  on ``rdzv_complete`` they are the NODE rank and the number of NODES in the round (``detail.participants``: the
  node names in rank order, when known); on ``worker_start`` they are the GLOBAL worker rank and the number of
  WORKERS (``detail.local_rank``, ``detail.restart_count``).
- ``state``: a free-form state name (agent or worker state) where useful.
- ``detail``: event-specific extras (``exitcode`` on ``worker_exit``, ``restart_count`` on ``restart``, fault name and
  arguments on ``fault_start``/``fault_end``, ``orphans`` (pids) on ``orphan_check``, ``op`` on ``op``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AGENT_START = "agent_start"
AGENT_EXIT = "agent_exit"
RDZV_JOIN = "rdzv_join"
RDZV_COMPLETE = "rdzv_complete"
WORKER_START = "worker_start"
WORKER_EXIT = "worker_exit"
WORKER_FAILED = "worker_failed"
RESTART = "restart"
JOB_SUCCEEDED = "job_succeeded"
JOB_FAILED = "job_failed"
FAULT_START = "fault_start"
FAULT_END = "fault_end"
ORPHAN_CHECK = "orphan_check"
OP = "op"

EVENT_NAMES = (
    AGENT_START,
    AGENT_EXIT,
    RDZV_JOIN,
    RDZV_COMPLETE,
    WORKER_START,
    WORKER_EXIT,
    WORKER_FAILED,
    RESTART,
    JOB_SUCCEEDED,
    JOB_FAILED,
    FAULT_START,
    FAULT_END,
    ORPHAN_CHECK,
    OP,
)

_FIELDS = ("t", "node", "event", "round", "rank", "world_size", "state", "detail")


@dataclass
class Event:
    """One history record (see the module docstring for what each field means per event)."""

    t: float
    node: str
    event: str
    round: int | None = None
    rank: int | None = None
    world_size: int | None = None
    state: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict; ``None`` fields and an empty ``detail`` are left out."""
        out: dict[str, Any] = {"t": self.t, "node": self.node, "event": self.event}
        for name in ("round", "rank", "world_size", "state"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        if not isinstance(data, dict):
            raise ValueError(f"history record must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("t", "node", "event") if k not in data]
        if missing:
            raise ValueError(f"history record lacks {', '.join(missing)}: {json.dumps(data)[:120]}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"history record has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
        detail = data.get("detail") or {}
        if not isinstance(detail, dict):
            raise ValueError(f"history record detail must be an object, got {detail!r}")
        return cls(
            t=float(data["t"]),
            node=str(data["node"]),
            event=str(data["event"]),
            round=data.get("round"),
            rank=data.get("rank"),
            world_size=data.get("world_size"),
            state=data.get("state"),
            detail=dict(detail),
        )


class History:
    """An append-only, time-ordered list of :class:`Event` records."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self.events: list[Event] = list(events)

    def append(self, event: Event) -> Event:
        if not isinstance(event, Event):
            raise TypeError(f"History.append takes an Event, got {type(event).__name__}")
        self.events.append(event)
        return event

    def record(self, t: float, node: str, event: str, **fields: Any) -> Event:
        """Build an :class:`Event` from keyword fields and append it."""
        return self.append(Event(t, node, event, **fields))

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> Event:
        return self.events[index]

    def filter(self, event: str | Iterable[str] | None = None, node: str | None = None) -> list[Event]:
        """Records whose event name is ``event`` (or one of them) and whose node is ``node`` (either optional)."""
        names = {event} if isinstance(event, str) else (set(event) if event is not None else None)
        return [e for e in self.events if (names is None or e.event in names) and (node is None or e.node == node)]

    def nodes(self) -> list[str]:
        """Agent node names that appear in the history, in order of first appearance."""
        seen: dict[str, None] = {}
        for e in self.events:
            if e.node.startswith("node"):
                seen.setdefault(e.node, None)
        return list(seen)

    def sorted(self) -> History:
        """A copy ordered by time (stable: records at the same time keep their order)."""
        return History(sorted(self.events, key=lambda e: e.t))

    def digest(self) -> str:
        """SHA-256 of every record in recorded order: two runs with the same digest made the same history. The
        determinism check (each virtual seed runs twice, simulator/fuzz.py) compares these."""
        sha = hashlib.sha256()
        for e in self.events:
            sha.update(json.dumps(e.to_dict(), sort_keys=True, separators=(",", ":"), default=repr).encode())
            sha.update(b"\n")
        return sha.hexdigest()

    def to_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for e in self.events:
                f.write(json.dumps(e.to_dict(), separators=(",", ":"), sort_keys=False))
                f.write("\n")
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path) -> History:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"history file {str(path)!r} does not exist")
        events = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    events.append(Event.from_dict(json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
        return cls(events)

    def __repr__(self) -> str:
        return f"History({len(self.events)} events)"
