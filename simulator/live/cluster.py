"""A live cluster on loopback: N real agents (``elastic-run``) as processes, a store they all share, faults.

Layout of one run (everything under ``out_dir``)::

    store process (TCPStore server, or etcd)      <- owned by the simulator: killing an agent never kills it
                                                     (or: ``store_host=i``, node i's agent hosts the TCPStore and
                                                     the others connect to it directly; ``store_members=3``, a
                                                     3-member etcd cluster the nodes reach directly by its
                                                     endpoint list -- no proxies, so no partition/delay faults)
      ^        ^
    proxy0   proxy1  ...                          <- one loopback TCP proxy per node (partition / delay it alone)
      ^        ^
    node0    node1   ...                          <- python -m simulator.live.agent_main == elastic-run, each in its
      |        |                                     own session, ELASTIC_IMPL_EVENTS_FILE=out_dir/nodeI/events.jsonl
    workers  workers                              <- simulator/live/worker.py -> examples/train.py (markers, timers)

The network (``network=``): ``proxy`` is the picture above, all on loopback; only the store path can be cut or
delayed (``partition``, ``delay``), the workers' collectives never cross a proxy. ``netns``: every node (its agent
and workers) runs in a network namespace of its own (:class:`fault_injection.netns.NetnsCluster`: ``eth0`` on a
veth to a bridge), so whole-node faults (``isolate_node``, ``split_cluster``, ``one_way_drop``) cut the store AND
the peers' gloo traffic; the simulator's store and the per-node proxies stay in the root namespace, the proxies
listening on the bridge's gateway address (so ``partition``/``delay`` work there too); an agent-hosted store
(``store_host``) is reached at the hosting node's own address. ``auto`` (the default) takes ``netns`` where
namespaces can be made (root, iproute2) and ``proxy`` elsewhere; the ``network`` op at t=0 says which ran and why.

The history is built from structured records only: the agents' events (``elastic_impl.events`` JSON lines), the
workers' marker files (``examples/train.py``), what the simulator itself did (process starts, exits, faults) and an
orphan check at the end. Every process of the run carries ``ELASTIC_SIM_RUN=<token>`` in its environment; the orphan
check looks for that marker, so a process that escaped its agent is found whoever its parent is now.

``Cluster`` is usable directly (and through the ``cluster`` pytest fixture)::

    with Cluster(tmp_path, workers_per_node=2, max_restarts=1) as c:
        c.start(nodes=2)
        c.wait_for("worker_start", node=1)
        c.kill_worker(node=1, rank=0)
        assert c.wait() == "succeeded"
    c.history  # simulator.history.History, orphan check included
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from fault_injection import FaultError
from fault_injection.processes import kill_processes, processes_with_env
from simulator import history as h
from simulator.history import Event, History
from simulator.live.agents import Agents, Node
from simulator.live.nemesis import Nemesis
from simulator.live.network import NetworkSide
from simulator.live.recorder import POLL, Recorder
from simulator.live.settings import RUN_MARKER_ENV, LiveError, Settings, default_train_script
from simulator.live.store import StoreSide

__all__ = ["Cluster", "LiveError", "RUN_MARKER_ENV", "default_train_script"]

logger = logging.getLogger(__name__)

_SETTING_NAMES = frozenset(f.name for f in fields(Settings))


def _forward(part: str, method: Callable) -> Callable:
    """A :class:`Cluster` method that is ``method`` of its part ``part`` (same name, signature and docstring)."""

    @functools.wraps(method)
    def forward(self: Cluster, *args: Any, **kwargs: Any) -> Any:
        return method(getattr(self, part), *args, **kwargs)

    return forward


class Cluster:
    """Real agents on loopback sharing one store, each through its own proxy (see the module docstring).

    ``options`` (also readable as attributes, e.g. ``cluster.max_restarts``) are :class:`Settings`'s fields:
    ``workers_per_node``, ``min_nodes``/``max_nodes`` (default: the nodes started), ``max_restarts``, ``backend``
    (c10d | etcd-v2 | etcd-v3), ``timeouts``, ``job``, ``shutdown_grace``, ``timers`` (a timer server per node),
    ``env`` (extra environment of every agent), ``store_host``, ``store_members``, ``network`` (auto | netns |
    proxy), ``train_script`` and ``run_id``.
    Timeouts are seconds: ``join``, ``last_call``, ``heartbeat`` (keep-alive interval), ``close``,
    ``keep_alive_max_attempt``, ``monitor`` (the agent's monitor interval), ``read`` (store client timeout).
    ``job``: ``steps``, ``step_seconds``, ``daemon`` (each worker double-forks a setsid daemon that outlives it
    unless the runtime stops it), ``collective``/``collective_timeout`` (a gloo all-reduce at every step) and any
    extra ``TRAIN_*`` environment for ``examples/train.py``.
    ``store_host``: the index of the node whose agent hosts the c10d TCPStore (``is_host=true``) instead of a store
    process of the simulator's own. ``store_members``: members of the etcd cluster (etcd backends; 1 = one server).

    The cluster is a facade over its parts, each owning one concern: :attr:`recorder` (the history and its
    collector, :mod:`~simulator.live.recorder`), :attr:`network_side` (netns or proxy,
    :mod:`~simulator.live.network`), :attr:`store_side` (the store and the nodes' paths to it,
    :mod:`~simulator.live.store`), :attr:`agents` (the nodes' agent processes, :mod:`~simulator.live.agents`) and
    :attr:`nemesis` (the faults, :mod:`~simulator.live.nemesis`). It starts them in order, judges the job's outcome
    and tears everything down (orphan check included).
    """

    def __init__(self, out_dir: str | os.PathLike, **options: Any) -> None:
        self.settings = Settings.of(options)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        self.outcome: str | None = None
        self._closed = False
        self.recorder = Recorder(self.settings)
        self.network_side = NetworkSide(self.settings)
        self.store_side = StoreSide(self.settings, self.out_dir)
        self.agents = Agents(self.settings, self.out_dir, self.token, self.recorder, self.store_side,
                             self.network_side)
        self.nemesis = Nemesis(self.settings, self.recorder, self.agents, self.store_side, self.network_side)

    def __getattr__(self, name: str) -> Any:
        # the options read as attributes (cluster.max_restarts, cluster.job, ...) live in self.settings
        if name in _SETTING_NAMES and "settings" in self.__dict__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def nodes(self) -> list[Node]:
        """Every node started so far (pre-started spares included)."""
        return self.agents.nodes

    @property
    def store(self) -> Any:
        """The store server of this run (None before :meth:`start`)."""
        return self.store_side.server

    @property
    def network_mode(self) -> str | None:
        """The network that runs: netns | proxy (None before :meth:`start`)."""
        return self.network_side.mode

    @property
    def faults(self) -> list:
        """The faults still active."""
        return self.nemesis.faults

    # ------------------------------------------------------------------ time and history

    now = _forward("recorder", Recorder.now)
    record = _forward("recorder", Recorder.record)

    @property
    def history(self) -> History:
        """Everything recorded so far, ordered by time."""
        self.refresh()
        return self.recorder.history()

    def refresh(self) -> None:
        """Read new agent events, worker markers and process exits into the history."""
        self.agents.refresh()

    # ------------------------------------------------------------------ start-up

    def configure(self, **options: Any) -> Cluster:
        """Change settings before :meth:`start` (same names as the constructor's but ``train_script`` and ``run_id``;
        ``timeouts``/``job``/``env`` are merged into the current ones)."""
        if self.recorder.t0 is not None:
            raise LiveError("configure() must come before start()")
        self.settings.update(options)
        return self

    def start(self, nodes: int = 2, workers: int | None = None, spares: int = 0, **options: Any) -> Cluster:
        """Start the store and ``nodes`` agents (``workers`` per node overrides ``workers_per_node``; other
        ``options`` as in :meth:`configure`). ``spares`` more agents are pre-started on hold (interpreter and
        imports done, nothing of the agent run) for :meth:`add_node` to release."""
        if self.recorder.t0 is not None:
            raise LiveError("cluster already started; use add_node() for more nodes")
        self.configure(**options)
        s = self.settings
        if not isinstance(nodes, int) or nodes < 1:
            raise LiveError(f"invalid nodes {nodes!r}; expected an integer >= 1")
        if workers is not None:
            if not isinstance(workers, int) or workers < 1:
                raise LiveError(f"invalid workers {workers!r}; expected an integer >= 1")
            s.workers_per_node = workers
        s.fix_bounds(nodes)
        if s.store_host is not None and s.store_host >= nodes:
            raise LiveError(f"invalid store_host {s.store_host}; the hosting node must be one of the first "
                            f"{nodes} nodes (0..{nodes - 1})")
        try:
            self.network_side.create([f"node{i}" for i in range(nodes + spares)])
            self.store_side.start(self.network_side)
            self.recorder.t0 = time.time()  # scenario time 0: the agents are launched (the store is already up)
            self.record("nemesis", h.OP, t=0.0, detail=self.network_side.describe())
            self.record("store", h.OP, t=0.0, detail={"op": "store_start", "backend": s.backend,
                                                      "endpoint": self.store.endpoint, "network": self.network_mode})
            for _ in range(nodes):
                self.agents.launch()
            for _ in range(spares):
                self.agents.launch(spare=True)
        except BaseException:
            self.close()
            raise
        self.recorder.start_collector(self.refresh)
        return self

    # ------------------------------------------------------------------ nodes and queries

    node = _forward("agents", Agents.node)
    node_counts = _forward("agents", Agents.node_counts)
    add_node = _forward("agents", Agents.add_node)
    remove_node = _forward("agents", Agents.remove_node)

    def worker_pids(self, node: int) -> dict[int, int]:
        """``{local_rank: pid}`` of the workers the node's agent started last."""
        self.refresh()
        return dict(self.node(node).workers)

    def wait_for(self, event: str, node: int | None = None, count: int = 1, timeout: float = 120.0,
                 where: Callable[[Event], bool] | None = None) -> Event:
        """Block until the history has ``count`` records of ``event`` (on ``node``); return the last of them."""
        if event not in h.EVENT_NAMES:
            raise LiveError(f"unknown history event {event!r}; allowed: {', '.join(h.EVENT_NAMES)}")
        name = None if node is None else self.node(node).name
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.history.filter(event, name) if where is None or where(e)]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise LiveError(f"no {count} x {event} on {name or 'any node'} within {timeout:g} s (saw {len(found)})")
            time.sleep(POLL)

    # ------------------------------------------------------------------ the nemesis (simulator.faults calls these)

    kill_worker = _forward("nemesis", Nemesis.kill_worker)
    kill_agent = _forward("nemesis", Nemesis.kill_agent)
    pause_agent = _forward("nemesis", Nemesis.pause_agent)
    heartbeat_delay = _forward("nemesis", Nemesis.heartbeat_delay)
    clock_skew = _forward("nemesis", Nemesis.clock_skew)
    expire_timer = _forward("nemesis", Nemesis.expire_timer)
    partition = _forward("nemesis", Nemesis.partition)
    delay = _forward("nemesis", Nemesis.delay)
    isolate_node = _forward("nemesis", Nemesis.isolate_node)
    split_cluster = _forward("nemesis", Nemesis.split_cluster)
    drop_one_way = _forward("nemesis", Nemesis.drop_one_way)
    restart_store = _forward("nemesis", Nemesis.restart_store)
    freeze_store = _forward("nemesis", Nemesis.freeze_store)
    kill_store_leader = _forward("nemesis", Nemesis.kill_store_leader)
    heal = _forward("nemesis", Nemesis.heal)

    # ------------------------------------------------------------------ the end

    def wait(self, timeout: float = 180.0) -> str:
        """Wait until every agent exited (bounded); record and return the job outcome (succeeded | failed)."""
        if self.outcome is not None:
            return self.outcome
        deadline = time.monotonic() + timeout
        timed_out = False
        self.agents.drop_spares()
        while self.agents.running():
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(POLL)
        self.refresh()
        if timed_out:
            running = [n.name for n in self.agents.running()]
            self.outcome = "failed"
            self.record("job", h.JOB_FAILED, detail={"reason": f"timeout: {', '.join(running)} still running after {timeout:g} s"})
            return self.outcome
        members = [n for n in self.nodes if not n.lost]
        codes = {n.name: n.proc.returncode for n in members}
        # A node that arrived after the job had ended (it never completed a round and found the run closed) did
        # not take part: the job's outcome is its participants'.
        late = [n.name for n in members if n.proc.returncode != 0 and self._arrived_after_close(n)]
        # A store host deposed after a partition stopped so that one group goes on (docs/c10d_store_failover.md):
        # it left the job, like a node the nemesis removed; the job's outcome is the group that went on.
        deposed = [n.name for n in members if n.proc.returncode != 0
                   and ((n.agent_exit_event or {}).get("error") or "").startswith("StoreHostDeposed")]
        deciding = {name: code for name, code in codes.items() if name not in late and name not in deposed}
        if deciding and all(code == 0 for code in deciding.values()):
            self.outcome = "succeeded"
            detail: dict[str, Any] = {"exitcodes": codes}
            if late:
                detail["late_nodes"] = late
            if deposed:
                detail["deposed_nodes"] = deposed
            self.record("job", h.JOB_SUCCEEDED, detail=detail)
        else:
            self.outcome = "failed"
            errors = {n.name: (n.agent_exit_event or {}).get("error") for n in members if n.proc.returncode}
            reason = "no node left in the job" if not deciding else "agents failed"
            self.record("job", h.JOB_FAILED, detail={"reason": reason, "exitcodes": codes,
                                                     "errors": {k: v for k, v in errors.items() if v}})
        return self.outcome

    def _arrived_after_close(self, node: Node) -> bool:
        completed = self.recorder.filter(h.RDZV_COMPLETE, node.name)
        error = (node.agent_exit_event or {}).get("error") or ""
        return not completed and error.startswith("RendezvousClosedError")

    def orphan_check(self, grace: float = 3.0) -> list[int]:
        """Processes of this run still alive now that no agent should be (waits ``grace`` s for exiting ones)."""
        deadline = time.monotonic() + grace
        while True:
            orphans = processes_with_env(RUN_MARKER_ENV, self.token)
            orphans = [p for p in orphans if p not in {n.pid for n in self.agents.running()}]
            if not orphans or time.monotonic() > deadline:
                return orphans
            time.sleep(0.1)

    def close(self) -> History:
        """Heal, stop everything, run the orphan check (recorded), and return the history. Idempotent."""
        if self._closed:
            return self.history
        self._closed = True
        try:
            try:
                self.heal()
            except Exception as e:
                logger.warning("heal at close failed: %s", e)
            self.agents.continue_paused()
            self.agents.drop_spares()
            if self.outcome is None and self.nodes:
                # closed before the job ended: stop the agents (leave), then give them their shutdown grace
                for node in self.agents.running():
                    os.kill(node.pid, signal.SIGTERM)
                self.wait(timeout=self.settings.shutdown_grace + 15)
            self.refresh()
            stuck = self.agents.running()
            if stuck:
                # agents that outlived the job's end (wait timed out, or a stop signal was ignored): kill their whole
                # trees first, so the orphan check counts only processes that escaped their agent's tree
                kill_processes([n.pid for n in stuck])
                for n in stuck:
                    n.proc.wait(timeout=10)
                self.record("job", h.OP, detail={"op": "killed_at_close", "nodes": [n.name for n in stuck]})
                self.refresh()
            if self.nodes:
                orphans = self.orphan_check()
                self.record("job", h.ORPHAN_CHECK, detail={"orphans": orphans})
        finally:
            self._cleanup()
        return self.history

    def _cleanup(self) -> None:
        self.recorder.stop_collector()
        pids = [n.pid for n in self.agents.running()] + processes_with_env(RUN_MARKER_ENV, self.token)
        if pids:
            try:
                kill_processes(pids)
            except FaultError as e:
                logger.error("cleanup: %s", e)
        self.agents.close()
        self.store_side.close()
        try:
            self.network_side.close()  # kills anything still inside, removes namespaces, veths and bridges
        except FaultError as e:
            logger.error("cleanup: %s", e)
            self.record("job", h.OP, detail={"op": "netns_leftovers", "error": str(e)})
        self.refresh()
        self.recorder.history().to_jsonl(self.out_dir / "history.jsonl")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
