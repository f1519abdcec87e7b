"""elastic_impl.events: Event (de)serialisation, listeners, the JSON-lines events file, rdzv events."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from elastic_impl import events
from elastic_impl.events import Event, EventSource, NodeState, RdzvEvent


@pytest.fixture
def collected():
    got: list = []
    events.add_listener(got.append)
    yield got
    events.remove_listener(got.append)


def test_event_round_trip_keeps_all_fields():
    ev = Event(
        "agent.x",
        EventSource.WORKER,
        timestamp=12,
        metadata={"a": 1, "b": "s", "c": None, "d": 1.5, "e": True},
    )
    back = Event.deserialize(ev.serialize())
    assert back == ev and back.source is EventSource.WORKER
    assert json.loads(ev.serialize())["source"] == "WORKER"


def test_rdzv_event_round_trip():
    ev = RdzvEvent(
        "n", "run", "msg", "host", 7, NodeState.FAILED, "h:1", rank=3, local_id=2, error_trace="tb"
    )
    back = RdzvEvent.deserialize(ev.serialize())
    assert back == ev and back.node_state is NodeState.FAILED


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("not json", "not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"name": "x", "source": "NOPE"}', "invalid event source 'NOPE'"),
        ('{"name": "x", "source": "AGENT", "bogus": 1}', "bogus"),
    ],
)
def test_deserialize_bad_input_is_one_line_value_error(data, fragment):
    with pytest.raises(ValueError) as info:
        Event.deserialize(data)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_listener_gets_every_event_and_timestamp_is_stamped(collected):
    original = Event("a", EventSource.AGENT)
    events.record(original)
    events.record(Event("b", EventSource.AGENT, timestamp=5), "console")
    assert [e.name for e in collected] == ["a", "b"]
    assert collected[0].timestamp > 0 and original.timestamp == 0  # stamped copy, caller's object untouched
    assert collected[1].timestamp == 5


def test_removed_listener_is_not_called(collected):
    events.remove_listener(collected.append)
    events.record(Event("a", EventSource.AGENT))
    assert collected == []
    events.remove_listener(collected.append)  # removing twice is harmless


def test_failing_listener_does_not_break_record(collected, caplog):
    def boom(event):
        raise RuntimeError("listener broke")

    events.add_listener(boom)
    try:
        with caplog.at_level(logging.WARNING, logger="elastic_impl.events"):
            events.record(Event("a", EventSource.AGENT))
    finally:
        events.remove_listener(boom)
    assert [e.name for e in collected] == ["a"]
    assert "listener broke" in caplog.text


def test_add_listener_rejects_non_callable():
    with pytest.raises(TypeError, match="must be callable"):
        events.add_listener(42)


def test_unknown_destination_is_a_key_error_naming_it_and_record_raises_it(collected):
    # KeyError as upstream (code written against it catches that), message naming the allowed destinations
    with pytest.raises(KeyError, match="unknown event destination 'nowhere'; allowed: .*'console'"):
        events.get_logging_handler("nowhere")
    # upstream's record() raises for a typo'd destination before recording anything; it used to be swallowed here
    with pytest.raises(KeyError, match="unknown event destination 'nowhere'"):
        events.record(Event("a", EventSource.AGENT), "nowhere")
    assert collected == []


def test_record_of_something_that_is_not_an_event_raises(collected):
    with pytest.raises(AttributeError, match="record\\(\\) expects an Event"):
        events.record("not an event")
    assert collected == []


def test_console_destination_logs_serialized_event():
    handler = events.get_logging_handler("console")
    assert isinstance(handler, logging.StreamHandler)
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record)

    grab = Grab()
    logging.getLogger("elastic_impl.events.console").addHandler(grab)
    try:
        events.record(Event("to-console", EventSource.AGENT, timestamp=3))
        events.record(Event("to-console", EventSource.AGENT, timestamp=3), "console")
    finally:
        logging.getLogger("elastic_impl.events.console").removeHandler(grab)
    assert len(records) == 1  # the first went to "null"
    assert json.loads(records[0].getMessage())["name"] == "to-console"


def test_events_file_gets_one_json_line_per_event(tmp_path, monkeypatch):
    path = tmp_path / "ev.jsonl"
    monkeypatch.setenv(events.EVENTS_FILE_ENV, str(path))
    events.record(Event("a", EventSource.AGENT, metadata={"text": "multi\nline"}))
    events.construct_and_record_rdzv_event("run1", "joined", NodeState.RUNNING, rank=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = Event.deserialize(lines[0])
    assert first.name == "a" and first.metadata["text"] == "multi\nline"
    rdzv = RdzvEvent.deserialize(lines[1])
    assert (rdzv.run_id, rdzv.rank, rdzv.pid, rdzv.node_state) == ("run1", 2, os.getpid(), NodeState.RUNNING)
    assert rdzv.name == "test_events.py:test_events_file_gets_one_json_line_per_event"  # the caller's file and name


def test_rdzv_event_name_is_prefixed_with_the_callers_file_and_pid_0_means_this_process(collected):
    # as upstream: "<caller file>:<name>" also for an explicit name; a falsy pid is replaced by this process's
    events.construct_and_record_rdzv_event("r", "m", NodeState.RUNNING, name="Handler.join", pid=0)
    events.construct_and_record_rdzv_event("r", "m", NodeState.RUNNING, pid=17)
    assert [(e.name, e.pid) for e in collected] == [
        ("test_events.py:Handler.join", os.getpid()),
        ("test_events.py:test_rdzv_event_name_is_prefixed_with_the_callers_file_and_pid_0_means_this_process", 17),
    ]


def test_unwritable_events_file_does_not_break_record(tmp_path, monkeypatch, collected):
    monkeypatch.setenv(events.EVENTS_FILE_ENV, str(tmp_path / "missing-dir" / "ev.jsonl"))
    events.record(Event("a", EventSource.AGENT))
    assert [e.name for e in collected] == ["a"]


def test_failed_rdzv_event_carries_the_current_traceback(collected):
    try:
        raise KeyError("lost-peer")
    except KeyError:
        events.construct_and_record_rdzv_event("r", "failed", NodeState.FAILED, name="n")
    assert "lost-peer" in collected[0].error_trace


def test_concurrent_processes_never_interleave_lines(tmp_path):
    path = tmp_path / "ev.jsonl"
    # plain python children (no torch import): each appends many large events to the same file
    code = (
        "import sys; from elastic_impl import events as e\n"
        "for i in range(200): e.record(e.Event('p'+sys.argv[1], e.EventSource.WORKER, 1, {'pad': 'x'*3000, 'i': i}))\n"
    )
    env = dict(os.environ, **{events.EVENTS_FILE_ENV: str(path)})
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], env=env) for n in range(2)]
    try:
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    parsed = [json.loads(line) for line in lines]
    for n in range(2):
        assert [d["metadata"]["i"] for d in parsed if d["name"] == f"p{n}"] == list(range(200))


def test_loglevel_above_info_silences_a_destination_when_first_used(monkeypatch):
    # as upstream: the destination's logger takes LOGLEVEL (ours logged at INFO whatever LOGLEVEL said)
    import io

    handler = events.get_logging_handler("console")
    stream = io.StringIO()
    old_stream = handler.setStream(stream)
    old_logger = events._events_loggers.pop("console", None)
    monkeypatch.setenv("LOGLEVEL", "WARNING")
    try:
        events.record(Event("quiet", EventSource.AGENT, 5), "console")
        assert stream.getvalue() == ""
        events._events_loggers.pop("console")
        monkeypatch.setenv("LOGLEVEL", "not-a-level")  # invalid: INFO (upstream raises ValueError from record())
        events.record(Event("loud", EventSource.AGENT, 5), "console")
        assert json.loads(stream.getvalue())["name"] == "loud"
    finally:
        handler.setStream(old_stream)
        new_logger = events._events_loggers.pop("console", None)
        if new_logger is not None:
            new_logger.setLevel(logging.INFO)
        if old_logger is not None:
            events._events_loggers["console"] = old_logger
