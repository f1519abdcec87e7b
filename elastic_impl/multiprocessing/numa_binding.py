"""NUMA binding of workers (torchrun's ``--numa-binding``): which CPUs a worker may run on.

A worker uses the GPU whose index is its local rank; it is bound to CPUs near that GPU, chosen by the affinity mode:

- ``node``: every CPU of the GPU's NUMA node;
- ``socket``: every CPU of every NUMA node on the GPU's socket;
- ``exclusive``: the GPU's share of its node's physical cores (the node's GPUs split the cores evenly, the lowest
  GPU indices taking one more core each when they do not divide);
- ``core-complex``: one last-level-cache domain of the GPU's node (the largest first, one per GPU while they last).

Only CPUs this process may use count. The options object is torch's ``torch.numa.binding.NumaOptions`` (or any object
with ``affinity_mode`` and ``should_fall_back_if_binding_fails``); the topology is read from sysfs, so a test can
point ``sys_root`` at a fabricated tree for topologies the machine lacks.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["AFFINITY_MODES", "NumaTopology", "affinity_mode_of", "cpus_for_gpu", "worker_cpus", "bind_this_process"]

AFFINITY_MODES = ("node", "socket", "exclusive", "core-complex")


class NumaBindingError(RuntimeError):
    """The CPUs for a worker cannot be determined (no such GPU, unreadable topology, too few cores)."""


def affinity_mode_of(numa_options: object) -> str:
    """The mode name of ``numa_options`` (a NumaOptions, or a bare mode name); ValueError naming it otherwise."""
    mode = getattr(numa_options, "affinity_mode", numa_options)
    name = getattr(mode, "value", mode)
    if name not in AFFINITY_MODES:
        raise ValueError(f"bad NUMA affinity mode {name!r}: expected one of {', '.join(AFFINITY_MODES)}")
    return str(name)


def parse_cpu_list(text: str) -> set[int]:
    """sysfs list syntax: ``"0-3,8,10-11"`` -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part.strip():
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """The inverse of ``parse_cpu_list`` (runs joined): {0, 1, 2, 5} -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class NumaTopology:
    """NUMA nodes, sockets, physical cores and caches as sysfs under ``sys_root`` describes them."""

    def __init__(self, sys_root: str = "/sys") -> None:
        self._root = sys_root

    def _read(self, *parts: str) -> str:
        path = os.path.join(self._root, *parts)
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as e:
            raise NumaBindingError(f"cannot read the CPU topology from {path}: {e.strerror}") from None

    def nodes(self) -> set[int]:
        return parse_cpu_list(self._read("devices/system/node/possible"))

    def node_cpus(self, node: int) -> set[int]:
        return parse_cpu_list(self._read(f"devices/system/node/node{node}/cpulist"))

    def socket_of(self, cpu: int) -> int:
        return int(self._read(f"devices/system/cpu/cpu{cpu}/topology/physical_package_id"))

    def core_of(self, cpu: int) -> int:
        """The physical core, named by its lowest logical CPU."""
        return min(parse_cpu_list(self._read(f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")))

    def last_level_cache_of(self, cpu: int) -> int:
        """The highest-level data/unified cache the CPU uses, named by the lowest CPU sharing it."""
        cache_dir = f"devices/system/cpu/cpu{cpu}/cache"
        best_level, sharing = -1, {cpu}
        try:
            entries = os.listdir(os.path.join(self._root, cache_dir))
        except OSError as e:
            raise NumaBindingError(f"cannot list the caches of CPU {cpu}: {e.strerror}") from None
        for entry in entries:
            if not (entry.startswith("index") and entry[5:].isdigit()):
                continue
            if self._read(cache_dir, entry, "type") not in ("Data", "Unified"):
                continue  # an instruction cache says nothing about where data lives
            level = int(self._read(cache_dir, entry, "level"))
            if level > best_level:
                best_level, sharing = level, parse_cpu_list(self._read(cache_dir, entry, "shared_cpu_list"))
        return min(sharing)

    def pci_numa_node(self, pci_address: str) -> int:
        # A one-node machine often says -1 (no affinity): that is node 0.
        return max(int(self._read(f"bus/pci/devices/{pci_address}/numa_node")), 0)


def _grouped(cpus: set[int], key: Callable[[int], int]) -> dict[int, set[int]]:
    groups: dict[int, set[int]] = defaultdict(set)
    for cpu in cpus:
        groups[key(cpu)].add(cpu)
    return dict(groups)


def cpus_for_gpu(mode: str, gpu_index: int, gpu_nodes: list[int], topology: NumaTopology,
                 allowed: set[int]) -> set[int]:
    """The CPUs (within ``allowed``) for the worker of GPU ``gpu_index``; ``gpu_nodes[i]`` is GPU i's NUMA node."""
    if not 0 <= gpu_index < len(gpu_nodes):
        raise NumaBindingError(f"NUMA binding of local rank {gpu_index} needs GPU {gpu_index}, but "
                               f"{len(gpu_nodes)} GPU(s) are visible (the binding follows the NUMA node of the "
                               "GPU whose index is the local rank)")
    node = gpu_nodes[gpu_index]
    node_cpus = topology.node_cpus(node) & allowed
    if not node_cpus:
        raise NumaBindingError(f"NUMA node {node} of GPU {gpu_index} has no CPU this process may use")
    # The GPU's place among the GPUs of its node decides its share in the modes that split a node.
    peers = sorted(i for i, n in enumerate(gpu_nodes) if n == node)
    position = peers.index(gpu_index)
    if mode == "node":
        return node_cpus
    if mode == "socket":
        socket = topology.socket_of(min(node_cpus))
        chosen: set[int] = set()
        for other in topology.nodes():
            other_cpus = topology.node_cpus(other) & allowed
            if other_cpus and topology.socket_of(min(other_cpus)) == socket:
                chosen |= other_cpus
        return chosen
    if mode == "exclusive":
        cores = [cpus for _, cpus in sorted(_grouped(node_cpus, topology.core_of).items())]
        share, extra = divmod(len(cores), len(peers))
        if share < 1:
            raise NumaBindingError(f"NUMA node {node} has {len(cores)} physical core(s) for {len(peers)} GPUs: "
                                   "'exclusive' needs at least one core per GPU")
        start = position * share + min(position, extra)
        stop = start + share + (1 if position < extra else 0)
        return set().union(*cores[start:stop])
    if mode == "core-complex":
        caches = sorted(_grouped(node_cpus, topology.last_level_cache_of).items(),
                        key=lambda item: (-len(item[1]), item[0]))
        return caches[position % len(caches)][1]
    raise ValueError(f"bad NUMA affinity mode {mode!r}: expected one of {', '.join(AFFINITY_MODES)}")


