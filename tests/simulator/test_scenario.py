import pytest

from simulator.scenario import Fault, ScenarioError, load_scenario, scenario_from_dict

YAML = """
name: crash loop
mode: virtual
nodes: 2
workers_per_node: 2
min_nodes: 1
max_nodes: 3
max_restarts: 2
timeouts: {join: 30, last_call: 0.5, heartbeat: 0.5, close: 5}
job: {steps: 4, step_seconds: 0.25}
seed: 7
store: {latency: 0.01, loss: 0.1}
faults:
  - {at: 3.0, fault: partition, node: 0, duration: 1.0}
  - {at: 1.0, fault: kill_worker, node: 1, rank: 1}
  - {at: 2.0, fault: add_node}
expect: {outcome: succeeded, custom: 3}
"""

TOML = """
name = "toml one"
mode = "live"
nodes = 3
backend = "etcd-v3"
[timeouts]
join = 20
[[faults]]
at = 1.5
fault = "kill_agent"
node = 2
"""


def test_yaml_scenario_loads_with_values_and_sorted_faults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(YAML)
    s = load_scenario(path)
    assert (s.name, s.mode, s.nodes, s.workers_per_node, s.min_nodes, s.max_nodes, s.max_restarts) == (
        "crash loop", "virtual", 2, 2, 1, 3, 2)
    assert s.backend == "sim"
    assert (s.timeouts.join, s.timeouts.last_call, s.timeouts.heartbeat, s.timeouts.close) == (30, 0.5, 0.5, 5)
    assert (s.job.steps, s.job.step_seconds, s.seed, s.store.latency, s.store.loss) == (4, 0.25, 7, 0.01, 0.1)
    assert [f.fault for f in s.faults] == ["kill_worker", "add_node", "partition"]
    assert s.faults[0] == Fault(at=1.0, fault="kill_worker", node=1, rank=1)
    assert s.total_nodes == 3
    assert s.fault_end == 4.0
    assert s.expect.outcome == "succeeded" and s.expect.extra == {"custom": 3}


def test_toml_scenario_and_mode_defaults(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TOML)
    s = load_scenario(path)
    assert (s.mode, s.backend, s.nodes, s.min_nodes, s.max_nodes, s.timeouts.join) == ("live", "etcd-v3", 3, 3, 3, 20)
    assert s.faults[0].fault == "kill_agent" and s.faults[0].node == 2


def test_to_yaml_round_trips(tmp_path):
    src = tmp_path / "s.yaml"
    src.write_text(YAML)
    s = load_scenario(src)
    out = tmp_path / "out" / "again.yaml"
    s.to_yaml(out)
    again = load_scenario(out)
    assert again.to_dict() == s.to_dict()


@pytest.mark.parametrize(
    "data, field_and_value",
    [
        ({"nodes": 0}, "nodes=0"),
        ({"mode": "cloud"}, "mode='cloud'"),
        ({"backend": "zookeeper"}, "backend='zookeeper'"),
        ({"mode": "live", "backend": "sim"}, "backend='sim'"),
        ({"min_nodes": 3, "max_nodes": 2}, "max_nodes=2"),
        ({"max_restarts": -1}, "max_restarts=-1"),
        ({"timeouts": {"join": 0}}, "timeouts.join=0"),
        ({"timeouts": {"jion": 1}}, "timeouts.jion"),
        ({"store": {"loss": 0.9}}, "store.loss=0.9"),
        ({"job": {"steps": "ten"}}, "job.steps='ten'"),
        ({"faults": [{"at": 1, "fault": "meteor", "node": 0}]}, "faults[0].fault='meteor'"),
        ({"faults": [{"at": -1, "fault": "kill_agent", "node": 0}]}, "faults[0].at=-1"),
        ({"faults": [{"at": 1, "fault": "kill_agent", "node": 9}]}, "faults[0].node=9"),
        ({"faults": [{"at": 1, "fault": "kill_agent"}]}, "faults[0].node is required"),
        ({"faults": [{"at": 1, "fault": "kill_worker", "node": 0, "rank": 4}]}, "faults[0].rank=4"),
        ({"faults": [{"at": 1, "fault": "delay", "node": 0}]}, "faults[0].seconds is required"),
        ({"faults": [{"at": 1, "fault": "kill_agent", "node": 0, "speed": 2}]}, "faults[0].speed"),
        ({"faults": [{"fault": "kill_agent", "node": 0}]}, "faults[0].at is required"),
        ({"expect": {"outcome": "maybe"}}, "expect.outcome='maybe'"),
        ({"colour": "red"}, "'colour'"),
        ({"mode": "live", "store": {"broken_cas": True}}, "store.broken_cas=True"),
    ],
)
def test_bad_fields_give_one_line_naming_field_and_value(data, field_and_value):
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"name": "bad", **data}, "bad.yaml")
    message = str(info.value)
    assert field_and_value in message
    assert message.startswith("scenario 'bad.yaml'")
    assert "\n" not in message


def test_missing_name_and_bad_files(tmp_path):
    with pytest.raises(ScenarioError, match="'name' is required"):
        scenario_from_dict({"nodes": 2})
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML") as info:
        load_scenario(bad)
    assert "\n" not in str(info.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="top level must be a mapping"):
        load_scenario(listy)


def test_bad_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ScenarioError, match="not valid TOML") as info:
        load_scenario(bad)
    assert "\n" not in str(info.value)
