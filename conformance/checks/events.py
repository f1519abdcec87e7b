"""torch.distributed.elastic.events: Event, EventSource, metadata values, record and logging handlers."""

from __future__ import annotations

import json
import logging

from conformance.registry import check

EV = "events"


def _event(ctx, **kwargs):
    api_event = ctx.get(f"{EV}.api.Event")
    return api_event(name=kwargs.pop("name", "conformance.event"), source=ctx.get(f"{EV}.api.EventSource").AGENT,
                     **kwargs)


@check(f"{EV}.record", timeout=60)
def record(ctx) -> None:
    proc = ctx.run_python("record_event", "console", "conformance-record-marker")
    ctx.expect_equal(proc.returncode, 0, f"record() in a worker failed: {proc.stderr.strip()[-300:]!r}")
    lines = [ln for ln in proc.stderr.splitlines() if "conformance-record-marker" in ln]
    ctx.expect(lines, f"record(event, 'console') wrote nothing naming the event: {proc.stderr[-300:]!r}")
    start = lines[0].find("{")
    payload = json.loads(lines[0][start:])
    ctx.expect_equal((payload.get("name"), payload.get("source")), ("conformance-record-marker", "WORKER"),
                     "recorded event JSON")
    ctx.get(f"{EV}.record")(_event(ctx))  # the default 'null' destination accepts and drops the event
    ctx.expect_raises(KeyError, ctx.get(f"{EV}.record"), _event(ctx), "no-such-destination",
                      what="record() to an unknown destination")


@check(f"{EV}.get_logging_handler")
def get_logging_handler(ctx) -> None:
    get = ctx.get(f"{EV}.get_logging_handler")
    null = get()
    ctx.expect(isinstance(null, logging.Handler), f"get_logging_handler() gave {type(null).__name__}")
    ctx.expect(isinstance(get("null"), logging.NullHandler), "the 'null' destination is not a NullHandler")
    console = get("console")
    ctx.expect(isinstance(console, logging.StreamHandler) and not isinstance(console, logging.NullHandler),
               f"the 'console' destination is {type(console).__name__}, documented a stream handler")
    ctx.expect_raises(KeyError, get, "no-such-destination", what="get_logging_handler of an unknown destination")


@check(f"{EV}.api.Event")
def event(ctx) -> None:
    ev = _event(ctx, timestamp=123, metadata={"k": "v"})
    text = ev.serialize()
    data = json.loads(text)
    ctx.expect_equal((data["name"], data["source"], data["timestamp"], data["metadata"]),
                     ("conformance.event", "AGENT", 123, {"k": "v"}), "serialized Event")
    back = ctx.get(f"{EV}.api.Event").deserialize(text)
    ctx.expect_equal(back, ev, "Event.deserialize(serialize())")
    ctx.expect_equal(_event(ctx).metadata, {}, "default metadata")


@check(f"{EV}.api.EventSource")
def event_source(ctx) -> None:
    src = ctx.get(f"{EV}.api.EventSource")
    ctx.expect_equal(list(src.__members__), ["AGENT", "WORKER"], "EventSource members")
    ev = ctx.get(f"{EV}.api.Event")(name="n", source=src.WORKER)
    back = ctx.get(f"{EV}.api.Event").deserialize(ev.serialize())
    ctx.expect(back.source is src.WORKER, f"source after a round trip: {back.source!r}")


@check(f"{EV}.api.EventMetadataValue")
def event_metadata_value(ctx) -> None:
    metadata = {"s": "text", "i": 3, "f": 2.5, "b": True, "n": None}
    ev = _event(ctx, metadata=metadata)
    back = ctx.get(f"{EV}.api.Event").deserialize(ev.serialize())
    ctx.expect_equal(back.metadata, metadata, "metadata of every EventMetadataValue type after a round trip")
    ctx.expect_equal({type(v) for v in back.metadata.values()}, {str, int, float, bool, type(None)},
                     "metadata value types after a round trip")


@check(f"{EV}.construct_and_record_rdzv_event", timeout=60)
def construct_and_record_rdzv_event(ctx) -> None:
    """Recording goes to the 'dynamic_rendezvous' destination (a null handler unless replaced): every node state
    and every optional field is accepted and nothing is returned. With a handler at that destination (in a worker
    process: the handler table is per process) each call records one serialized RdzvEvent there, named
    '<caller's file>:<name or caller's function>', the defaults filled in (pid: the process; hostname: the host),
    and a FAILED event carries the traceback of the exception being handled."""
    proc = ctx.run_python("record_rdzv_events", "conf-rdzv-run")
    ctx.expect_equal(proc.returncode, 0, f"recording rendezvous events in a worker failed: {proc.stderr.strip()[-300:]!r}")
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line[line.index("{"):]))
        except ValueError:
            pass
    ctx.expect_equal(len(records), 3, f"events recorded to the 'dynamic_rendezvous' handler ({proc.stdout[-300:]!r})")
    if len(records) == 3:
        full, defaults, failed = records
        ctx.expect_equal(full, {"name": "workers.py:Handler.next_rendezvous", "run_id": "conf-rdzv-run",
                                "message": "all fields", "hostname": "conf-host", "pid": 4321, "node_state": "RUNNING",
                                "master_endpoint": "conf-host:29400", "rank": 1, "local_id": 2, "error_trace": ""},
                         "the recorded event with every field given")
        pid = next((int(ln[4:]) for ln in proc.stderr.splitlines() if ln.startswith("pid=")), None)
        ctx.expect_equal({k: defaults.get(k) for k in ("name", "run_id", "message", "node_state", "pid", "rank",
                                                       "local_id", "master_endpoint", "error_trace")},
                         {"name": "workers.py:_record_rdzv_events", "run_id": "conf-rdzv-run", "message": "defaults",
                          "node_state": "INIT", "pid": pid, "rank": None, "local_id": None, "master_endpoint": "",
                          "error_trace": ""}, "the recorded event with the defaults (name from the caller)")
        ctx.expect(isinstance(defaults.get("hostname"), str) and defaults["hostname"],
                   f"default hostname of a recorded event: {defaults.get('hostname')!r}")
        ctx.expect_equal(failed.get("node_state"), "FAILED", "node_state of the FAILED event")
        ctx.expect("conformance-rdzv-failure" in (failed.get("error_trace") or ""),
                   f"a FAILED event's error_trace lacks the exception being handled: {failed.get('error_trace')!r}")
    record = ctx.get(f"{EV}.construct_and_record_rdzv_event")
    states = ctx.get(f"{EV}.api.NodeState")
    ctx.expect_equal(list(states.__members__), ["INIT", "RUNNING", "SUCCEEDED", "FAILED"], "NodeState members")
    for state in states:
        ctx.expect(record(run_id="conf-run", message=f"state {state.name}", node_state=state) is None,
                   f"construct_and_record_rdzv_event(..., {state.name}) returned a value")
    ctx.expect(record("conf-run", "all fields", states.RUNNING, name="Handler.next_rendezvous", hostname="h",
                      pid=1234, master_endpoint="h:29400", local_id=0, rank=1) is None, "with every field")
