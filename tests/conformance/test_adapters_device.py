from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET

import pytest

from conformance import runner
from conformance.adapters import AdapterError, ApiNotFound, get_adapter
from conformance.context import SuiteResources
from conformance.device import DeviceError, detect
from conformance.registry import load_checks
from conformance.signatures import load_snapshot
from conformance.table import Row

from .conftest import run_cli


def test_torch_adapter_resolves_upstream_objects():
    import torch.distributed.elastic.rendezvous.api as upstream

    adapter = get_adapter("torch")
    assert adapter.resolve("torch.distributed.elastic.rendezvous.api.RendezvousError") is upstream.RendezvousError
    assert adapter.launcher_command() == [sys.executable, "-m", "torch.distributed.run"]


def test_elastic_impl_adapter_maps_paths_onto_our_package():
    adapter = get_adapter("elastic_impl")
    assert adapter.map_path("torch.distributed.elastic.rendezvous.api.RendezvousError") == \
        "elastic_impl.rendezvous.api.RendezvousError"
    assert adapter.launcher_command() == [sys.executable, "-m", "elastic_impl.run"]


def test_properties_resolve_to_the_property_object():
    prop = get_adapter("torch").resolve("torch.distributed.elastic.rendezvous.dynamic_rendezvous.RendezvousTimeout.join")
    assert isinstance(prop, property)


def test_missing_api_names_the_missing_part():
    with pytest.raises(ApiNotFound) as info:
        get_adapter("torch").resolve("torch.distributed.elastic.timer.NoSuchThing")
    assert "torch.distributed.elastic.timer has no submodule or attribute 'NoSuchThing'" in str(info.value)


@pytest.mark.parametrize("name, needle", [("no_such_pkg_xyz", "not importable"), ("bad name!", "not a package name"),
                                          ("", "not a package name")])
def test_bad_impl_is_a_one_line_error(name, needle):
    with pytest.raises(AdapterError) as info:
        get_adapter(name)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_device_detection():
    assert detect("cpu").available and detect("cpu").backend == "gloo"
    with pytest.raises(DeviceError, match="--device 'tpu' is not one of cpu, cuda, npu, hpu, auto"):
        detect("tpu")
    auto = detect("auto")
    assert auto.available and auto.kind in ("cpu", "cuda", "npu", "hpu")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _absent_devices():
    """(kind, backend, is-present probe) for each accelerator; "hccl" names both Ascend's and Habana's backend."""
    return [("npu", "hccl", lambda: importlib.util.find_spec("torch_npu") is not None),
            ("hpu", "hccl", lambda: importlib.util.find_spec("habana_frameworks") is not None),
            ("cuda", "nccl", _cuda_present)]


@pytest.mark.parametrize("kind, backend, present", _absent_devices())
@pytest.mark.parametrize("impl", ["torch", "elastic_impl"])
def test_an_absent_device_is_reported_unavailable_and_device_rows_skip(kind, backend, present, impl, tmp_path):
    if present():
        pytest.skip(f"{kind} is present on this machine")
    device = detect(kind)
    assert not device.available and device.backend == backend
    assert device.reason.startswith(f"{kind}: not available on this machine: ") and device.key == f"{kind}/{backend}"
    load_checks()
    resources = SuiteResources(get_adapter(impl), device, tmp_path)
    try:
        for api in ("multiprocessing.start_processes", "agent.server.local_elastic_agent.LocalElasticAgent"):
            row = Row(f"torch.distributed.elastic.{api}", True, "-", 1)
            result = runner.run_row(row, resources, load_snapshot())
            assert (result.observed, result.verdict, result.error) == ("skip", "SKIPPED", device.reason)
    finally:
        resources.close()


def test_cuda_request_on_a_machine_without_cuda_is_unavailable():
    import torch

    cuda = detect("cuda")
    assert cuda.available == torch.cuda.is_available()
    if not cuda.available:
        assert "not available on this machine" in cuda.reason


