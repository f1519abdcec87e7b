"""NUMA binding: the CPUs each mode picks (on a fabricated multi-node topology, since this machine has one node),
the same reading of this machine's own sysfs, the binding itself in a real process, and what a worker sees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch.numa.binding import AffinityMode, NumaOptions

from elastic_impl.multiprocessing import DefaultLogsSpecs, start_processes
from elastic_impl.multiprocessing.numa_binding import (
    NumaBindingError,
    NumaTopology,
    affinity_mode_of,
    cpus_for_gpu,
    format_cpu_list,
    parse_cpu_list,
    worker_cpus,
)
from tests.multiprocessing import workers

pytestmark = pytest.mark.timeout(60)

# Two sockets; socket 0 holds nodes 0 (cpus 0-3) and 1 (4-7), socket 1 holds nodes 2 (8-13) and 3 (14-15).
# Hyperthread pairs (0,1), (2,3), ...; one last-level cache per two cores (0-3, 4-7, 8-11, 12-15), but node 2's
# cpus 12-13 share theirs with node 3.
NODES = {0: range(0, 4), 1: range(4, 8), 2: range(8, 14), 3: range(14, 16)}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def topology(tmp_path):
    root = tmp_path / "sys"
    _write(root / "devices/system/node/possible", "0-3")
    for node, cpus in NODES.items():
        _write(root / f"devices/system/node/node{node}/cpulist", f"{cpus[0]}-{cpus[-1]}")
        for cpu in cpus:
            topo = root / f"devices/system/cpu/cpu{cpu}/topology"
            _write(topo / "physical_package_id", "0" if node < 2 else "1")
            pair = cpu - cpu % 2
            _write(topo / "thread_siblings_list", f"{pair}-{pair + 1}")
            cache = root / f"devices/system/cpu/cpu{cpu}/cache"
            _write(cache / "index0/type", "Instruction")  # ignored: says nothing about data
            _write(cache / "index0/level", "4")
            _write(cache / "index0/shared_cpu_list", "0-15")
            _write(cache / "index1/type", "Data")
            _write(cache / "index1/level", "1")
            _write(cache / "index1/shared_cpu_list", f"{pair}-{pair + 1}")
            l3 = cpu - cpu % 4
            _write(cache / "index3/type", "Unified")
            _write(cache / "index3/level", "3")
            _write(cache / "index3/shared_cpu_list", f"{l3}-{l3 + 3}")
    _write(root / "bus/pci/devices/0000:1b:00.0/numa_node", "-1")
    return NumaTopology(str(root))


ALL = set(range(16))
GPU_NODES = [0, 0, 1, 3, 2, 2]  # GPUs 0,1 on node 0; 2 on node 1; 3 on node 3; 4,5 on node 2


@pytest.mark.parametrize("mode,gpu,expected", [
    ("node", 0, "0-3"), ("node", 2, "4-7"), ("node", 4, "8-13"),
    ("socket", 1, "0-7"), ("socket", 3, "8-15"),
    # node 0: two cores for GPUs 0 and 1; node 2: three cores for GPUs 4 and 5 (the lower index gets the extra one)
    ("exclusive", 0, "0-1"), ("exclusive", 1, "2-3"), ("exclusive", 2, "4-7"),
    ("exclusive", 4, "8-11"), ("exclusive", 5, "12-13"),
    # node 2's caches: 8-11 (4 cpus) before 12-13 (2 of theirs on this node); node 0 has one cache for both GPUs
    ("core-complex", 4, "8-11"), ("core-complex", 5, "12-13"), ("core-complex", 0, "0-3"), ("core-complex", 1, "0-3"),
])
def test_each_mode_picks_the_cpus_near_the_gpu(topology, mode, gpu, expected):
    assert format_cpu_list(cpus_for_gpu(mode, gpu, GPU_NODES, topology, ALL)) == expected


def test_only_cpus_this_process_may_use_count(topology):
    assert cpus_for_gpu("node", 0, GPU_NODES, topology, {1, 2, 3, 9}) == {1, 2, 3}
    assert cpus_for_gpu("socket", 3, GPU_NODES, topology, {1, 15}) == {15}
    with pytest.raises(NumaBindingError, match="NUMA node 1 of GPU 2 has no CPU"):
        cpus_for_gpu("node", 2, GPU_NODES, topology, {0})


def test_impossible_bindings_say_why(topology):
    with pytest.raises(NumaBindingError, match="local rank 6 needs GPU 6, but 6 GPU"):
        cpus_for_gpu("node", 6, GPU_NODES, topology, ALL)
    with pytest.raises(NumaBindingError, match="1 physical core.*for 2 GPUs"):
        cpus_for_gpu("exclusive", 0, [3, 3], topology, {14, 15, 0})  # node 3 has one core: 14-15
    with pytest.raises(NumaBindingError, match="cannot read the CPU topology"):
        cpus_for_gpu("node", 0, [7], topology, ALL)


def test_a_gpu_without_numa_affinity_is_on_node_0(topology):
    assert topology.pci_numa_node("0000:1b:00.0") == 0


def test_cpu_list_syntax_round_trips():
    assert parse_cpu_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_modes_are_torchs(topology):
    assert [affinity_mode_of(NumaOptions(affinity_mode=m)) for m in AffinityMode] == [m.value for m in AffinityMode]
    with pytest.raises(ValueError, match="bad NUMA affinity mode 'nodes': expected one of node, socket"):
        affinity_mode_of("nodes")


def test_this_machines_own_topology_is_read():
    with open("/sys/devices/system/node/node0/cpulist") as f:
        node0 = parse_cpu_list(f.read())
    allowed = os.sched_getaffinity(0)
    assert cpus_for_gpu("node", 0, [0], NumaTopology(), allowed) == node0 & allowed
    assert cpus_for_gpu("socket", 0, [0], NumaTopology(), allowed) >= node0 & allowed


def test_binding_applies_to_the_process_and_its_threads():
    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os, threading, time\n"
        "from elastic_impl.multiprocessing.numa_binding import bind_this_process\n"
        "t = threading.Thread(target=time.sleep, args=(2,)); t.start()\n"
        f"bind_this_process({{{cpu}}})\n"
        "print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(t.native_id)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == f"[{cpu}] [{cpu}]"


def test_no_gpu_raises_unless_told_to_fall_back():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs")
    with pytest.raises(NumaBindingError, match="needs GPU 0, but 0 GPU"):
        worker_cpus(NumaOptions(affinity_mode=AffinityMode.NODE), 0)
    assert worker_cpus(NumaOptions(affinity_mode=AffinityMode.NODE, should_fall_back_if_binding_fails=True), 0) is None
    assert worker_cpus(NumaOptions(affinity_mode=AffinityMode.NODE), 0, gpu_nodes=[0]) == parse_cpu_list(
        open("/sys/devices/system/node/node0/cpulist").read()) & os.sched_getaffinity(0)


def test_function_worker_fails_with_the_binding_error_or_falls_back(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs")
    envs = {0: {"TORCHELASTIC_RUN_ID": "numa", "TORCHELASTIC_RESTART_COUNT": "0"}}
    pc = start_processes("numa", workers.echo_double, {0: (4,)}, envs, DefaultLogsSpecs(log_dir=str(tmp_path)),
                         numa_options=NumaOptions(affinity_mode=AffinityMode.NODE))
    try:
        result = pc.wait(30)
    finally:
        pc.close()
    assert result.is_failed() and "needs GPU 0" in result.failures[0].message, result
    pc = start_processes("numa", workers.echo_double, {0: (4,)}, envs, DefaultLogsSpecs(log_dir=str(tmp_path)),
                         numa_options=NumaOptions(affinity_mode=AffinityMode.NODE,
                                                  should_fall_back_if_binding_fails=True))
    try:
        result = pc.wait(30)
    finally:
        pc.close()
    assert result.return_values == {0: 8}
