"""The store a live run's nodes rendezvous through, and the path from each node to it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fault_injection import TcpProxy
from fault_injection.store import _free_port
from simulator.live.network import NetworkSide
from simulator.live.settings import Settings, base_env

if TYPE_CHECKING:
    from simulator.live.agents import Node

__all__ = ["AgentHostedStore", "StoreSide"]


class AgentHostedStore:
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


class StoreSide:
    """Owns the run's store -- a server of the simulator's own (TCPStore, one etcd server, an etcd cluster) or the
    place of the agent-hosted one -- and each node's way to it: a proxy of the node's own where one can carry the
    traffic (so one node can be cut off or slowed), the store's endpoint itself where not."""

    def __init__(self, settings: Settings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.server: Any = None  # None until start()

    def start(self, network: NetworkSide) -> None:
        s = self.settings
        if s.store_host is not None:
            # in a namespace the hosting node listens on its own address (its port is its namespace's: any will do)
            self.server = AgentHostedStore(s.store_host, _free_port(), network.address(f"node{s.store_host}"))
        elif s.backend == "c10d":
            from fault_injection.store import TCPStoreServer

            self.server = TCPStoreServer(env=base_env()).start()
        elif s.store_members > 1:
            from fault_injection.store import EtcdCluster

            self.server = EtcdCluster(s.store_members).start()
        else:
            from fault_injection.store import EtcdStoreServer

            self.server = EtcdStoreServer(data_dir=str(self.out_dir / "etcd-data")).start()

    @property
    def proxied(self) -> bool:
        """Whether nodes reach the store through proxies of their own."""
        return self.settings.store_host is None and self.settings.store_members == 1

    def connect(self, node: Node, network: NetworkSide) -> None:
        """Give ``node`` its endpoint (and its proxy, where the store is proxied)."""
        if self.proxied:
            node.proxy = TcpProxy((self.server.host, self.server.port), name=node.name, listen_host=network.proxy_host)
            node.endpoint = node.proxy.endpoint
        else:
            # A store host's survivors must see its port refuse connections to take over (a proxy would accept
            # them), and an etcd client fails over between the members it was given: both reach the store directly.
            node.endpoint = self.server.endpoint

    def kind(self) -> str:
        """What this run's store is, for messages."""
        s = self.settings
        if s.store_host is not None:
            return f"hosted by node{s.store_host}'s agent"
        if s.store_members > 1:
            return f"an etcd cluster of {s.store_members} members"
        return f"one {s.backend} store server"

    def close(self) -> None:
        """Stop the store and remove what it owns (etcd data dirs); a TCPStore server only stops."""
        if self.server is not None:
            close = getattr(self.server, "close", None)
            (close or self.server.stop)()
