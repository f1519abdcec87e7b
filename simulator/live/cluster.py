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

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fault_injection import (
    ClockSkew,
    Delay,
    ExpireTimer,
    Fault,
    FaultError,
    FreezeStore,
    HeartbeatDelay,
    KillAgent,
    KillStoreLeader,
    KillWorker,
    Partition,
    PauseAgent,
    RestartStore,
    TcpProxy,
    netns,
)
from fault_injection.clock import CLOCK_FILE_ENV, write_skew
from fault_injection.processes import is_alive, kill_processes, processes_with_env
from fault_injection.store import _free_port
from fault_injection.timers import TIMER_FILE_ENV
from simulator import history as h
from simulator.history import Event, History
from simulator.live.worker import DAEMON_ENV, DAEMON_MODES

__all__ = ["Cluster", "LiveError", "RUN_MARKER_ENV", "default_train_script"]

logger = logging.getLogger(__name__)

RUN_MARKER_ENV = "ELASTIC_SIM_RUN"
BACKENDS = ("c10d", "etcd-v2", "etcd-v3")
NETWORKS = ("auto", "netns", "proxy")
_WORKER_SCRIPT = str(Path(__file__).with_name("worker.py"))
_POLL = 0.1


class LiveError(RuntimeError):
    """The live cluster cannot do what was asked (the message names the node/value and what is allowed)."""


def default_train_script() -> str:
    """``examples/train.py`` of this source tree."""
    return str(Path(__file__).resolve().parents[2] / "examples" / "train.py")


class _Node:
    """One simulated node: its agent process, proxy, files and what the simulator learned about it."""

    def __init__(self, index: int, directory: Path) -> None:
        self.index = index
        self.name = f"node{index}"
        self.dir = directory
        self.events_file = directory / "events.jsonl"
        self.marker_dir = directory / "markers"
        self.clock_file = directory / "clock"
        self.timer_file = directory / "timer.fifo"
        self.proc: subprocess.Popen | None = None
        self.proxy: TcpProxy | None = None  # None when the node reaches the store directly
        self.endpoint = ""  # the --rdzv-endpoint its agent was given
        self.timer_server = None
        self.offset = 0  # bytes of events_file consumed
        self.partial = b""
        self.workers: dict[int, int] = {}  # local rank -> pid of the latest started workers
        self.worker_round: int | None = None
        self.killed_pids: set[int] = set()
        self.lost = False  # killed or removed by the nemesis: not part of the job outcome
        self.exit_recorded = False
        self.agent_exit_event: dict | None = None
        self.skews: list[tuple[float, float]] = [(0.0, 0.0)]  # (wall time from which, offset) of this node's clock
        self.seen_markers: set[str] = set()
        self.hold_file = directory / "release"
        self.spare = False  # pre-started, waiting for add_node() to release it

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def skew_at(self, wall: float, now: float | None = None) -> float:
        """The clock offset this node had when its (skewed) clock read ``wall``.

        A clock set back reads some times twice; then the reading closest before ``now`` (real time, when the event
        was read: the collector reads events within a poll of their writing) wins.
        """
        now = time.time() if now is None else now
        best: tuple[float, float] | None = None
        for i, (since, value) in enumerate(self.skews):
            until = self.skews[i + 1][0] if i + 1 < len(self.skews) else float("inf")
            real = wall - value
            if since <= real < until and real <= now + 0.5 and (best is None or real > best[0]):
                best = (real, value)
        return best[1] if best is not None else self.skews[-1][1]


