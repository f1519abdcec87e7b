"""A live run's history, built from structured records only: agents' events, workers' markers, process exits and
what the simulator itself did."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from simulator import history as h
from simulator.history import Event, History
from simulator.live.settings import Settings

if TYPE_CHECKING:
    from simulator.live.agents import Node

__all__ = ["POLL", "Recorder"]

logger = logging.getLogger(__name__)

POLL = 0.1  # seconds between two reads of what the nodes wrote


class Recorder:
    """Owns the history, the run's time 0 and the lock that guards both (and the node list), and the collector
    thread that reads each node's events file, marker files and exit into history records every :data:`POLL` s.
    Undoes a node's clock skew on the times its events carry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.t0: float | None = None  # wall time of the history's t = 0 (the agents' launch)
        self.lock = threading.RLock()
        self._history = History()
        self._collector: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ time and records

    def now(self) -> float:
        """Seconds since the run started (the history's ``t``)."""
        return 0.0 if self.t0 is None else time.time() - self.t0

    def t(self, wall: float) -> float:
        return round(wall - (self.t0 or wall), 4)

    def record(self, node: str, event: str, t: float | None = None, **fields: Any) -> Event:
        with self.lock:
            return self._history.append(Event(round(self.now() if t is None else t, 4), node, event, **fields))

    def history(self) -> History:
        """What is recorded so far (not read again), ordered by time."""
        with self.lock:
            return self._history.sorted()

    def filter(self, event: str, node: str | None = None) -> list[Event]:
        with self.lock:
            return self._history.filter(event, node)

    # ------------------------------------------------------------------ collecting

    def refresh(self, nodes: Iterable[Node]) -> None:
        """Read new agent events, worker markers and process exits of ``nodes`` into the history."""
        with self.lock:
            for node in nodes:
                self._read_events(node)
                self._read_markers(node)
                self._note_exit(node)

    def start_collector(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` every :data:`POLL` s from a thread until :meth:`stop_collector`."""

        def loop() -> None:
            while not self._stop.wait(POLL):
                try:
                    refresh()
                except Exception as e:  # the collector must keep going; the next pass retries
                    logger.warning("history collector: %s", e)

        self._collector = threading.Thread(target=loop, name="sim-collector", daemon=True)
        self._collector.start()

    def stop_collector(self) -> None:
        self._stop.set()
        if self._collector is not None:
            self._collector.join(timeout=5)

    def _read_events(self, node: Node) -> None:
        try:
            with open(node.events_file, "rb") as f:
                f.seek(node.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        node.offset += len(data)
        data = node.partial + data
        *lines, node.partial = data.split(b"\n")
        read_t = self.now()
        for line in lines:
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError:
                logger.warning("%s: unparsable event line %r", node.name, line[:200])
                continue
            self._ingest(node, raw, read_t)

    def _event_t(self, node: Node, raw: dict, read_t: float) -> float:
        ts = raw.get("timestamp")
        if not ts:
            return read_t  # rendezvous events carry no time: when we read them (within one collector poll)
        wall = ts / 1000.0
        return self.t(wall - node.skew_at(wall, self.t0 + read_t))  # undo this node's clock skew

    def _ingest(self, node: Node, raw: dict, read_t: float) -> None:
        name = raw.get("name", "")
        md = raw.get("metadata") or {}
        t = self._event_t(node, raw, read_t)
        n = node.name
        if name == "agent.rendezvous":
            self.record(n, h.RDZV_COMPLETE, t=t, round=md.get("round"), rank=md.get("group_rank"),
                        world_size=md.get("group_world_size"), detail={"restart_count": md.get("restart_count")})
        elif name == "agent.workers_started":
            ranks, pids = md.get("ranks") or [], md.get("pids") or []
            gws = md.get("group_world_size") or 0
            node.workers = {lr: pid for lr, pid in enumerate(pids)}
            node.worker_round = md.get("round")
            for lr, (rank, pid) in enumerate(zip(ranks, pids, strict=False)):
                self.record(n, h.WORKER_START, t=t, round=md.get("round"), rank=rank,
                            world_size=gws * self.settings.workers_per_node,
                            detail={"local_rank": lr, "restart_count": md.get("restart_count"), "pid": pid})
        elif name == "agent.worker_failed":
            detail = {"exitcode": md.get("exitcode"), "signal": md.get("signal"), "local_rank": md.get("local_rank")}
            self.record(n, h.WORKER_FAILED, t=t, round=md.get("round"), rank=md.get("rank"), detail=detail)
            self.record(n, h.WORKER_EXIT, t=t, round=md.get("round"), rank=md.get("rank"), detail=dict(detail))
        elif name == "agent.restart":
            self.record(n, h.RESTART, t=t, detail={"restart_count": md.get("restart_count"),
                                                   "reason": md.get("reason") or "worker_failed"})
        elif name == "agent.membership_change":
            self.record(n, h.RESTART, t=t, detail={"restart_count": md.get("restart_count"), "reason": "membership",
                                                   "why": md.get("reason")})
        elif name == "agent.exit":
            node.agent_exit_event = {"t": t, "state": md.get("state"), "error": md.get("error"),
                                     "signal": md.get("signal")}
        elif name == "rdzv.join":
            self.record(n, h.RDZV_JOIN, t=t, round=_round_in(raw.get("message", "")), state="joined")
        elif name == "rdzv.open_round":
            self.record(n, h.RDZV_JOIN, t=t, round=_round_in(raw.get("message", "")), state="opened")
        elif name == "rdzv.wait":
            after = _round_in(raw.get("message", ""))
            self.record(n, h.RDZV_JOIN, t=t, round=None if after is None else after + 1, state="waiting")
        elif name in ("rdzv.evict", "rdzv.leave", "rdzv.close", "rdzv.error"):
            # not history events of their own; kept as ops so a reader sees why membership changed
            self.record(n, h.OP, t=t, detail={"op": name, "message": raw.get("message", "")[:300]})

    def _read_markers(self, node: Node) -> None:
        try:
            names = os.listdir(node.marker_dir)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".") or name in node.seen_markers or not name.endswith(".json"):
                continue
            path = node.marker_dir / name
            try:
                payload = json.loads(path.read_text())
                mtime = path.stat().st_mtime
            except (OSError, ValueError):
                continue
            if not payload.get("done"):
                continue  # written again (atomically) with done=True when the worker finishes
            node.seen_markers.add(name)
            rank = int(payload["RANK"]) if payload.get("RANK") is not None else None
            self.record(node.name, h.WORKER_EXIT, t=self.t(mtime), round=node.worker_round, rank=rank,
                        detail={"exitcode": 0, "pid": payload.get("pid"),
                                "restart_count": int(payload.get("TORCHELASTIC_RESTART_COUNT") or 0),
                                "world_size": int(payload.get("WORLD_SIZE") or 0)})

    def _note_exit(self, node: Node) -> None:
        if node.exit_recorded or node.proc is None:
            return
        code = node.proc.poll()
        if code is None:
            return
        self._read_events(node)  # its last events are on disk before it exited
        node.exit_recorded = True
        info = node.agent_exit_event or {}
        t = info.get("t", self.now())
        detail = {"exitcode": code}
        for key in ("error", "signal"):
            if info.get(key):
                detail[key] = info[key]
        if code < 0:
            detail["signal"] = signal.Signals(-code).name
        state = info.get("state") or ("KILLED" if code < 0 else "UNKNOWN")
        self.record(node.name, h.AGENT_EXIT, t=t, state=state, detail=detail)


def _round_in(message: str) -> int | None:
    """The round number in a rendezvous event message ("joined round 3", "waiting for the round after 2")."""
    for word in reversed(message.replace(",", " ").split()):
        if word.isdigit():
            return int(word)
    return None
