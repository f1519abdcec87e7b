"""SimpleElasticAgent.get_event_succeeded / get_event_failed / record_duration: the agent-level
``torchelastic.worker.status.<STATE>`` events, run against ours and upstream's."""

from __future__ import annotations

import importlib
import json
import logging
import socket
import time

import pytest


@pytest.fixture(params=["elastic_impl", "torch.distributed.elastic"])
def impl(request):
    return request.param


def _agent(impl: str):
    agent_api = importlib.import_module(f"{impl}.agent.server.api")
    rdzv = importlib.import_module(f"{impl}.rendezvous")
    registry = importlib.import_module(f"{impl}.rendezvous.registry")

    class StartsNothingAgent(agent_api.SimpleElasticAgent):
        # Only the event helpers are exercised: no worker is ever started.
        def _start_workers(self, worker_group):
            raise AssertionError("not used")

        def _stop_workers(self, worker_group):
            raise AssertionError("not used")

        def _monitor_workers(self, worker_group):
            raise AssertionError("not used")

        def _shutdown(self, death_sig=None, timeout=30):
            pass

    handler = registry.get_rendezvous_handler(
        rdzv.RendezvousParameters(backend="static", endpoint="127.0.0.1:29999", run_id="job-42", min_nodes=1,
                                  max_nodes=1, rank=0)
    )
    spec = agent_api.WorkerSpec(role="trainer", local_world_size=2, rdzv_handler=handler, entrypoint="/bin/true",
                                max_restarts=3)
    return StartsNothingAgent(spec)


def _check_common(event, impl: str, state: str) -> dict:
    events_api = importlib.import_module(f"{impl}.events.api")
    assert event.name == f"torchelastic.worker.status.{state}"
    assert event.source == events_api.EventSource.AGENT
    md = event.metadata
    assert (md["run_id"], md["role"], md["state"], md["rdzv_backend"]) == ("job-42", "trainer", state, "static")
    assert (md["global_rank"], md["worker_id"], md["agent_restarts"]) == (None, None, 0)
    assert md["hostname"] == socket.getfqdn(socket.gethostname())
    assert json.loads(md["metadata"])["entry_point"] == "true"
    return md


def test_succeeded_event(impl):
    md = _check_common(_agent(impl).get_event_succeeded(), impl, "SUCCEEDED")
    assert md["raw_error"] is None and md["duration_ms"] is None


def test_failed_event_carries_the_handled_exception(impl):
    agent = _agent(impl)
    try:
        raise RuntimeError("workers lost")
    except RuntimeError:
        event = agent.get_event_failed()
    md = _check_common(event, impl, "FAILED")
    assert "RuntimeError: workers lost" in md["raw_error"]


def test_record_duration_records_how_long_the_block_took(impl):
    events = importlib.import_module(f"{impl}.events")
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    events_logger = events._get_or_create_logger("null")  # the spec's default event_log_handler
    capture = Capture()
    events_logger.addHandler(capture)
    try:
        agent = _agent(impl)
        with agent.record_duration("RENDEZVOUS"):
            time.sleep(0.05)
        with pytest.raises(KeyError):  # recorded also when the block raises
            with agent.record_duration("ASSIGN_WORKER_RANKS"):
                raise KeyError("x")
    finally:
        events_logger.removeHandler(capture)
    recorded = [json.loads(message) for message in seen]
    assert [r["name"] for r in recorded] == [
        "torchelastic.worker.status.RENDEZVOUS", "torchelastic.worker.status.ASSIGN_WORKER_RANKS"
    ]
    assert recorded[0]["metadata"]["duration_ms"] >= 50
    assert recorded[0]["metadata"]["state"] == "RENDEZVOUS" and recorded[0]["source"] == "AGENT"


def test_record_duration_never_replaces_the_blocks_exception():
    """Ours only (upstream lets the event sink's KeyError replace the block's own exception): an agent whose event
    log handler is unknown still reports what went wrong in the block, and a block that succeeded still succeeds."""
    agent = _agent("elastic_impl")
    agent._worker_group.spec.event_log_handler = "no-such-destination"
    with pytest.raises(ZeroDivisionError, match="the block's own"):
        with agent.record_duration("RENDEZVOUS"):
            raise ZeroDivisionError("the block's own")
    with agent.record_duration("RENDEZVOUS"):
        pass