class Cluster:
    """Real agents on loopback sharing one store, each through its own proxy (see the module docstring).

    Timeouts are seconds: ``join``, ``last_call``, ``heartbeat`` (keep-alive interval), ``close``,
    ``keep_alive_max_attempt``, ``monitor`` (the agent's monitor interval), ``read`` (store client timeout).
    ``job``: ``steps``, ``step_seconds``, ``daemon`` (each worker double-forks a setsid daemon that outlives it
    unless the runtime stops it), ``collective``/``collective_timeout`` (a gloo all-reduce at every step) and any extra ``TRAIN_*`` environment for ``examples/train.py``.
    ``store_host``: the index of the node whose agent hosts the c10d TCPStore (``is_host=true``) instead of a store
    process of the simulator's own. ``store_members``: members of the etcd cluster (etcd backends; 1 = one server).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        workers_per_node: int = 1,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
        max_restarts: int = 0,
        backend: str = "c10d",
        timeouts: dict[str, float] | None = None,
        job: dict[str, Any] | None = None,
        shutdown_grace: float = 3.0,
        timers: bool = True,
        train_script: str | None = None,
        env: dict[str, str] | None = None,
        run_id: str | None = None,
        store_host: int | None = None,
        store_members: int = 1,
        network: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise LiveError(f"invalid live backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self._check_store(store_host, store_members)
        self.store_host = store_host
        self.store_members = store_members
        self._check_network(network)
        self.network = network
        self.network_mode: str | None = None  # what ran: netns | proxy (resolved by start())
        self.netns: netns.NetnsCluster | None = None
        if not isinstance(workers_per_node, int) or workers_per_node < 1:
            raise LiveError(f"invalid workers_per_node {workers_per_node!r}; expected an integer >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.workers_per_node = workers_per_node
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.max_restarts = max_restarts
        self.timeouts = {"join": 60.0, "last_call": 1.0, "heartbeat": 1.0, "close": 10.0,
                         "keep_alive_max_attempt": 3, "monitor": 0.1, "read": 30.0}
        self.timeouts.update(timeouts or {})
        self.job = {"steps": 10, "step_seconds": 0.5}
        self.job.update(job or {})
        self.shutdown_grace = shutdown_grace
        self.timers = timers
        self.train_script = train_script or default_train_script()
        if not os.path.isfile(self.train_script):
            raise LiveError(f"training script {self.train_script!r} does not exist (pass train_script=)")
        self.extra_env = dict(env or {})
        self.run_id = run_id or f"sim-{uuid.uuid4().hex[:8]}"
        self.token = uuid.uuid4().hex
        self.nodes: list[_Node] = []
        self.store = None
        self.faults: list[Fault] = []
        self.outcome: str | None = None
        self._history = History()
        self._lock = threading.RLock()
        self._t0: float | None = None
        self._collector: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # ------------------------------------------------------------------ time and history

    def now(self) -> float:
        """Seconds since the cluster started (the history's ``t``)."""
        return 0.0 if self._t0 is None else time.time() - self._t0

    def _t(self, wall: float) -> float:
        return round(wall - (self._t0 or wall), 4)

    def record(self, node: str, event: str, t: float | None = None, **fields: Any) -> Event:
        with self._lock:
            return self._history.append(Event(round(self.now() if t is None else t, 4), node, event, **fields))

    @property
    def history(self) -> History:
        """Everything recorded so far, ordered by time."""
        self.refresh()
        with self._lock:
            return self._history.sorted()

    def refresh(self) -> None:
        """Read new agent events, worker markers and process exits into the history."""
        with self._lock:
            for node in self.nodes:
                self._read_events(node)
                self._read_markers(node)
                self._note_exit(node)

    def _collect_loop(self) -> None:
        while not self._stop.wait(_POLL):
            try:
                self.refresh()
            except Exception as e:  # the collector must keep going; the next pass retries
                logger.warning("history collector: %s", e)

    # ------------------------------------------------------------------ start-up

    def _resolved_bounds(self, nodes: int) -> tuple[int, int]:
        lo = self.min_nodes if self.min_nodes is not None else nodes
        hi = self.max_nodes if self.max_nodes is not None else max(nodes, lo)
        if not 1 <= lo <= hi:
            raise LiveError(f"invalid node bounds min_nodes={lo} max_nodes={hi}; expected 1 <= min_nodes <= max_nodes")
        return lo, hi

    _OPTIONS = ("workers_per_node", "min_nodes", "max_nodes", "max_restarts", "backend", "timeouts", "job",
                "shutdown_grace", "timers", "env", "store_host", "store_members", "network")

    @staticmethod
    def _check_network(network: Any) -> None:
        if network not in NETWORKS:
            raise LiveError(f"invalid network {network!r}; allowed: {', '.join(NETWORKS)}")

    def _resolve_network(self) -> tuple[str, str]:
        """(netns | proxy, why) for this run; a forced netns that cannot be had is an error naming the reason."""
        why_not = netns.unavailable_reason() if self.network != "proxy" else None
        if self.store_members > 1 and self.network != "proxy":
            # the etcd members listen on loopback and the clients fail over between them: no proxy to carry them
            why_not = f"an etcd cluster of {self.store_members} members is reached on loopback, by no proxy"
        if self.network == "proxy":
            return "proxy", "asked for (network: proxy)"
        if why_not is None:
            return "netns", "asked for (network: netns)" if self.network == "netns" else "namespaces available"
        if self.network == "netns":
            raise LiveError(f"network netns is not possible here: {why_not} (use network auto or proxy)")
        return "proxy", f"network namespaces unavailable: {why_not}"

    def _check_store(self, store_host: Any, store_members: Any) -> None:
        if store_host is not None:
            if isinstance(store_host, bool) or not isinstance(store_host, int) or store_host < 0:
                raise LiveError(f"invalid store_host {store_host!r}; expected a node index >= 0 or None")
            if self.backend != "c10d":
                raise LiveError(f"store_host={store_host} needs backend c10d (an agent hosts a TCPStore), "
                                f"not {self.backend}")
        if isinstance(store_members, bool) or not isinstance(store_members, int) or store_members < 1:
            raise LiveError(f"invalid store_members {store_members!r}; expected an integer >= 1")
        if store_members > 1 and self.backend == "c10d":
            raise LiveError(f"store_members={store_members} needs an etcd backend (etcd-v2, etcd-v3), not c10d")

    def configure(self, **options: Any) -> Cluster:
        """Change settings before :meth:`start` (same names as the constructor's; ``timeouts``/``job``/``env`` are
        merged into the current ones)."""
        if self._t0 is not None:
            raise LiveError("configure() must come before start()")
        for key, value in options.items():
            if key not in self._OPTIONS:
                raise LiveError(f"unknown cluster option {key!r}; allowed: {', '.join(self._OPTIONS)}")
            if key == "backend" and value not in BACKENDS:
                raise LiveError(f"invalid live backend {value!r}; allowed: {', '.join(BACKENDS)}")
            if key == "network":
                self._check_network(value)
            if key in ("timeouts", "job"):
                getattr(self, key).update(value or {})
            elif key == "env":
                self.extra_env.update(value or {})
            else:
                setattr(self, key, value)
        self._check_store(self.store_host, self.store_members)
        return self

    def start(self, nodes: int = 2, workers: int | None = None, spares: int = 0, **options: Any) -> Cluster:
        """Start the store and ``nodes`` agents (``workers`` per node overrides ``workers_per_node``; other
        ``options`` as in :meth:`configure`). ``spares`` more agents are pre-started on hold (interpreter and
        imports done, nothing of the agent run) for :meth:`add_node` to release."""
        if self._t0 is not None:
            raise LiveError("cluster already started; use add_node() for more nodes")
        self.configure(**options)
        if not isinstance(nodes, int) or nodes < 1:
            raise LiveError(f"invalid nodes {nodes!r}; expected an integer >= 1")
        if workers is not None:
            if not isinstance(workers, int) or workers < 1:
                raise LiveError(f"invalid workers {workers!r}; expected an integer >= 1")
            self.workers_per_node = workers
        self.min_nodes, self.max_nodes = self._resolved_bounds(nodes)
        if self.store_host is not None and self.store_host >= nodes:
            raise LiveError(f"invalid store_host {self.store_host}; the hosting node must be one of the first "
                            f"{nodes} nodes (0..{nodes - 1})")
        try:
            self.network_mode, why = self._resolve_network()
            if self.network_mode == "netns":
                # every node the run may have (spares included) gets its namespace now: one cluster, one subnet
                self.netns = netns.NetnsCluster([f"node{i}" for i in range(nodes + spares)]).create()
            self._start_store()
            self._t0 = time.time()  # scenario time 0: the agents are launched (the store is already up)
            network = {"op": "network", "mode": self.network_mode, "requested": self.network, "why": why}
            if self.netns is not None:
                network.update(subnet=str(self.netns.subnet), gateway=self.netns.gateway)
            self.record("nemesis", h.OP, t=0.0, detail=network)
            self.record("store", h.OP, t=0.0, detail={"op": "store_start", "backend": self.backend,
                                                      "endpoint": self.store.endpoint, "network": self.network_mode})
            for _ in range(nodes):
                self._start_node()
            for _ in range(spares):
                self._start_node(spare=True)
        except BaseException:
            self.close()
            raise
        self._collector = threading.Thread(target=self._collect_loop, name="sim-collector", daemon=True)
        self._collector.start()
        return self

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("ELASTIC_IMPL_EVENTS_FILE", "MARKER_DIR", "OMP_NUM_THREADS", RUN_MARKER_ENV):
            env.pop(key, None)
        env.pop("PYTEST_XDIST_WORKER", None)
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _start_store(self) -> None:
        if self.store_host is not None:
            # in a namespace the hosting node listens on its own address (its port is its namespace's: any will do)
            host = self.netns.node(f"node{self.store_host}").ip if self.netns is not None else "127.0.0.1"
            self.store = _AgentHostedStore(self.store_host, _free_port(), host)
        elif self.backend == "c10d":
            from fault_injection.store import TCPStoreServer

            self.store = TCPStoreServer(env=self._base_env()).start()
        elif self.store_members > 1:
            from fault_injection.store import EtcdCluster

            self.store = EtcdCluster(self.store_members).start()
        else:
            from fault_injection.store import EtcdStoreServer

            self.store = EtcdStoreServer(data_dir=str(self.out_dir / "etcd-data")).start()

    def _rdzv_conf(self, index: int) -> str:
        t = self.timeouts
        conf = {
            "join_timeout": t["join"],
            "last_call_timeout": t["last_call"],
            "close_timeout": t["close"],
            "keep_alive_interval": t["heartbeat"],
            "keep_alive_max_attempt": int(t["keep_alive_max_attempt"]),
        }
        if self.backend == "c10d":
            conf["is_host"] = "true" if index == self.store_host else "false"  # otherwise the store is ours
            conf["read_timeout"] = t["read"]
        return ",".join(f"{k}={v}" for k, v in conf.items())

    def _start_node(self, spare: bool = False) -> _Node:
        index = len(self.nodes)
        node = _Node(index, self.out_dir / f"node{index}")
        if node.dir.exists():  # a previous run's files would be read as this run's events
            shutil.rmtree(node.dir)
        node.dir.mkdir(parents=True)
        node.marker_dir.mkdir(exist_ok=True)
        write_skew(str(node.clock_file), 0.0)
        if self.netns is not None and node.name not in self.netns.nodes:
            raise LiveError(f"{node.name} has no network namespace: the netns network is made at start() for "
                            f"{len(self.netns.nodes)} nodes (pass spares= for nodes added later)")
        if self.store_host is None and self.store_members == 1:
            # netns: the proxy listens on the bridge's gateway, the one root-namespace address every node reaches
            listen = self.netns.gateway if self.netns is not None else "127.0.0.1"
            node.proxy = TcpProxy((self.store.host, self.store.port), name=node.name, listen_host=listen)
            node.endpoint = node.proxy.endpoint
        else:
            # A store host's survivors must see its port refuse connections to take over (a proxy would accept
            # them), and an etcd client fails over between the members it was given: both reach the store directly.
            node.endpoint = self.store.endpoint
        if self.timers:
            from fault_injection.timers import WorkerTimerServer

            node.timer_server = WorkerTimerServer(str(node.timer_file), run_id=self.run_id)
        env = self._base_env()
        env.update(
            {
                RUN_MARKER_ENV: self.token,
                "ELASTIC_SIM_NODE": str(index),
                "ELASTIC_IMPL_EVENTS_FILE": str(node.events_file),
                "MARKER_DIR": str(node.marker_dir),
                "TRAIN_STEPS": str(self.job["steps"]),
                "TRAIN_STEP_SECONDS": str(self.job["step_seconds"]),
                "ELASTIC_SIM_TRAIN_SCRIPT": self.train_script,
                CLOCK_FILE_ENV: str(node.clock_file),
                "OMP_NUM_THREADS": "1",
            }
        )
        if self.timers:
            env[TIMER_FILE_ENV] = str(node.timer_file)
        if self.job.get("daemon"):
            env[DAEMON_ENV] = DAEMON_MODES[0]  # the daemon keeps the worker's environment (see worker.py)
        if self.job.get("collective"):
            env["TRAIN_ALLREDUCE"] = "every_step"  # examples/train.py: a gloo all-reduce at every step
            env["TRAIN_COLLECTIVE_TIMEOUT"] = str(self.job.get("collective_timeout", 30.0))
        if spare:
            env["ELASTIC_SIM_HOLD_FILE"] = str(node.hold_file)
            node.spare = True
        for key, value in self.job.items():
            if key.isupper():  # extra TRAIN_* knobs for examples/train.py
                env[key] = str(value)
        env.update(self.extra_env)
        t = self.timeouts
        cmd = [
            sys.executable, "-m", "simulator.live.agent_main",
            "--nnodes", f"{self.min_nodes}:{self.max_nodes}",
            "--nproc-per-node", str(self.workers_per_node),
            "--rdzv-backend", self.backend,
            "--rdzv-endpoint", node.endpoint,
            "--rdzv-id", self.run_id,
            "--rdzv-conf", self._rdzv_conf(index),
            "--max-restarts", str(self.max_restarts),
            "--monitor-interval", str(t["monitor"]),
            "--local-addr", self.netns.node(node.name).ip if self.netns is not None else "127.0.0.1",
            "--shutdown-grace", str(self.shutdown_grace),
            _WORKER_SCRIPT,
        ]
        if self.netns is not None:
            env = self.netns.env(node.name, env)  # gloo binds eth0, not the hostname's (loopback) address
            cmd = self.netns.argv(node.name, cmd)  # `ip netns exec` execs: the pid is still the agent's
        with open(node.dir / "agent.out", "ab") as out, open(node.dir / "agent.err", "ab") as err:
            node.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        with self._lock:
            self.nodes.append(node)
        if not spare:
            self.record(node.name, h.AGENT_START, detail={"pid": node.pid, "endpoint": node.endpoint})
        return node

    def _release(self, node: _Node) -> None:
        node.hold_file.write_text("go")
        node.spare = False
        self.record(node.name, h.AGENT_START, detail={"pid": node.pid, "endpoint": node.endpoint,
                                                      "prestarted": True})

    def _drop_spares(self) -> None:
        """Kill spares never released (they ran nothing of the agent) and forget them."""
        spares = [n for n in self.nodes if n.spare]
        if not spares:
            return
        kill_processes([n.pid for n in spares if n.running()])
        for n in spares:
            n.proc.wait(timeout=10)
            n.exit_recorded = True  # not part of the run: no agent_exit record
            if n.proxy is not None:
                n.proxy.close()
            if n.timer_server is not None:
                n.timer_server.stop()
                n.timer_server = None
        with self._lock:
            self.nodes = [n for n in self.nodes if not n.spare]

    # ------------------------------------------------------------------ reading what happened

    def _read_events(self, node: _Node) -> None:
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

    def _event_t(self, node: _Node, raw: dict, read_t: float) -> float:
        ts = raw.get("timestamp")
        if not ts:
            return read_t  # rendezvous events carry no time: when we read them (within one collector poll)
        wall = ts / 1000.0
        return self._t(wall - node.skew_at(wall, self._t0 + read_t))  # undo this node's clock skew

    def _ingest(self, node: _Node, raw: dict, read_t: float) -> None:
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
                            world_size=gws * self.workers_per_node,
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

    def _read_markers(self, node: _Node) -> None:
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
            self.record(node.name, h.WORKER_EXIT, t=self._t(mtime), round=node.worker_round, rank=rank,
                        detail={"exitcode": 0, "pid": payload.get("pid"),
                                "restart_count": int(payload.get("TORCHELASTIC_RESTART_COUNT") or 0),
                                "world_size": int(payload.get("WORLD_SIZE") or 0)})

    def _note_exit(self, node: _Node) -> None:
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

    # ------------------------------------------------------------------ queries

    def node(self, index: int) -> _Node:
        found = next((n for n in self.nodes if n.index == index and not n.spare), None)
        if found is None or isinstance(index, bool):
            have = f"nodes are 0..{len(self.nodes) - 1}" if self.nodes else "the cluster has no nodes (start() first)"
            raise LiveError(f"no node {index!r}; {have}")
        return found

    def node_counts(self) -> tuple[int, int]:
        """(agents running now, agents started so far); pre-started spares on hold are not counted."""
        with self._lock:
            nodes = [n for n in self.nodes if not n.spare]
        return sum(1 for n in nodes if n.running()), len(nodes)

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
            time.sleep(_POLL)

    def _live_worker(self, node: _Node, rank: int, timeout: float) -> int:
        """The pid of the node's current worker at local ``rank``, waiting (bounded) for one we did not kill."""
        if not isinstance(rank, int) or not 0 <= rank < self.workers_per_node:
            raise LiveError(f"invalid local rank {rank!r} on {node.name}; allowed 0..{self.workers_per_node - 1}")
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            pid = node.workers.get(rank)
            if pid is not None and pid not in node.killed_pids and is_alive(pid):
                return pid
            if not node.running():
                raise LiveError(f"{node.name} has exited; it has no worker at local rank {rank}")
            if time.monotonic() > deadline:
                raise LiveError(f"{node.name} started no live worker at local rank {rank} within {timeout:g} s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ the nemesis

    def _on_fault(self, node: _Node | None, extra: dict[str, Any] | None = None) -> Callable[[str, dict], None]:
        def on_event(name: str, detail: dict) -> None:
            d = dict(detail)
            if node is not None:
                d.update(target=node.name, node=node.index)
            d.update(extra or {})
            self.record("nemesis", name, detail=d)

        return on_event

    def _apply(self, fault: Fault, node: _Node | None = None) -> Fault:
        fault.sim_node = None if node is None else node.index  # type: ignore[attr-defined]
        fault.inject()
        if fault.active:
            with self._lock:
                self.faults.append(fault)
        return fault

    def kill_worker(self, node: int, rank: int = 0, timeout: float = 60.0) -> int:
        """SIGKILL the worker at local ``rank`` of ``node`` (waits for one to be running); return its pid."""
        n = self.node(node)
        pid = self._live_worker(n, rank, timeout)
        n.killed_pids.add(pid)
        self._apply(KillWorker(pid, on_event=self._on_fault(n, {"rank": rank})))
        return pid

    def kill_agent(self, node: int) -> list[int]:
        """SIGKILL the node: its agent and every process below it. Return the pids killed."""
        n = self.node(node)
        if not n.running():
            raise LiveError(f"{n.name} is not running (its agent exited with {n.proc.returncode if n.proc else None})")
        n.lost = True
        fault = self._apply(KillAgent(n.pid, on_event=self._on_fault(n)))
        n.killed_pids.update(fault.result or [])
        return list(fault.result or [])

    def pause_agent(self, node: int) -> Fault:
        """SIGSTOP the node's agent (heal: :meth:`heal` or ``fault.heal()``)."""
        n = self.node(node)
        return self._apply(PauseAgent(n.pid, on_event=self._on_fault(n)), n)

    def partition(self, node: int, mode: str = "blackhole") -> Fault:
        """Cut ``node`` off the store: ``blackhole`` (nothing delivered until healed) or ``drop`` (connections
        closed)."""
        n = self._proxied(node, "partition")
        return self._apply(Partition(n.proxy, mode=mode, on_event=self._on_fault(n)), n)

    def delay(self, node: int, seconds: float) -> Fault:
        """Add ``seconds`` of latency to ``node``'s store traffic."""
        n = self._proxied(node, "delay")
        return self._apply(Delay(n.proxy, seconds, on_event=self._on_fault(n)), n)

    def isolate_node(self, node: int) -> Fault:
        """Cut ``node`` off everything -- the store and every peer (netns network only)."""
        n = self.node(node)
        return self._apply(netns.IsolateNode(self._namespaces("isolate_node"), n.name, on_event=self._on_fault(n)), n)

    def split_cluster(self, groups: list[list[int]]) -> Fault:
        """Cut the nodes into ``groups`` (lists of node indices); the first keeps the gateway -- the simulator's store
        and the proxies -- and nodes named in no group join it (netns network only)."""
        cluster = self._namespaces("split_cluster")
        names = [[self.node(i).name for i in group] for group in groups]
        return self._apply(netns.SplitCluster(cluster, names, on_event=self._on_fault(None)))

    def drop_one_way(self, node: int, to: int | str) -> Fault:
        """Lose every packet from ``node`` to node ``to`` (or to ``"store"``: the gateway, where the simulator's store
        and proxies are); the other direction still flows (netns network only)."""
        n = self.node(node)
        dst = to if to == netns.STORE else self.node(to).name
        return self._apply(netns.OneWayDrop(self._namespaces("one_way_drop"), n.name, dst,
                                            on_event=self._on_fault(n, {"to": dst})), n)

    def _namespaces(self, fault: str) -> netns.NetnsCluster:
        if self.netns is None:
            why = "the cluster is not started" if self.network_mode is None else f"this run's network is {self.network_mode}"
            raise LiveError(f"{fault} cuts a node's own network and needs network netns; {why}")
        return self.netns

    def _proxied(self, node: int, fault: str) -> _Node:
        n = self.node(node)
        if n.proxy is None:
            raise LiveError(f"{fault} acts on a node's store proxy, but {n.name} reaches the store {self.store.endpoint} "
                            "directly (store_host or store_members > 1)")
        return n

    def heartbeat_delay(self, node: int, stop_seconds: float, period: float) -> Fault:
        """Stop ``node``'s agent ``stop_seconds`` out of every ``period`` (late heartbeats, slow monitoring)."""
        n = self.node(node)
        return self._apply(HeartbeatDelay(n.pid, stop_seconds, period, on_event=self._on_fault(n)), n)

    def clock_skew(self, node: int, seconds: float) -> Fault:
        """Shift ``node``'s agent wall clock by ``seconds``."""
        n = self.node(node)
        record = self._on_fault(n)
        fault: ClockSkew

        def on_event(name: str, detail: dict) -> None:
            # the node stamps its events with its skewed clock: remember when which offset applied to undo it
            n.skews.append((time.time(), fault.seconds if name == "fault_start" else fault.previous))
            record(name, detail)

        fault = ClockSkew(str(n.clock_file), seconds, on_event=on_event)
        return self._apply(fault, n)

    def expire_timer(self, node: int, rank: int = 0, timeout: float = 60.0) -> int:
        """Expire the watchdog timer of the worker at local ``rank``; the node's timer server reaps it."""
        n = self.node(node)
        if n.timer_server is None:
            raise LiveError("expire_timer needs timers=True (a timer server per node)")
        deadline = time.monotonic() + timeout
        while True:
            pid = self._live_worker(n, rank, max(0.0, deadline - time.monotonic()))
            try:
                self._apply(ExpireTimer(n.timer_server, pid, on_event=self._on_fault(n, {"rank": rank})))
                n.killed_pids.add(pid)
                return pid
            except FaultError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the worker has not acquired its timer yet

    def restart_store(self, downtime: float = 0.0) -> Fault:
        """Crash the store and start it again: at once (``downtime`` 0) or when healed."""
        if self.store_host is not None or self.store_members > 1:
            raise LiveError(f"restart_store needs one store server of the simulator's own; this run's store is "
                            f"{self._store_kind()} (kill_agent the host, or kill_store_leader)")

        def retarget(host: str, port: int) -> None:
            for node in self.nodes:
                if node.proxy is not None:
                    node.proxy.set_upstream((host, port))

        fault = RestartStore(self.store, downtime=downtime, on_restarted=retarget, on_event=self._on_fault(None))
        self._apply(fault)
        if not downtime:
            fault.heal()
        return fault

    def freeze_store(self) -> Fault:
        """SIGSTOP the store (every member of an etcd cluster) until healed: calls hang, connections stay open."""
        if self.store_host is not None:
            raise LiveError(f"freeze_store needs a store process of the simulator's own; this run's store is "
                            f"{self._store_kind()} (pause_agent node{self.store_host} freezes it)")
        servers = self.store.members if self.store_members > 1 else [self.store]
        return self._apply(FreezeStore(servers, on_event=self._on_fault(None)))

    def kill_store_leader(self) -> Fault:
        """SIGKILL the etcd member that leads now (healing starts it again: it rejoins as a follower)."""
        if self.store_members < 3:
            raise LiveError(f"kill_store_leader needs an etcd cluster of >= 3 members (store_members); this run's "
                            f"store is {self._store_kind()}")
        return self._apply(KillStoreLeader(self.store, on_event=self._on_fault(None)))

    def _store_kind(self) -> str:
        if self.store_host is not None:
            return f"hosted by node{self.store_host}'s agent"
        if self.store_members > 1:
            return f"an etcd cluster of {self.store_members} members"
        return f"one {self.backend} store server"

    def heal(self, node: int | None = None) -> int:
        """Heal every active fault (of ``node`` only, if given); return how many were healed."""
        with self._lock:
            targets = [f for f in self.faults if f.active]
        healed = 0
        for fault in targets:
            label = getattr(fault, "sim_node", None)
            if node is not None and label != node:
                continue
            fault.heal()
            healed += 1
        with self._lock:
            self.faults = [f for f in self.faults if f.active]
        return healed

    def add_node(self) -> int:
        """Start one more agent; return its node index."""
        if self._t0 is None:
            raise LiveError("start() the cluster before add_node()")
        spare = next((n for n in self.nodes if n.spare), None)
        if spare is not None and spare.running():
            self._release(spare)
            node = spare
        else:
            if spare is not None:
                raise LiveError(f"spare {spare.name} died on hold (exit code {spare.proc.returncode}); see {spare.dir}")
            node = self._start_node()
        self.record("client", h.OP, detail={"op": "add_node", "node": node.index, "target": node.name})
        return node.index

    def remove_node(self, node: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Ask ``node`` to leave (SIGTERM to its agent: it stops its workers and leaves the rendezvous)."""
        n = self.node(node)
        if not n.running():
            raise LiveError(f"{n.name} is not running")
        n.lost = True
        self.record("client", h.OP, detail={"op": "remove_node", "node": n.index, "target": n.name,
                                             "signal": signal.Signals(sig).name})
        os.kill(n.pid, sig)

    # ------------------------------------------------------------------ the end

    def wait(self, timeout: float = 180.0) -> str:
        """Wait until every agent exited (bounded); record and return the job outcome (succeeded | failed)."""
        if self.outcome is not None:
            return self.outcome
        deadline = time.monotonic() + timeout
        timed_out = False
        self._drop_spares()
        while any(n.running() for n in self.nodes):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(_POLL)
        self.refresh()
        if timed_out:
            running = [n.name for n in self.nodes if n.running()]
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

    def _arrived_after_close(self, node: _Node) -> bool:
        completed = self._history.filter(h.RDZV_COMPLETE, node.name)
        error = (node.agent_exit_event or {}).get("error") or ""
        return not completed and error.startswith("RendezvousClosedError")

    def orphan_check(self, grace: float = 3.0) -> list[int]:
        """Processes of this run still alive now that no agent should be (waits ``grace`` s for exiting ones)."""
        deadline = time.monotonic() + grace
        while True:
            orphans = processes_with_env(RUN_MARKER_ENV, self.token)
            orphans = [p for p in orphans if p not in {n.pid for n in self.nodes if n.running()}]
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
            for node in self.nodes:
                if node.running():
                    try:
                        os.kill(node.pid, signal.SIGCONT)  # a paused agent cannot exit
                    except ProcessLookupError:
                        pass
            self._drop_spares()
            if self.outcome is None and self.nodes:
                # closed before the job ended: stop the agents (leave), then give them their shutdown grace
                for node in self.nodes:
                    if node.running():
                        os.kill(node.pid, signal.SIGTERM)
                self.wait(timeout=self.shutdown_grace + 15)
            self.refresh()
            stuck = [n for n in self.nodes if n.running()]
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
        self._stop.set()
        if self._collector is not None:
            self._collector.join(timeout=5)
        pids = [n.pid for n in self.nodes if n.running()] + processes_with_env(RUN_MARKER_ENV, self.token)
        if pids:
            try:
                kill_processes(pids)
            except FaultError as e:
                logger.error("cleanup: %s", e)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    logger.error("cleanup: %s (pid %s) did not exit", node.name, node.pid)
            if node.proxy is not None:
                node.proxy.close()
            if node.timer_server is not None:
                node.timer_server.stop()
        if self.store is not None:
            # close(): stop and remove what the store owns (etcd data dirs); a TCPStore server only stops
            close = getattr(self.store, "close", None)
            (close or self.store.stop)()
        if self.netns is not None:
            try:
                self.netns.close()  # kills anything still inside, removes namespaces, veths and bridges
            except FaultError as e:
                logger.error("cleanup: %s", e)
                self.record("job", h.OP, detail={"op": "netns_leftovers", "error": str(e)})
        self.refresh()
        with self._lock:
            self._history.sorted().to_jsonl(self.out_dir / "history.jsonl")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AgentHostedStore:
    """The c10d TCPStore a node's agent hosts (``store_host``): the simulator only chooses its port; it lives and
    dies with that agent."""

    def __init__(self, node: int, port: int, host: str = "127.0.0.1") -> None:
        self.node = node
        self.port = port
        self.host = host

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Nothing of the simulator's own to stop: the hosting agent is stopped with the nodes."""


def _round_in(message: str) -> int | None:
    """The round number in a rendezvous event message ("joined round 3", "waiting for the round after 2")."""
    for word in reversed(message.replace(",", " ").split()):
        if word.isdigit():
            return int(word)
    return None