@pytest.mark.parametrize("kind, backend, present", _absent_devices())
def test_certify_on_an_absent_device_certifies_nothing(kind, backend, present, tmp_path):
    """The real CLI: one line, non-zero, no row run, and reports that say NOT CERTIFIED (never CONFORMS)."""
    if present():
        pytest.skip(f"{kind} is present on this machine")
    proc = run_cli(["certify", "--impl", "elastic_impl", "--device", kind, "--out", str(tmp_path)], timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"{kind}: not available on this machine: ")
    assert proc.stderr.rstrip().endswith("; nothing certified")
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[0] == f"# NOT CERTIFIED: `elastic_impl` on `{kind}` (backend `{backend}`)"
    assert "Summary: **NOT CERTIFIED**: " in md and "CONFORMS" not in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert (data["meta"]["device"], data["meta"]["backend"], data["meta"]["outcome"]) == (kind, backend,
                                                                                         "NOT CERTIFIED")
    assert data["results"] == [] and data["meta"]["summary"] == {}
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors")) == ("1", "1")
    assert "CONFORMS" not in (tmp_path / "junit.xml").read_text()


def _agent_check_context(tmp_path, device):
    from conformance.context import CheckContext

    return CheckContext("torch.distributed.elastic.agent.server.ElasticAgent.run",
                        SuiteResources(get_adapter("elastic_impl"), device, tmp_path))


def test_agent_scenarios_run_their_collectives_on_the_device_when_it_has_a_device_per_worker(tmp_path):
    from conformance.checks import agent
    from conformance.device import Device

    cpu = _agent_check_context(tmp_path, Device("cpu", "cpu", True, "host CPU"))
    assert agent._device_args(cpu, 6) == (("gloo", "cpu"), None)
    four_gpus = _agent_check_context(tmp_path, Device("cuda", "cuda", True, "4 cuda device(s)", 4))
    assert agent._device_args(four_gpus, 4) == (("nccl", "cuda"), None)
    args, reason = agent._device_args(four_gpus, 6)
    assert args[0] == "none" and "6 workers at once need 6 cuda devices" in reason and "found 4" in reason


def test_a_device_row_whose_scenario_could_not_use_the_device_is_skipped_not_passed(tmp_path):
    # Verdicts never lie: the row's other expectations held, but the device was not exercised, so SKIPPED.
    from conformance.checks import agent
    from conformance.device import Device
    from conformance.registry import CheckSkipped

    ctx = _agent_check_context(tmp_path, Device("cuda", "cuda", True, "1 cuda device(s)", 1))
    scenario = {"device_skip": "device part not exercised: 4 workers at once need 4 cuda devices on this machine, "
                               "found 1"}
    worker = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # no collective recorded
    agent._expect_collectives(ctx, scenario, [worker], 4, "2 nodes")
    with pytest.raises(CheckSkipped, match="found 1"):
        agent._device_part_done(ctx, scenario, {"device_skip": None})
    agent._device_part_done(ctx, {"device_skip": None})  # a scenario that did run on the device: no skip


def test_collectives_are_checked_per_worker_rank_backend_sum_and_device_index(tmp_path):
    from conformance.checks import agent
    from conformance.device import Device
    from conformance.registry import CheckFailed

    ctx = _agent_check_context(tmp_path, Device("cuda", "cuda", True, "4 cuda device(s)", 4))
    workers = [{"RANK": str(g * 2 + lr), "GROUP_RANK": str(g), "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": str(lr),
                "collective": {"rank": g * 2 + lr, "world_size": 4, "backend": "nccl", "sum": 10.0,
                               "device": f"cuda:{g * 2 + lr}"}} for g in (0, 1) for lr in (0, 1)]
    agent._expect_collectives(ctx, {}, workers, 4, "2 nodes")
    workers[3]["collective"]["device"] = "cuda:1"  # node 1's second worker on node 0's device
    with pytest.raises(CheckFailed, match="device of the worker of RANK 3"):
        agent._expect_collectives(ctx, {}, workers, 4, "2 nodes")
    workers[3]["collective"]["device"] = "cuda:3"
    workers[2]["collective"]["sum"] = 3.0  # a group that did not include every rank
    with pytest.raises(CheckFailed, match=r"all-reduce sum\) of the worker of RANK 2"):
        agent._expect_collectives(ctx, {}, workers, 4, "2 nodes")