def cuda_gpu_numa_nodes(topology: NumaTopology) -> list[int]:
    """The NUMA node of every CUDA device this process sees, by device index (empty without CUDA)."""
    import torch  # only for a NUMA binding: importing torch costs ~1 s

    if not torch.cuda.is_available():
        return []
    nodes = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        nodes.append(topology.pci_numa_node(address))
    return nodes


def worker_cpus(numa_options: object, local_rank: int, topology: NumaTopology | None = None,
                gpu_nodes: list[int] | None = None) -> set[int] | None:
    """The CPUs to bind local rank ``local_rank``'s worker to; None when there is no binding to apply.

    A binding that cannot be determined raises, unless the options say to fall back (then: a warning, no binding).
    """
    if numa_options is None:
        return None
    mode = affinity_mode_of(numa_options)
    topology = topology or NumaTopology()
    try:
        nodes = cuda_gpu_numa_nodes(topology) if gpu_nodes is None else gpu_nodes
        return cpus_for_gpu(mode, local_rank, nodes, topology, os.sched_getaffinity(0))
    except (NumaBindingError, OSError, ValueError) as e:
        if getattr(numa_options, "should_fall_back_if_binding_fails", False):
            logger.warning("local rank %d runs without NUMA binding (%s): %s", local_rank, mode, e)
            return None
        raise


def bind_this_process(cpus: set[int]) -> None:
    """Bind this process's threads to ``cpus``: a thread's affinity is its own, so each is set, except a thread
    that already had an affinity of its own (one that differs from the main thread's before the binding)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in threads:
        try:
            if os.sched_getaffinity(int(tid)) == before:
                os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread ended meanwhile
