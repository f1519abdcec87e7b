"""The nodes of a live run: each one an agent process (``elastic-run``) with its files, started, held or asked to
leave."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_injection import TcpProxy
from fault_injection.clock import CLOCK_FILE_ENV, write_skew
from fault_injection.processes import is_alive, kill_processes
from fault_injection.timers import TIMER_FILE_ENV
from simulator import history as h
from simulator.live.network import NetworkSide
from simulator.live.recorder import Recorder
from simulator.live.settings import RUN_MARKER_ENV, LiveError, Settings, base_env
from simulator.live.store import StoreSide
from simulator.live.worker import DAEMON_ENV, DAEMON_MODES

__all__ = ["Agents", "Node"]

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = str(Path(__file__).with_name("worker.py"))


class Node:
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

    def close(self) -> None:
        """Close what the simulator runs for this node (its proxy and timer server); its agent is not touched."""
        if self.proxy is not None:
            self.proxy.close()
        if self.timer_server is not None:
            self.timer_server.stop()
            self.timer_server = None


class Agents:
    """Owns the run's nodes (the list, under the recorder's lock) and their agent processes: how an agent is launched
    (argv, environment, files, its store endpoint and network), the spares pre-started on hold, adding and removing
    a node, finding a node or its live worker, and stopping them all."""

    def __init__(self, settings: Settings, out_dir: Path, token: str, recorder: Recorder, store: StoreSide,
                 network: NetworkSide) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.token = token  # RUN_MARKER_ENV of every process of the run
        self.recorder = recorder
        self.store = store
        self.network = network
        self.nodes: list[Node] = []

    # ------------------------------------------------------------------ launching

    def _rdzv_conf(self, index: int) -> str:
        s, t = self.settings, self.settings.timeouts
        conf = {
            "join_timeout": t["join"],
            "last_call_timeout": t["last_call"],
            "close_timeout": t["close"],
            "keep_alive_interval": t["heartbeat"],
            "keep_alive_max_attempt": int(t["keep_alive_max_attempt"]),
        }
        if s.backend == "c10d":
            conf["is_host"] = "true" if index == s.store_host else "false"  # otherwise the store is ours
            conf["read_timeout"] = t["read"]
        return ",".join(f"{k}={v}" for k, v in conf.items())

    def _env(self, node: Node) -> dict[str, str]:
        s = self.settings
        env = base_env()
        env.update(
            {
                RUN_MARKER_ENV: self.token,
                "ELASTIC_SIM_NODE": str(node.index),
                "ELASTIC_IMPL_EVENTS_FILE": str(node.events_file),
                "MARKER_DIR": str(node.marker_dir),
                "TRAIN_STEPS": str(s.job["steps"]),
                "TRAIN_STEP_SECONDS": str(s.job["step_seconds"]),
                "ELASTIC_SIM_TRAIN_SCRIPT": s.train_script,
                CLOCK_FILE_ENV: str(node.clock_file),
                "OMP_NUM_THREADS": "1",
            }
        )
        if s.timers:
            env[TIMER_FILE_ENV] = str(node.timer_file)
        if s.job.get("daemon"):
            env[DAEMON_ENV] = DAEMON_MODES[0]  # the daemon keeps the worker's environment (see worker.py)
        if s.job.get("collective"):
            env["TRAIN_ALLREDUCE"] = "every_step"  # examples/train.py: a gloo all-reduce at every step
            env["TRAIN_COLLECTIVE_TIMEOUT"] = str(s.job.get("collective_timeout", 30.0))
        if node.spare:
            env["ELASTIC_SIM_HOLD_FILE"] = str(node.hold_file)
        for key, value in s.job.items():
            if key.isupper():  # extra TRAIN_* knobs for examples/train.py
                env[key] = str(value)
        env.update(s.env)
        return env

    def _argv(self, node: Node) -> list[str]:
        s = self.settings
        return [
            sys.executable, "-m", "simulator.live.agent_main",
            "--nnodes", f"{s.min_nodes}:{s.max_nodes}",
            "--nproc-per-node", str(s.workers_per_node),
            "--rdzv-backend", s.backend,
            "--rdzv-endpoint", node.endpoint,
            "--rdzv-id", s.run_id,
            "--rdzv-conf", self._rdzv_conf(node.index),
            "--max-restarts", str(s.max_restarts),
            "--monitor-interval", str(s.timeouts["monitor"]),
            "--local-addr", self.network.address(node.name),
            "--shutdown-grace", str(s.shutdown_grace),
            _WORKER_SCRIPT,
        ]

    def launch(self, spare: bool = False) -> Node:
        """Start the next node's agent (``spare``: on hold until :meth:`release`)."""
        index = len(self.nodes)
        node = Node(index, self.out_dir / f"node{index}")
        if node.dir.exists():  # a previous run's files would be read as this run's events
            shutil.rmtree(node.dir)
        node.dir.mkdir(parents=True)
        node.marker_dir.mkdir(exist_ok=True)
        write_skew(str(node.clock_file), 0.0)
        self.network.check_node(node.name)
        self.store.connect(node, self.network)
        if self.settings.timers:
            from fault_injection.timers import WorkerTimerServer

            node.timer_server = WorkerTimerServer(str(node.timer_file), run_id=self.settings.run_id)
        node.spare = spare
        env, argv = self.network.wrap(node.name, self._env(node), self._argv(node))
        with open(node.dir / "agent.out", "ab") as out, open(node.dir / "agent.err", "ab") as err:
            node.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        with self.recorder.lock:
            self.nodes.append(node)
        if not spare:
            self.recorder.record(node.name, h.AGENT_START, detail={"pid": node.pid, "endpoint": node.endpoint})
        return node

    def release(self, node: Node) -> None:
        node.hold_file.write_text("go")
        node.spare = False
        self.recorder.record(node.name, h.AGENT_START, detail={"pid": node.pid, "endpoint": node.endpoint,
                                                               "prestarted": True})

    def drop_spares(self) -> None:
        """Kill spares never released (they ran nothing of the agent) and forget them."""
        spares = [n for n in self.nodes if n.spare]
        if not spares:
            return
        kill_processes([n.pid for n in spares if n.running()])
        for n in spares:
            n.proc.wait(timeout=10)
            n.exit_recorded = True  # not part of the run: no agent_exit record
            n.close()
        with self.recorder.lock:
            self.nodes = [n for n in self.nodes if not n.spare]

    # ------------------------------------------------------------------ membership ops

    def add_node(self) -> int:
        """Start one more agent (release a spare if one is on hold); return its node index."""
        if self.recorder.t0 is None:
            raise LiveError("start() the cluster before add_node()")
        spare = next((n for n in self.nodes if n.spare), None)
        if spare is not None and spare.running():
            self.release(spare)
            node = spare
        else:
            if spare is not None:
                raise LiveError(f"spare {spare.name} died on hold (exit code {spare.proc.returncode}); see {spare.dir}")
            node = self.launch()
        self.recorder.record("client", h.OP, detail={"op": "add_node", "node": node.index, "target": node.name})
        return node.index

    def remove_node(self, node: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Ask ``node`` to leave (SIGTERM to its agent: it stops its workers and leaves the rendezvous)."""
        n = self.node(node)
        if not n.running():
            raise LiveError(f"{n.name} is not running")
        n.lost = True
        self.recorder.record("client", h.OP, detail={"op": "remove_node", "node": n.index, "target": n.name,
                                                     "signal": signal.Signals(sig).name})
        os.kill(n.pid, sig)

    # ------------------------------------------------------------------ queries

    def node(self, index: int) -> Node:
        found = next((n for n in self.nodes if n.index == index and not n.spare), None)
        if found is None or isinstance(index, bool):
            have = f"nodes are 0..{len(self.nodes) - 1}" if self.nodes else "the cluster has no nodes (start() first)"
            raise LiveError(f"no node {index!r}; {have}")
        return found

    def node_counts(self) -> tuple[int, int]:
        """(agents running now, agents started so far); pre-started spares on hold are not counted."""
        with self.recorder.lock:
            nodes = [n for n in self.nodes if not n.spare]
        return sum(1 for n in nodes if n.running()), len(nodes)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running()]

    def refresh(self) -> None:
        """Read what every node wrote so far into the history."""
        self.recorder.refresh(self.nodes)

    def live_worker(self, node: Node, rank: int, timeout: float) -> int:
        """The pid of the node's current worker at local ``rank``, waiting (bounded) for one we did not kill."""
        workers = self.settings.workers_per_node
        if not isinstance(rank, int) or not 0 <= rank < workers:
            raise LiveError(f"invalid local rank {rank!r} on {node.name}; allowed 0..{workers - 1}")
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

    # ------------------------------------------------------------------ the end

    def continue_paused(self) -> None:
        """SIGCONT every running agent: a paused agent cannot exit."""
        for node in self.running():
            try:
                os.kill(node.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Wait for every agent (already killed) and close what the simulator runs for each node."""
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    logger.error("cleanup: %s (pid %s) did not exit", node.name, node.pid)
            node.close()
