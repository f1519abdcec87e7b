"""Whole-node network faults: every node in its own network namespace, so a fault cuts the store AND the peers.

The loopback proxy (:mod:`fault_injection.network`) only sits between a node and the store; the workers' own
collective traffic (gloo, NCCL) never crosses it. Here each node is a network namespace (``ip netns``) with one
interface ``eth0``, the inside end of a veth pair whose outside end is a port of a bridge in the root namespace.
The bridge holds the cluster's gateway address (``.1`` of a private /24), so the store serves there (bind
``0.0.0.0`` or :attr:`NetnsCluster.gateway`) and every node reaches it; node ``i`` has ``.(i + 2)``. Loopback inside
a namespace is the namespace's own: two nodes can both listen on ``127.0.0.1:29400``.

Faults (all silent drops, no resets: what a failed NIC, cable or switch looks like to TCP -- peers' sends are
retransmitted, receives hang until their own timeouts):

- :class:`IsolateNode`: the node's port moves to a bridge of its own; it reaches nobody, nobody reaches it.
- :class:`SplitCluster`: the nodes are cut into groups; the first group stays with the gateway (the store), each
  other group gets a bridge of its own (its members still reach each other).
- :class:`OneWayDrop`: every packet from ``src`` to ``dst`` (a node or ``"store"``, the gateway) is lost, the other
  direction still flows: ``src``'s neighbour entry for ``dst``'s address points at a MAC nobody owns, so its frames
  are flooded by the bridge and dropped by every receiver.

Heal puts the ports back on the cluster bridge / deletes the false neighbour entry; frames held nowhere are lost,
TCP retransmits and the connections carry on if their peers did not give up meanwhile.

What this kernel offers (probed 2026-12, ``6.18.44-fc-v1300``): qdiscs ``clsact``, ``ingress``, ``htb``, ``tbf``,
``pfifo``/``bfifo``/``pfifo_fast``; the ``u32`` classifier (classification only: ``flowid``). NOT present: ``netem``,
``plug``, ``fq``, ``red`` and every other qdisc tried, the ``matchall``/``flower``/``basic`` classifiers, and any tc
action (``gact drop``, ``police``, ``mirred``: "Failed to load TC action module"); no nftables or iptables. So:

- loss is all-or-nothing per direction (:class:`OneWayDrop`); a loss *probability* needs netem or ``gact random``,
  which this kernel lacks;
- latency cannot be added to the namespaces' traffic here; for the store path run a
  :class:`~fault_injection.network.TcpProxy` in the root namespace listening on the gateway
  (:meth:`NetnsCluster.store_proxy`) and use :class:`~fault_injection.network.Delay` on it -- collective traffic
  between nodes gets no added latency.

Inside a namespace the machine's hostname still resolves to what it does outside (here ``127.0.0.1``), which is not
the node's address on the cluster, so processes there must be told: agents get ``--local-addr <node ip>`` (what
they advertise to workers as MASTER_ADDR); workers get ``GLOO_SOCKET_IFNAME=eth0`` (:meth:`NetnsCluster.env`;
without it gloo binds loopback and its peers are refused); the node hosting the c10d store gets
``--rdzv-conf is_host=true`` (an address of a secondary interface is not recognised as this machine's -- upstream
has the same false negative). Each namespace gets its own ``/etc/hosts`` (the nodes by name, the gateway as
``store``) and a resolv.conf without a nameserver, so torch's reverse lookups of peers fail at once instead of
waiting out DNS.

Everything created (namespaces, veths, bridges, false neighbour entries, processes still running in a namespace) is
removed by :meth:`NetnsCluster.close` (the context manager's exit), also when setup itself failed half way.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fault_injection.base import Fault, FaultError
from fault_injection.network import TcpProxy
from fault_injection.processes import kill_processes

__all__ = ["NetnsCluster", "NetnsNode", "IsolateNode", "SplitCluster", "OneWayDrop", "unavailable_reason",
           "leftovers", "STORE"]

STORE = "store"  # the gateway (root namespace) as a OneWayDrop end
NAME_PREFIX = "elnet"  # every namespace is elnet-<tag>-<node>; links are eb<tag>N (bridges) / ev<tag>N (veths)
# Private /24s are picked from 10.200.0.0/16 - 10.239.255.0/24, skipping any the root namespace already routes.
_SUBNET_POOL = ipaddress.ip_network("10.200.0.0/13")
_LOCK_PATH = "/run/lock/elastic-netns.lock"  # serialises subnet choice between concurrent clusters
_BOGUS_MAC = "02:00:5e:00:de:ad"  # locally administered, owned by no interface
_MAX_NODES = 250


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise FaultError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable_reason() -> str | None:
    """``None`` when namespaces can be made here (root, ``ip``, ``ip netns add`` works), else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root; running as uid {os.geteuid()}"
    probe = f"{NAME_PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def leftovers(tag: str = "") -> list[str]:
    """Namespaces and links left by clusters (of ``tag``, or any): ``["netns elnet-...", "link ev...", ...]``."""
    found = [f"netns {line.split()[0]}" for line in _ip("netns", "list").stdout.splitlines()
             if line.startswith(f"{NAME_PREFIX}-{tag}")]
    if os.path.isdir("/etc/netns"):
        found += [f"file /etc/netns/{name}" for name in os.listdir("/etc/netns") if name.startswith(f"{NAME_PREFIX}-{tag}")]
    ours = re.compile(r"^e[bvp]" + (re.escape(tag) if tag else "[0-9a-f]{5}") + r"\d+$")
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if ours.match(name):
            found.append(f"link {name}")
    return found


