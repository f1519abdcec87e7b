"""The nemesis of a live run: real faults (``fault_injection``) applied to its nodes, store and network."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    netns,
)
from simulator.live.agents import Agents, Node
from simulator.live.network import NetworkSide
from simulator.live.recorder import Recorder
from simulator.live.settings import LiveError, Settings
from simulator.live.store import StoreSide

__all__ = ["Nemesis"]


class Nemesis:
    """Owns the faults still active: applies each one (refusing, with the reason, one this run's store or network
    cannot take), labels it with its node, records its start and end as ``nemesis`` history events, and heals them
    (all, or one node's). The public methods are the fault registry's live side (:mod:`simulator.faults`)."""

    def __init__(self, settings: Settings, recorder: Recorder, agents: Agents, store: StoreSide,
                 network: NetworkSide) -> None:
        self.settings = settings
        self.recorder = recorder
        self.agents = agents
        self.store = store
        self.network = network
        self.faults: list[Fault] = []

    def _on_fault(self, node: Node | None, extra: dict[str, Any] | None = None) -> Callable[[str, dict], None]:
        def on_event(name: str, detail: dict) -> None:
            d = dict(detail)
            if node is not None:
                d.update(target=node.name, node=node.index)
            d.update(extra or {})
            self.recorder.record("nemesis", name, detail=d)

        return on_event

    def _apply(self, fault: Fault, node: Node | None = None) -> Fault:
        fault.sim_node = None if node is None else node.index  # type: ignore[attr-defined]
        fault.inject()
        if fault.active:
            with self.recorder.lock:
                self.faults.append(fault)
        return fault

    def _proxied(self, node: int, fault: str) -> Node:
        n = self.agents.node(node)
        if n.proxy is None:
            raise LiveError(f"{fault} acts on a node's store proxy, but {n.name} reaches the store "
                            f"{self.store.server.endpoint} directly (store_host or store_members > 1)")
        return n

    # ------------------------------------------------------------------ processes

    def kill_worker(self, node: int, rank: int = 0, timeout: float = 60.0) -> int:
        """SIGKILL the worker at local ``rank`` of ``node`` (waits for one to be running); return its pid."""
        n = self.agents.node(node)
        pid = self.agents.live_worker(n, rank, timeout)
        n.killed_pids.add(pid)
        self._apply(KillWorker(pid, on_event=self._on_fault(n, {"rank": rank})))
        return pid

    def kill_agent(self, node: int) -> list[int]:
        """SIGKILL the node: its agent and every process below it. Return the pids killed."""
        n = self.agents.node(node)
        if not n.running():
            raise LiveError(f"{n.name} is not running (its agent exited with {n.proc.returncode if n.proc else None})")
        n.lost = True
        fault = self._apply(KillAgent(n.pid, on_event=self._on_fault(n)))
        n.killed_pids.update(fault.result or [])
        return list(fault.result or [])

    def pause_agent(self, node: int) -> Fault:
        """SIGSTOP the node's agent (heal: :meth:`heal` or ``fault.heal()``)."""
        n = self.agents.node(node)
        return self._apply(PauseAgent(n.pid, on_event=self._on_fault(n)), n)

    def heartbeat_delay(self, node: int, stop_seconds: float, period: float) -> Fault:
        """Stop ``node``'s agent ``stop_seconds`` out of every ``period`` (late heartbeats, slow monitoring)."""
        n = self.agents.node(node)
        return self._apply(HeartbeatDelay(n.pid, stop_seconds, period, on_event=self._on_fault(n)), n)

    def clock_skew(self, node: int, seconds: float) -> Fault:
        """Shift ``node``'s agent wall clock by ``seconds``."""
        n = self.agents.node(node)
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
        n = self.agents.node(node)
        if n.timer_server is None:
            raise LiveError("expire_timer needs timers=True (a timer server per node)")
        deadline = time.monotonic() + timeout
        while True:
            pid = self.agents.live_worker(n, rank, max(0.0, deadline - time.monotonic()))
            try:
                self._apply(ExpireTimer(n.timer_server, pid, on_event=self._on_fault(n, {"rank": rank})))
                n.killed_pids.add(pid)
                return pid
            except FaultError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the worker has not acquired its timer yet

    # ------------------------------------------------------------------ the store path and the network

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
        n = self.agents.node(node)
        cluster = self.network.namespaces("isolate_node")
        return self._apply(netns.IsolateNode(cluster, n.name, on_event=self._on_fault(n)), n)

    def split_cluster(self, groups: list[list[int]]) -> Fault:
        """Cut the nodes into ``groups`` (lists of node indices); the first keeps the gateway -- the simulator's store
        and the proxies -- and nodes named in no group join it (netns network only)."""
        cluster = self.network.namespaces("split_cluster")
        names = [[self.agents.node(i).name for i in group] for group in groups]
        return self._apply(netns.SplitCluster(cluster, names, on_event=self._on_fault(None)))

    def drop_one_way(self, node: int, to: int | str) -> Fault:
        """Lose every packet from ``node`` to node ``to`` (or to ``"store"``: the gateway, where the simulator's store
        and proxies are); the other direction still flows (netns network only)."""
        n = self.agents.node(node)
        dst = to if to == netns.STORE else self.agents.node(to).name
        return self._apply(netns.OneWayDrop(self.network.namespaces("one_way_drop"), n.name, dst,
                                            on_event=self._on_fault(n, {"to": dst})), n)

    # ------------------------------------------------------------------ the store

    def restart_store(self, downtime: float = 0.0) -> Fault:
        """Crash the store and start it again: at once (``downtime`` 0) or when healed."""
        if not self.store.proxied:
            raise LiveError(f"restart_store needs one store server of the simulator's own; this run's store is "
                            f"{self.store.kind()} (kill_agent the host, or kill_store_leader)")

        def retarget(host: str, port: int) -> None:
            for node in self.agents.nodes:
                if node.proxy is not None:
                    node.proxy.set_upstream((host, port))

        fault = RestartStore(self.store.server, downtime=downtime, on_restarted=retarget,
                             on_event=self._on_fault(None))
        self._apply(fault)
        if not downtime:
            fault.heal()
        return fault

    def freeze_store(self) -> Fault:
        """SIGSTOP the store (every member of an etcd cluster) until healed: calls hang, connections stay open."""
        s = self.settings
        if s.store_host is not None:
            raise LiveError(f"freeze_store needs a store process of the simulator's own; this run's store is "
                            f"{self.store.kind()} (pause_agent node{s.store_host} freezes it)")
        servers = self.store.server.members if s.store_members > 1 else [self.store.server]
        return self._apply(FreezeStore(servers, on_event=self._on_fault(None)))

    def kill_store_leader(self) -> Fault:
        """SIGKILL the etcd member that leads now (healing starts it again: it rejoins as a follower)."""
        if self.settings.store_members < 3:
            raise LiveError(f"kill_store_leader needs an etcd cluster of >= 3 members (store_members); this run's "
                            f"store is {self.store.kind()}")
        return self._apply(KillStoreLeader(self.store.server, on_event=self._on_fault(None)))

    # ------------------------------------------------------------------ healing

    def heal(self, node: int | None = None) -> int:
        """Heal every active fault (of ``node`` only, if given); return how many were healed."""
        with self.recorder.lock:
            targets = [f for f in self.faults if f.active]
        healed = 0
        for fault in targets:
            label = getattr(fault, "sim_node", None)
            if node is not None and label != node:
                continue
            fault.heal()
            healed += 1
        with self.recorder.lock:
            self.faults = [f for f in self.faults if f.active]
        return healed
