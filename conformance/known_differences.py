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
    # --- agent (issue 17.10)
    "agent_worker_spec_rejects_nonpositive_sizes": (
        "WorkerSpec with local_world_size <= 0, monitor_interval <= 0, no entrypoint or an empty command string: "
        "upstream raises a bare AssertionError with no message; ours raises a one-line ValueError naming the field, "
        "the value and what is allowed"
    ),
    "agent_worker_spec_negative_max_restarts": (
        "upstream accepts WorkerSpec(max_restarts=-1) and behaves as 0 (its run loop restarts only while the count "
        "is > 0); ours refuses it with a one-line ValueError naming max_restarts (a negative budget is an error in "
        "the caller's arithmetic)"
    ),
    "agent_worker_spec_entrypoint_neither_callable_nor_str": (
        "upstream accepts entrypoint=42 and fails later (AttributeError '__qualname__' from get_entrypoint_name at "
        "the start of run()); ours refuses it when the spec is built, with a one-line ValueError naming the value"
    ),
    "agent_worker_spec_master_port_out_of_range": (
        "upstream accepts master_port=-1 or 70000 and the workers fail to bind/connect later; ours refuses it when "
        "the spec is built, with a one-line ValueError naming the value and the allowed range 0..65535"
    ),
    "agent_worker_spec_entrypoint_name_without_qualname": (
        "get_entrypoint_name() of a functools.partial or of a callable object raises AttributeError upstream (and "
        "so does run(), which logs the name first: such an entrypoint cannot run there); ours names the wrapped "
        "function, or the object's class"
    ),
    "agent_run_succeeded_without_return_values": (
        "a SimpleElasticAgent subclass whose _monitor_workers reports SUCCEEDED without a return value for every "
        "worker: upstream's run() then raises ValueError('Unknown worker: 0') from its worker-event recording "
        "after the workers succeeded; ours returns the RunResult as reported (binary workers have no return value)"
    ),
    "agent_run_rendezvous_graceful_exit": (
        "when the rendezvous raises RendezvousGracefulExitError, upstream's run() returns None although it is "
        "annotated to return a RunResult (its own launch_agent then fails with AttributeError on None.is_failed()); "
        "ours re-raises the RendezvousGracefulExitError after the same _shutdown, and our launcher treats it as "
        "this node leaving"
    ),
    "agent_rendezvous_master_from_bootstrap_store_info": (
        "without a fixed master_addr/master_port upstream gives the workers the rendezvous's bootstrap store "
        "address; ours has group rank 0 publish a fresh address and port every round (a membership restart keeps "
        "upstream's worker store prefix, so re-formed workers read the previous round's stale addresses); "
        "a fixed master_addr+master_port is used as given by both (case agent_rendezvous_fixed_master)"
    ),
    "rdzv_surplus_node_when_the_run_closes": (
        "a node that joined when the round already held max_nodes and is still waiting when the run is closed: "
        "upstream's next_rendezvous() raises RendezvousGracefulExitError (it kept the node on a 'redundancy list'), "
        "ours raises RendezvousClosedError, as for any node joining a closed run (our agent treats both alike: no "
        "failure published; our launcher reports a peer's root cause for the closed run where there is one, which it "
        "would not for a graceful exit)"
    ),
    "agent_local_agent_unknown_start_method": (
        "LocalElasticAgent(start_method='bogus'): upstream accepts it and a function entrypoint fails only when the "
        "workers start, after the rendezvous; ours refuses it in the constructor with a one-line ValueError naming "
        "the value and the allowed spawn, fork, forkserver"
    ),
    "agent_local_agent_monitor_before_start": (
        "LocalElasticAgent._monitor_workers before any worker started: a bare AssertionError upstream; ours reports "
        "WorkerState.UNKNOWN ('agent lost track of worker group state'), which the run loop turns into the same "
        "'Worker group in UNKNOWN state' exception as for any other UNKNOWN result"
    ),
    "agent_healthcheck_server_invalid_arguments": (
        "upstream's HealthCheckServer is a no-op placeholder and accepts any port, timeout and callback; ours "
        "really serves GET /health, so a port outside 0..65535 or not an int, a timeout <= 0 (ValueError) or a "
        "callback that is not callable (TypeError) is refused when it is built, with a one-line message"
    ),
    "agent_healthcheck_server_started_twice": (
        "upstream's no-op start() can be called any number of times; ours binds a port, and a second start() while "
        "serving raises RuntimeError naming the port instead of leaking a second server (stop() then start() "
        "again works on both: case agent_healthcheck_server_start_stop_twice)"
    ),
    # --- timer, metrics, events (issue 17.10)
    "tme_timer_request_hashable": (
        "upstream's TimerRequest defines __eq__ without __hash__, so Python makes it unhashable (TypeError in a set "
        "or as a dict key); ours hashes the three fields its __eq__ compares, so equal requests hash alike. No code "
        "that works upstream changes meaning (hashing raised there)"
    ),
    "tme_file_timer_client_signal_not_a_number": (
        "upstream's FileTimerClient takes any signal value and fails later, far from the mistake (with no server: "
        "BrokenPipeError after ~1 s of retries; with its server running, a request whose signal it cannot send); "
        "ours refuses a signal that is not an int (None, 'SIGTERM', True) when the client is built, with a "
        "one-line TypeError naming the value"
    ),
    "tme_metrics_configure_none_handler": (
        "configure(None, group) is accepted upstream and the first put_metric to that group then fails with "
        "AttributeError ('NoneType' object has no attribute 'emit'); ours refuses it in configure with a "
        "one-line TypeError naming the value (a handler is anything with emit(), case "
        "tme_metrics_configure_duck_typed_handler)"
    ),
    "tme_metrics_put_metric_bad_name": (
        "upstream publishes a metric named '', None or 5 as it is (a metric is identified by its (group, name) "
        "strings, so such a name cannot be told apart or queried); ours raises a one-line ValueError naming the value"
    ),
    "tme_metrics_prof_not_callable": (
        "prof(5) returns a wrapper upstream that fails only when called (TypeError 'int' object is not callable, "
        "after putting a .failure metric); ours raises a one-line TypeError naming the value when decorating"
    ),
    "tme_events_deserialize_malformed": (
        "Event.deserialize of malformed input raises whatever upstream's parsing step hit (JSONDecodeError, "
        "KeyError for an unknown or missing source, TypeError for a JSON array or an unknown field); ours raises "
        "ValueError naming the input and what is wrong (JSONDecodeError is a ValueError, so `except ValueError` "
        "ports; `except KeyError` for a bad source does not)"
    ),
    "tme_events_serialize_non_json_metadata": (
        "Event.serialize() with a metadata value JSON cannot encode (outside EventMetadataValue, e.g. a Path or an "
        "object) raises TypeError upstream, and so does record(), inside the agent; ours writes str(value) so "
        "recording never breaks the caller"
    ),
    "tme_events_record_zero_timestamp": (
        "record() of an Event whose timestamp is 0 (the default) logs timestamp 0 upstream; ours logs a copy stamped "
        "with the current time in milliseconds (the caller's object keeps 0) so events from several processes can "
        "be ordered (documented in elastic_impl/events/__init__.py)"
    ),
    "tme_events_get_logging_handler_unknown_message": (
        "an unknown destination raises KeyError on both; upstream's message is only the repr of the destination "
        "(\"'nowhere'\"), ours names it and the allowed destinations"
    ),
    "tme_events_rdzv_event_hostname_default": (
        "construct_and_record_rdzv_event without hostname uses socket.getfqdn() upstream, which can block on a "
        "reverse DNS lookup inside rendezvous; ours uses socket.gethostname()"
    ),
    "tme_events_rdzv_event_failed_outside_except": (
        "a FAILED rendezvous event recorded while no exception is being handled carries error_trace "
        "'NoneType: None\\n' upstream (traceback.format_exc() of nothing); ours leaves it '' as for other states"
    ),
    "tme_events_record_loglevel_invalid": (
        "with an invalid LOGLEVEL (e.g. 'not-a-level') upstream's record() raises ValueError('Unknown level') on "
        "every call to a destination not used before; ours records at INFO (a valid LOGLEVEL sets the level on both, "
        "case tme_events_record_loglevel_warning_silences_console)"
    ),
    # --- multiprocessing (issue 17.10)
    "mp_binary_failure_stops_the_others": (
        "when one binary worker fails, upstream's SubprocessContext stops the others and then also lists them as "
        "failures (exit code -15, SIGTERM) although they did not fail on their own; its MultiprocessContext does not. "
        "Ours lists only the ranks that failed on their own, for binaries and functions alike (the stopped ones are "
        "not root causes, and the report names the failed rank only)"
    ),
    "mp_default_logs_specs_devnull_error_and_tee_files": (
        "DefaultLogsSpecs(log_dir=os.devnull).reify(): upstream names /dev/null as every rank's error file and as the "
        "file to tee (tail) for every rank even without tee, and /dev/null/filtered_stdout.log (a path under a device "
        "that cannot be created, so duplicate filters crash there); ours leaves them empty, meaning no file, so no "
        "thread tails /dev/null and duplicate filters get a one-line ValueError. stdouts/stderrs and the "
        "TORCHELASTIC_ERROR_FILE='' set in envs are the same (case mp_default_logs_specs_devnull)"
    ),
    "mp_logs_specs_redirects_given_as_int": (
        "DefaultLogsSpecs(redirects=1) (an int, not a Std or a dict): upstream accepts it and reify() later fails "
        "with AttributeError ('int' object has no attribute 'get'); ours refuses it at construction with a one-line "
        "ValueError naming the value and what is allowed"
    ),
    "mp_multiprocess_context_pids_before_start": (
        "MultiprocessContext.pids() before start(): a bare AssertionError upstream; ours returns {} (no worker "
        "started), as SubprocessContext does on both (case mp_subprocess_context_before_start)"
    ),
    "mp_reify_same_restart_twice": (
        "reify() twice with the same TORCHELASTIC_RESTART_COUNT (a membership change re-forms the group without "
        "using a restart): upstream deletes attempt_<n> with the previous start's logs and error files and reuses "
        "it; ours keeps them and uses attempt_<n>.1 (docs/differences_from_torchrun.md: worker files are never "
        "deleted)"
    ),
    "mp_start_processes_empty_args": (
        "start_processes with args={} and envs={}: upstream starts nothing and reports success (a run that did "
        "nothing); ours raises a one-line ValueError saying args is empty"
    ),
    "mp_start_processes_entrypoint_not_callable": (
        "start_processes(entrypoint=42): upstream starts a worker that fails with TypeError, then wait() raises "
        "AttributeError ('int' object has no attribute '__qualname__') while building the failure report; ours "
        "raises a one-line ValueError naming the entrypoint before starting anything"
    ),
    # --- etcd (issue 17.10): tests/differential/test_etcd_edge_cases.py
    "etcd_store_prefix_none": (
        "EtcdStore(client, None) raises AttributeError upstream ('NoneType' has no endswith); ours raises a one-line "
        "ValueError naming the prefix"
    ),
    "etcd_store_relative_prefix_round_trip": (
        "with a prefix without a leading '/' (e.g. etcd_prefix='p' of the legacy handler) upstream's EtcdStore compares "
        "etcd's absolute key names with its relative ones and never finds a key: get/wait/check time out (LookupError "
        "after 300 s by default: the legacy handler with such an etcd_prefix fails next_rendezvous after 5 min). Ours reads each key by name, so "
        "the key it set is found; the prefix attribute is the same ('p/') on both"
    ),
    "etcd_store_bytearray_value": (
        "upstream's EtcdStore.set/get accept only exact str/bytes (ValueError for a bytearray); ours also takes "
        "bytearray/memoryview, as the c10d stores do (TCPStore.set(key, bytearray(...)) works)"
    ),
    "etcd_store_empty_key_list_on_a_fresh_prefix": (
        "check([]) is False and wait([]) raises LookupError after the timeout upstream while nothing was ever set under "
        "the prefix (its directory read fails), True/returns once anything was set; ours: no keys are always all "
        "present (True / returns at once), as TCPStore.check([]) is True"
    ),
    "etcd_store_duplicate_keys": (
        "a key listed twice is never 'all present' upstream: check(['a', 'a']) is False and wait(['a', 'a']) raises "
        "LookupError after the timeout although 'a' is set (it counts distinct found keys against the list length); "
        "ours looks at each distinct key: True / returns"
    ),
    "etcd_store_add_float_amount": (
        "add(key, 1.5) upstream writes '1.5' into the key and then raises ValueError (the counter is now unusable); ours "
        "raises ValueError naming the amount before writing anything (c10d's Store.add takes an int)"
    ),
    "etcd_store_add_str_amount": (
        "add(key, '3') upstream works on a fresh key (3) and raises TypeError on the next call; ours raises a one-line "
        "ValueError naming the amount every time (c10d's Store.add takes an int; TCPStore raises TypeError)"
    ),
    "etcd_store_key_whose_base64_has_a_slash": (
        "upstream stores keys as standard base64, so a key like b'\\xff\\xff\\xff' ('////') is not a key name etcd "
        "can hold: get() of it times out although set() returned; ours uses URL-safe base64 names (documented in "
        "etcd_store.py; the two layouts are not shared, so both sides of a job must use the same implementation)"
    ),
    "etcd_store_unreachable_etcd_is_a_dist_network_error": (
        "an unreachable etcd: upstream lets python-etcd's EtcdConnectionFailed through; ours raises "
        "EtcdStoreUnreachableError, which is both that EtcdConnectionFailed (code catching it works unchanged; case "
        "etcd_store_unreachable_etcd_is_an_etcd_connection_error) and torch.distributed.DistNetworkError, what c10d "
        "stores raise and what the agent treats as a store outage"
    ),
    "etcd_backend_blank_run_id": (
        "EtcdRendezvousBackend(client, '  ') is accepted upstream (only '' and None are refused); ours refuses a "
        "whitespace-only run id like RendezvousParameters does (see rendezvous_parameters_empty_run_id)"
    ),
    "etcd_backend_fractional_ttl": (
        "ttl=1.5 is passed to etcd upstream, which refuses it: the first set_state raises RendezvousConnectionError "
        "('The connection to etcd has failed'); ours writes whole seconds (int(ttl))"
    ),
    "etcd_backend_set_state_token_of_another_type": (
        "set_state(state, token=object()) raises TypeError upstream (only ValueError of int(token) is caught); ours "
        "treats any token it never handed out alike: it cannot match, the current state comes back with False"
    ),
    "etcd_backend_set_state_token_on_missing_state": (
        "set_state(state, token=5) when no state exists (it expired, or was never written) raises "
        "RendezvousConnectionError upstream (etcd's 'key not found' for prevIndex is wrapped as a connection failure); "
        "ours returns None, the documented 'no state' answer, like a lost race"
    ),
    "etcd_backend_corrupt_state": (
        "a state value that is not base64 ('%%%') decodes to b'' upstream (lenient b64decode drops the bad "
        "characters) and the handler then fails unpickling it; ours raises RendezvousStateError naming the key"
    ),
    "etcd_cert_options_over_http": (
        "ssl_cert (etcd-v2) / cert (legacy etcd) with protocol http are accepted upstream and silently unused (the "
        "connection is plain HTTP); ours refuses them with a one-line ValueError naming the options and protocol, "
        "since whoever set a client certificate believes the connection is TLS"
    ),
    "etcd_create_backend_endpoint_list": (
        "an endpoint listing the etcd cluster's members (h1:p1,h2:p2) is a ValueError upstream; ours connects to the "
        "first one that answers (python-etcd's failover), documented in elastic_impl/rendezvous/_etcd_client.py"
    ),
    "etcd_create_backend_fractional_read_timeout": (
        "read_timeout='0.5' is refused upstream (parsed with get_as_int); ours takes fractional seconds like every "
        "other time option (elastic_impl/rendezvous/options.py)"
    ),
    "etcd_create_backend_ttl_option": (
        "upstream's create_backend ignores a ttl option (the state always lives 2 h without writes) and so accepts "
        "ttl='0'; ours honours ttl (documented in create_backend) and refuses a non-positive one with a one-line "
        "ValueError"
    ),
    "etcd_error_messages": (
        "wording of the etcd one-line errors: ours name the bad value and what is allowed (run_id, protocol, "
        "read_timeout, a str/bytes value's actual type) or the key and timeout of a LookupError; upstream's are "
        "fixed sentences ('The protocol must be HTTP or HTTPS.', 'Key missing not found in EtcdStore', ...). The "
        "exception types are the same"
    ),
    "etcd_legacy_set_closed_before_any_rendezvous": (
        "the legacy handler's set_closed() before any rendezvous state exists raises etcd.EtcdKeyNotFound upstream "
        "(and the run stays open); ours closes the run (documented in etcd_rendezvous.py)"
    ),
    "etcd_legacy_zero_timeout": (
        "timeout='0' (or negative) is accepted upstream and every next_rendezvous raises RendezvousTimeoutError at "
        "once; ours refuses it when the handler is created, with a one-line ValueError naming the value"
    ),
    "etcd_legacy_fractional_timeout": (
        "timeout='2.5' is refused upstream (get_as_int); ours takes fractional seconds (documented in "
        "etcd_rendezvous.py)"
    ),
    "etcd_legacy_protocol_in_capitals": (
        "the legacy handler upstream compares protocol exactly ('HTTP' is a ValueError) while upstream's etcd-v2 "
        "backend lowercases and strips it; ours parses it the same way for both (lowercased, stripped)"
    ),
    "etcd_legacy_unreachable_etcd": (
        "creating the legacy handler against an unreachable etcd (or https with an unreadable CA file) lets "
        "python-etcd's bare EtcdException ('Could not get the list of servers ...') through upstream; ours raises "
        "RendezvousConnectionError naming host:port, as the etcd-v2 backend does on both"
    ),
    # --- rendezvous API, dynamic handler, c10d backend (issue 17.10)
    "rdzv_bootstrap_store_info_is_the_rendezvous_store": (
        "with the store shared (TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset), upstream's rank 0 opens a second TCPStore "
        "server on its own address and a free port in next_rendezvous and hands that out as bootstrap_store_info; "
        "ours hands out the rendezvous TCPStore's own host and port (a store every node already reaches). Both are "
        "a TCPStore any node can use for env:// bootstrap (case rdzv_single_node_bootstrap_store_info); with the "
        "opt-out both publish rank 0's address and a free port (case rdzv_bootstrap_store_info_opted_out)"
    ),
    "rdzv_late_node_waits_then_joins": (
        "a node that joins a running job in a later round (scale-up) fails upstream in next_rendezvous with "
        "DistStoreError: it waits for MASTER_ADDR under the new round's store prefix, which rank 0 published only "
        "in its first round (upstream rebuilds bootstrap_store_info only when it has none); ours completes the "
        "round for both nodes (ranks 0 and 1 of 2)"
    ),
    "rdzv_c10d_backend_int_run_id": (
        "C10dRendezvousBackend(store, 5) raises TypeError upstream (str + int while building the key); ours raises "
        "a one-line ValueError naming the value (an empty or None run id gets upstream's words on both)"
    ),
    "rdzv_create_backend_bad_store_type": (
        "both raise ValueError; upstream's message does not name the value ('Invalid store type given. Currently "
        "only supports file and tcp.'), ours names it and the allowed types"
    ),
    "rdzv_create_backend_file_store_no_endpoint": (
        "store_type=file without an endpoint: upstream creates a private temporary file, so every node gets its "
        "own store and nodes never meet (with min_nodes > 1 each waits out the join timeout); ours raises a "
        "one-line ValueError asking for the shared file's path"
    ),
    "rdzv_create_backend_fractional_read_timeout": (
        "read_timeout='2.5' is refused upstream (parsed with get_as_int); ours takes fractional seconds like every "
        "other time option (elastic_impl/rendezvous/options.py)"
    ),
    "rdzv_create_backend_read_timeout_zero": (
        "both raise ValueError; upstream's 'The read timeout must be a positive integer.' does not name the value, "
        "ours names it and the allowed range"
    ),
    "rdzv_create_backend_read_timeout_negative": (
        "both raise ValueError; upstream's 'The read timeout must be a positive integer.' does not name the value, "
        "ours names it and the allowed range"
    ),
    "rdzv_create_backend_read_timeout_not_a_number": (
        "both raise ValueError naming the option; ours also names the value and the allowed range (upstream: "
        "'... does not represent a valid integer value.')"
    ),
    "rdzv_create_handler_join_timeout_fractional": (
        "join_timeout='1.5' is refused upstream (create_handler parses the *_timeout options with get_as_int); "
        "ours takes fractional seconds like every other time option (elastic_impl/rendezvous/options.py)"
    ),
    "rdzv_timeout_number_instead_of_timedelta": (
        "RendezvousTimeout(join=5) raises TypeError upstream (an int compared with a timedelta); ours also takes a "
        "number of seconds (documented in RendezvousTimeout's docstring); a timedelta works the same on both"
    ),
    "rdzv_timeout_one_millisecond_heartbeat": (
        "RendezvousTimeout(heartbeat=1 ms) is accepted upstream; ours applies the bounds of the option that sets "
        "it (heartbeat_timeout, at least 10 ms: no store round trip completes sooner) and raises a one-line "
        "ValueError naming the value"
    ),
}


def known_difference(impl: str, api: str) -> str | None:
    return KNOWN_DIFFERENCES.get((impl, api))


def signature_difference(impl: str, api: str) -> str | None:
    return SIGNATURE_DIFFERENCES.get((impl, api))
