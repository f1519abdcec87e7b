"""The network a live run's nodes are on: loopback behind per-node store proxies, or a namespace per node."""

from __future__ import annotations

from typing import Any

from fault_injection import netns
from simulator.live.settings import LiveError, Settings

__all__ = ["NetworkSide"]

_LOOPBACK = "127.0.0.1"


class NetworkSide:
    """Owns the choice of network (``netns`` | ``proxy``, and why) and, in ``netns``, the namespaces
    (:class:`fault_injection.netns.NetnsCluster`): what address a node has, where the store proxies listen, how a
    node's agent is launched inside its namespace. Removes the namespaces at :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mode: str | None = None  # what runs: netns | proxy (set by create())
        self.why = ""
        self.netns: netns.NetnsCluster | None = None

    def resolve(self) -> tuple[str, str]:
        """(netns | proxy, why) for this run; a forced netns that cannot be had is an error naming the reason."""
        requested, members = self.settings.network, self.settings.store_members
        why_not = netns.unavailable_reason() if requested != "proxy" else None
        if members > 1 and requested != "proxy":
            # the etcd members listen on loopback and the clients fail over between them: no proxy to carry them
            why_not = f"an etcd cluster of {members} members is reached on loopback, by no proxy"
        if requested == "proxy":
            return "proxy", "asked for (network: proxy)"
        if why_not is None:
            return "netns", "asked for (network: netns)" if requested == "netns" else "namespaces available"
        if requested == "netns":
            raise LiveError(f"network netns is not possible here: {why_not} (use network auto or proxy)")
        return "proxy", f"network namespaces unavailable: {why_not}"

    def create(self, names: list[str]) -> None:
        """Resolve the mode; in netns, make a namespace for every node the run may have (spares included) now:
        one cluster, one subnet."""
        self.mode, self.why = self.resolve()
        if self.mode == "netns":
            self.netns = netns.NetnsCluster(names).create()

    def describe(self) -> dict[str, Any]:
        """The ``network`` op's detail: which mode runs, which was asked for, why (and the subnet in netns)."""
        detail = {"op": "network", "mode": self.mode, "requested": self.settings.network, "why": self.why}
        if self.netns is not None:
            detail.update(subnet=str(self.netns.subnet), gateway=self.netns.gateway)
        return detail

    def address(self, name: str) -> str:
        """The address node ``name`` listens on (its agent's ``--local-addr``; a hosted store's host)."""
        return self.netns.node(name).ip if self.netns is not None else _LOOPBACK

    @property
    def proxy_host(self) -> str:
        """Where the store proxies listen: in netns the bridge's gateway, the one root-namespace address every node
        reaches."""
        return self.netns.gateway if self.netns is not None else _LOOPBACK

    def check_node(self, name: str) -> None:
        if self.netns is not None and name not in self.netns.nodes:
            raise LiveError(f"{name} has no network namespace: the netns network is made at start() for "
                            f"{len(self.netns.nodes)} nodes (pass spares= for nodes added later)")

    def wrap(self, name: str, env: dict[str, str], argv: list[str]) -> tuple[dict[str, str], list[str]]:
        """``env`` and ``argv`` to launch node ``name``'s agent on this network."""
        if self.netns is None:
            return env, argv
        # gloo binds eth0, not the hostname's (loopback) address; `ip netns exec` execs: the pid is still the agent's
        return self.netns.env(name, env), self.netns.argv(name, argv)

    def namespaces(self, fault: str) -> netns.NetnsCluster:
        """The namespaces, for a whole-node fault named ``fault`` (an error naming why there are none)."""
        if self.netns is None:
            why = "the cluster is not started" if self.mode is None else f"this run's network is {self.mode}"
            raise LiveError(f"{fault} cuts a node's own network and needs network netns; {why}")
        return self.netns

    def close(self) -> None:
        """Kill anything still inside, remove namespaces, veths and bridges (raises FaultError for leftovers)."""
        if self.netns is not None:
            self.netns.close()
