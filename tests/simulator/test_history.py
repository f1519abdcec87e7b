import json

import pytest

from simulator import history as h
from simulator.history import Event, History


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    hist = History()
    hist.record(0.5, "node0", h.RDZV_COMPLETE, round=2, rank=1, world_size=3, detail={"participants": ["a", "node0", "b"]})
    hist.record(1.25, "node0", h.WORKER_START, round=2, rank=3, world_size=6, state="HEALTHY", detail={"local_rank": 1})
    hist.record(2.0, "job", h.JOB_SUCCEEDED)
    path = hist.to_jsonl(tmp_path / "sub" / "history.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2]) == {"t": 2.0, "node": "job", "event": "job_succeeded"}
    back = History.from_jsonl(path)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in hist]
    assert back[0].detail["participants"] == ["a", "node0", "b"]


def test_filter_by_event_and_node():
    hist = History([Event(0, "node0", h.AGENT_START), Event(1, "node1", h.AGENT_START), Event(2, "node1", h.AGENT_EXIT)])
    assert [e.t for e in hist.filter(event=h.AGENT_START)] == [0, 1]
    assert [e.t for e in hist.filter(node="node1")] == [1, 2]
    assert [e.t for e in hist.filter(event=(h.AGENT_START, h.AGENT_EXIT), node="node1")] == [1, 2]
    assert hist.nodes() == ["node0", "node1"]


def test_append_rejects_non_events():
    with pytest.raises(TypeError, match="takes an Event"):
        History().append({"t": 0})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"t": 1, "node": "n"}', "lacks event"),
        ('{"t": 1, "node": "n", "event": "x", "colour": 1}', "unknown field"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "Expecting property name"),
    ],
)
def test_bad_history_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "h.jsonl"
    path.write_text('{"t": 0, "node": "node0", "event": "agent_start"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        History.from_jsonl(path)
    assert str(info.value).startswith(f"{path}:2:")
    assert "\n" not in str(info.value)


def test_missing_history_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        History.from_jsonl(tmp_path / "nope.jsonl")