@dataclass(frozen=True)
class NetnsNode:
    name: str
    netns: str  # the namespace's name (``ip netns exec <netns> ...``)
    ip: str  # its address on eth0
    host_veth: str  # the outside end of its veth (a bridge port in the root namespace)
    ifname: str = "eth0"


class NetnsCluster:
    """Namespaces for ``nodes`` (names: letters, digits, ``_``), joined by a bridge; a context manager.

    ``create()``/``__enter__`` builds it, ``close()``/``__exit__`` removes all of it (idempotent).
    """

    def __init__(self, nodes: Sequence[str]) -> None:
        names = list(nodes)
        if not names or len(names) > _MAX_NODES:
            raise FaultError(f"a netns cluster needs 1 to {_MAX_NODES} nodes, got {len(names)}")
        for name in names:
            if not isinstance(name, str) or not name.replace("_", "").isalnum() or name == STORE:
                raise FaultError(f"invalid node name {name!r}; allowed: letters, digits and '_', not {STORE!r}")
        if len(set(names)) != len(names):
            raise FaultError(f"duplicate node names in {names}")
        self.tag = secrets.token_hex(3)[:5]  # interface names have 15 characters at most: ev<5><index>
        self.names = names
        self.nodes: dict[str, NetnsNode] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self._bridges: list[str] = []  # [0]: the cluster bridge with the gateway; others: segments made by faults
        self._segment: dict[str, int] = {}  # node -> index into _bridges
        self._false_neighbours: set[tuple[str, str]] = set()  # (src, dst) with a OneWayDrop in place
        # What popen started: killed at close even if `ip netns exec` had not entered the namespace yet (then `ip
        # netns pids` misses it, and it ran on in a deleted namespace: seen in CI, a `sleep 600` left behind).
        self._started: list[subprocess.Popen] = []

    # -- building and removing -----------------------------------------------------------------------------------
    def create(self) -> NetnsCluster:
        try:
            with open(_LOCK_PATH, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # no two clusters may pick the same free subnet
                self.subnet = self._free_subnet()
                hosts = list(self.subnet.hosts())
                self.gateway = str(hosts[0])
                bridge = self._new_bridge()
                _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", bridge)
            for index, name in enumerate(self.names):
                self._add_node(index, name, str(hosts[index + 1]))
        except BaseException:
            self.close()
            raise
        return self

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = []
        for line in _ip("-4", "-o", "addr", "show").stdout.splitlines() + _ip("-4", "route", "show").stdout.splitlines():
            for word in line.split():
                if "/" in word or word.count(".") == 3:
                    try:
                        used.append(ipaddress.ip_network(word, strict=False))
                    except ValueError:
                        pass
        candidates = list(_SUBNET_POOL.subnets(new_prefix=24))
        start = secrets.randbelow(len(candidates))
        for subnet in candidates[start:] + candidates[:start]:
            if not any(subnet.overlaps(other) for other in used if other.prefixlen > 0):
                return subnet
        raise FaultError(f"no free /24 left in {_SUBNET_POOL}")

    def _new_bridge(self) -> str:
        name = f"eb{self.tag}{len(self._bridges)}"
        _ip("link", "add", "name", name, "type", "bridge")
        self._bridges.append(name)
        # A fixed address: a bridge otherwise takes its lowest port's MAC, and a node moved to a segment bridge
        # could then still address the gateway bridge's MAC there and be answered by the root namespace.
        _ip("link", "set", name, "address", "02:00:5e:" + ":".join(secrets.token_hex(1) for _ in range(3)))
        if len(self._bridges) > 1:
            # Segment bridges carry no address; without this the root namespace would still answer ARP for the
            # gateway on them (Linux answers for any local address on any interface).
            with open(f"/proc/sys/net/ipv4/conf/{name}/arp_ignore", "w") as f:
                f.write("8")
        _ip("link", "set", name, "up")
        return name

    def _add_node(self, index: int, name: str, ip: str) -> None:
        netns = f"{NAME_PREFIX}-{self.tag}-{name}"
        host_veth, inner = f"ev{self.tag}{index}", f"ep{self.tag}{index}"
        _ip("netns", "add", netns)
        node = NetnsNode(name, netns, ip, host_veth)
        self.nodes[name] = node
        self._write_name_files(node)
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("-n", netns, "link", "set", inner, "name", node.ifname)
        _ip("-n", netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", node.ifname)
        _ip("-n", netns, "link", "set", node.ifname, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        _ip("link", "set", host_veth, "master", self._bridges[0])
        _ip("link", "set", host_veth, "up")
        self._segment[name] = 0

    def _write_name_files(self, node: NetnsNode) -> None:
        # `ip netns exec` bind-mounts /etc/netns/<netns>/* over /etc. Without a nameserver that answers, every
        # reverse lookup torch makes of a peer (c10d logs the client's hostname) waits out DNS timeouts: ~10 s per
        # store connection was measured. So: an empty resolv.conf (the resolver tries the namespace's own loopback,
        # refused at once) and a hosts file naming the gateway and every node.
        folder = f"/etc/netns/{node.netns}"
        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}/resolv.conf", "w") as f:
            f.write("# no nameserver inside a fault_injection.netns namespace\n")
        hosts = [("127.0.0.1", "localhost"), (self.gateway, STORE)]
        hosts += [(str(list(self.subnet.hosts())[i + 1]), name) for i, name in enumerate(self.names)]
        with open(f"{folder}/hosts", "w") as f:
            f.writelines(f"{address} {name}\n" for address, name in hosts)

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them (their veths go with them) and the bridges."""
        errors = []
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    errors.append(f"process {proc.pid} ({' '.join(map(str, proc.args))[:80]}) survived SIGKILL")
        self._started.clear()
        for node in self.nodes.values():
            pids = [int(p) for p in _ip("netns", "pids", node.netns, check=False).stdout.split()]
            try:
                if pids:
                    kill_processes(pids)  # a namespace with a process in it outlives `ip netns del`, veth and all
            except FaultError as e:
                errors.append(str(e))
            shutil.rmtree(f"/etc/netns/{node.netns}", ignore_errors=True)
            for cmd in (("netns", "del", node.netns), ("link", "del", node.host_veth)):
                done = _ip(*cmd, check=False)
                if done.returncode != 0 and "Cannot find device" not in done.stderr \
                        and "No such file" not in done.stderr:
                    errors.append(f"`ip {' '.join(cmd)}`: {done.stderr.strip()}")
        for bridge in self._bridges:
            done = _ip("link", "del", bridge, check=False)
            if done.returncode != 0 and "Cannot find device" not in done.stderr:
                errors.append(f"`ip link del {bridge}`: {done.stderr.strip()}")
        self.nodes.clear()
        self._bridges.clear()
        self._false_neighbours.clear()
        if errors:
            raise FaultError("netns cluster teardown left something behind: " + "; ".join(errors))

    def __enter__(self) -> NetnsCluster:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things in a node ------------------------------------------------------------------------------
    def node(self, name: str) -> NetnsNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise FaultError(f"unknown node {name!r}; nodes: {', '.join(self.nodes) or 'none (not created)'}") from None

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside node ``name``'s namespace."""
        return ["ip", "netns", "exec", self.node(name).netns, *argv]

    def env(self, name: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) plus what torch needs in node ``name``: gloo binds to
        ``eth0`` (by default it binds the hostname's address, loopback here)."""
        env = dict(os.environ if base is None else base)
        env["GLOO_SOCKET_IFNAME"] = self.node(name).ifname
        return env

    def popen(self, name: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``name``'s namespace; :meth:`close` kills it if it still runs."""
        kwargs.setdefault("env", self.env(name))
        proc = subprocess.Popen(self.argv(name, argv), **kwargs)
        self._started = [p for p in self._started if p.poll() is None]
        self._started.append(proc)
        return proc

    def store_proxy(self, upstream: tuple[str, int], name: str = "store-proxy") -> TcpProxy:
        """A :class:`TcpProxy` every node reaches (it listens on the gateway): the way to delay the store path."""
        return TcpProxy(upstream, listen_host=self.gateway, name=name)

    # -- connectivity --------------------------------------------------------------------------------------------
    def segments(self) -> list[list[str]]:
        """The nodes on each bridge that has any; the first list is the gateway's (store's) side."""
        sides: dict[int, list[str]] = {}
        for name in self.names:
            sides.setdefault(self._segment[name], []).append(name)
        return [sides[i] for i in sorted(sides)]

    def place(self, groups: Iterable[Iterable[str]]) -> None:
        """Group ``i`` goes on segment ``i`` (segment 0 has the gateway); nodes in no group go to segment 0."""
        wanted: dict[str, int] = {}
        for index, group in enumerate(groups):
            for name in group:
                self.node(name)
                if name in wanted:
                    raise FaultError(f"node {name!r} is in two groups")
                wanted[name] = index
        moved = False
        for name in self.names:
            segment = wanted.get(name, 0)
            while segment >= len(self._bridges):
                self._new_bridge()
            if self._segment[name] != segment:
                _ip("link", "set", self.nodes[name].host_veth, "master", self._bridges[segment])
                self._segment[name] = segment
                moved = True
        if moved:
            self._forget_failed_neighbours()

    def _forget_failed_neighbours(self) -> None:
        """Drop the learnt (not permanent) neighbour entries everywhere: addresses that failed to resolve while cut
        would otherwise answer "No route to host" for a few seconds after the cut is gone."""
        _ip("neigh", "flush", "dev", self._bridges[0], check=False)
        for node in self.nodes.values():
            _ip("-n", node.netns, "neigh", "flush", "dev", node.ifname, check=False)

    def join_all(self) -> None:
        """Every node back on the cluster bridge."""
        self.place([])

    def _drop_target(self, src: str, dst: str) -> tuple[list[str], str, str]:
        """(``ip`` prefix for src's namespace, dst's address, src's device) for a false neighbour entry."""
        if src == dst:
            raise FaultError(f"one-way drop needs two different ends, got {src!r} twice")
        if src == STORE:
            return [], self.node(dst).ip, self._bridges[0]
        node = self.node(src)
        return ["-n", node.netns], self.gateway if dst == STORE else self.node(dst).ip, node.ifname

    def drop_one_way(self, src: str, dst: str) -> None:
        prefix, address, dev = self._drop_target(src, dst)
        _ip(*prefix, "neigh", "replace", address, "lladdr", _BOGUS_MAC, "nud", "permanent", "dev", dev)
        self._false_neighbours.add((src, dst))

    def restore_one_way(self, src: str, dst: str) -> None:
        prefix, address, dev = self._drop_target(src, dst)
        _ip(*prefix, "neigh", "del", address, "dev", dev, check=False)  # gone with its namespace: nothing to do
        self._false_neighbours.discard((src, dst))


class IsolateNode(Fault):
    """Cut one node off everything (store and peers); heal: back on the cluster bridge."""

    kind = "isolate_node"

    def __init__(self, cluster: NetnsCluster, node: str, on_event=None, **labels) -> None:
        cluster.node(node)
        super().__init__(on_event, node=node, **labels)
        self.cluster = cluster
        self.target = node

    def _inject(self) -> None:
        others = [n for n in self.cluster.names if n != self.target]
        self.cluster.place([others, [self.target]])

    def _heal(self) -> None:
        self.cluster.join_all()


class SplitCluster(Fault):
    """Cut the cluster into ``groups``; the first keeps the store (gateway), nodes named nowhere join it."""

    kind = "split_cluster"

    def __init__(self, cluster: NetnsCluster, groups: Sequence[Sequence[str]], on_event=None, **labels) -> None:
        groups = [list(g) for g in groups]
        if len(groups) < 2 or not all(groups[1:]):
            raise FaultError(f"split_cluster needs at least two groups, all but the first non-empty; got {groups}")
        for name in (n for g in groups for n in g):
            cluster.node(name)
        super().__init__(on_event, groups=groups, **labels)
        self.cluster = cluster
        self.groups = groups

    def _inject(self) -> None:
        self.cluster.place(self.groups)

    def _heal(self) -> None:
        self.cluster.join_all()


class OneWayDrop(Fault):
    """Lose every packet from ``src`` to ``dst`` (node names or ``"store"``); the other direction still flows."""

    kind = "one_way_drop"

    def __init__(self, cluster: NetnsCluster, src: str, dst: str, on_event=None, **labels) -> None:
        for end in (src, dst):
            if end != STORE:
                cluster.node(end)
        if src == dst:
            raise FaultError(f"one_way_drop needs two different ends, got {src!r} twice")
        super().__init__(on_event, src=src, dst=dst, **labels)
        self.cluster = cluster
        self.src, self.dst = src, dst

    def _inject(self) -> None:
        self.cluster.drop_one_way(self.src, self.dst)

    def _heal(self) -> None:
        self.cluster.restore_one_way(self.src, self.dst)
