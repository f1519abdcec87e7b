"""Documented, accepted differences between an implementation and the documented behaviour.

Keyed by (implementation, api). A failing row listed here is reported with verdict KNOWN-DIFFERENCE and its reason
instead of VIOLATION; a listed row that passes is flagged as a stale entry. Add an entry only with a reason a reader
can verify (a documented upstream deviation, a deliberate design decision of ours).
"""

from __future__ import annotations

KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}

# Narrower: only the signature comparison of the row is waived (its behaviour is still checked), for parameter
# lists that are not user API.
SIGNATURE_DIFFERENCES: dict[tuple[str, str], str] = {
    ("elastic_impl", "torch.distributed.elastic.rendezvous.dynamic_rendezvous.DynamicRendezvousHandler"): (
        "the constructor takes private types (upstream: _NodeDesc, RendezvousSettings, _RendezvousStateHolder); "
        "the documented way to build the handler is from_backend()/create_handler(), whose signatures are checked. "
        "Ours takes the RendezvousBackend instead of upstream's private state holder."
    ),
}

# API-level behaviour differences from upstream torch.distributed.elastic, keyed by the case name of
# tests/differential/test_api_edge_cases.py (which runs every case on both implementations and fails on a stale entry).
API_BEHAVIOUR_DIFFERENCES: dict[str, str] = {
    "process_failure_error_file_not_an_object": (
        "a worker's error file holding JSON that is not an error record ([1], null, a string, a message without "
        "extraInfo) makes upstream's ProcessFailure raise (TypeError/KeyError) inside the agent, which then dies; "
        "ours keeps the exit code and its message names the file and what is wrong with it"
    ),
    "process_failure_error_file_not_json": (
        "an error file that is not JSON makes upstream's ProcessFailure raise JSONDecodeError inside the agent; ours "
        "keeps the exit code and its message names the unreadable file"
    ),
    "process_failure_record_message_attribute": (
        "for the record layout ErrorHandler writes, upstream's ProcessFailure.message is the record's 'message' object "
        "(a dict) although it is annotated and documented as a str; ours is the str (the traceback, else the "
        "exception text) the documentation describes"
    ),
    "child_failed_error_without_failures": (
        "ChildFailedError(name, {}) raises a bare AssertionError upstream (gone under python -O); ours raises "
        "ValueError saying the failures dict is empty"
    ),
    "rendezvous_parameters_empty_run_id": (
        "upstream accepts run_id='' and every node of every job without a run id then shares one rendezvous; ours "
        "refuses it with a one-line ValueError naming run_id"
    ),
    "rendezvous_parameters_endpoint_none": (
        "ours stores a missing endpoint (None) as '' so every backend parses one type; both mean the backend's "
        "default host and port"
    ),
    "timer_expires_negative_after": (
        "upstream accepts expires(after=-1) and the worker is reaped at the next watchdog pass; ours raises a one-line "
        "ValueError naming the value (a negative budget is a computation error, not a wish to be killed)"
    ),
    "timer_server_zero_interval": (
        "upstream accepts max_interval=0 (a watchdog that spins without waiting); ours raises a one-line ValueError "
        "naming the value"
    ),
}


def known_difference(impl: str, api: str) -> str | None:
    return KNOWN_DIFFERENCES.get((impl, api))


def signature_difference(impl: str, api: str) -> str | None:
    return SIGNATURE_DIFFERENCES.get((impl, api))
