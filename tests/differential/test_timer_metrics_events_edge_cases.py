"""Differential edge cases of the timer clients, metrics and events APIs (issue 17.10; cases prefixed ``tme_``).

Each case runs on both implementations (see ``harness.py``); global state a case changes (metrics handlers, event
logging handlers, timer client, logger levels) is restored in ``finally`` on the implementation it ran on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import re
import subprocess
import time
import typing
import warnings

from tests.differential.harness import case, module, outcome, same_behaviour_test

# ---------------------------------------------------------------------------------------------- timer


@case("timer.TimerRequest")
def case_tme_timer_request_fields_and_equality(root, tmp):
    timer = module(root, "timer")
    r = timer.TimerRequest(7, "scope", 2.5)
    return (
        (r.worker_id, r.scope_id, r.expiration_time),
        r == timer.TimerRequest(7, "scope", 2.5),
        r == timer.TimerRequest(7, "scope", 3.0),
        r == timer.TimerRequest(8, "scope", 2.5),
        r == timer.TimerRequest(7, "other", 2.5),
        r == (7, "scope", 2.5),
        r != timer.TimerRequest(7, "scope", 2.5),
        outcome(lambda: setattr(r, "extra", 1), compare_message=False),  # __slots__
        sorted(timer.TimerRequest.__slots__),
    )


@case("timer.TimerRequest")
def case_tme_timer_request_keyword_construction(root, tmp):
    timer = module(root, "timer")
    r = timer.TimerRequest(worker_id="w", scope_id=None, expiration_time=-1)
    return r.worker_id, r.scope_id, r.expiration_time, outcome(lambda: timer.TimerRequest(1, "s"),
                                                              compare_message=False)


@case("timer.TimerRequest")
def case_tme_timer_request_hashable(root, tmp):
    timer = module(root, "timer")
    return outcome(lambda: len({timer.TimerRequest(1, "s", 1.0), timer.TimerRequest(1, "s", 1.0)}),
                   compare_message=False)


@case("timer.TimerClient", "timer.TimerClient.acquire", "timer.TimerClient.release")
def case_tme_timer_client_is_abstract(root, tmp):
    timer = module(root, "timer")

    class OnlyAcquire(timer.TimerClient):
        def acquire(self, scope_id, expiration_time):
            pass

    class Both(OnlyAcquire):
        def release(self, scope_id):
            return "released"

    return (
        outcome(timer.TimerClient),
        outcome(OnlyAcquire),
        Both().release("s"),
        sorted(timer.TimerClient.__abstractmethods__),
    )


def _local_client_requests(root, calls):
    timer = module(root, "timer")
    q: queue.Queue = queue.Queue()
    client = timer.LocalTimerClient(q)
    for method, *args in calls:
        getattr(client, method)(*args)
    seen = []
    while not q.empty():
        r = q.get_nowait()
        seen.append((type(r).__name__, r.worker_id == os.getpid(), r.scope_id, r.expiration_time))
    return seen


@case("timer.LocalTimerClient", "timer.TimerClient.acquire", "timer.TimerClient.release")
def case_tme_local_timer_client_puts_requests_on_the_queue(root, tmp):
    return _local_client_requests(root, [("acquire", "s", 12.5), ("release", "s"), ("release", "never-acquired")])


@case("timer.LocalTimerClient")
def case_tme_local_timer_client_negative_and_none(root, tmp):
    # a negative expiration time is a release on the wire; None scope / zero expiration are passed through as they are
    return _local_client_requests(root, [("acquire", "s", -5), ("acquire", None, 0), ("acquire", "", 1)])


@case("timer.LocalTimerClient", "timer.expires")
def case_tme_local_timer_client_with_expires(root, tmp):
    timer = module(root, "timer")
    q: queue.Queue = queue.Queue()
    before = time.time()
    with timer.expires(after=30, scope="blk", client=timer.LocalTimerClient(q)):
        inside = q.qsize()
    acquire, release = q.get_nowait(), q.get_nowait()
    return (inside, acquire.scope_id, before + 29 <= acquire.expiration_time <= time.time() + 31,
            release.scope_id, release.expiration_time, q.empty())


@case("timer.FileTimerClient")
def case_tme_file_timer_client_defaults(root, tmp):
    timer = module(root, "timer")
    client = timer.FileTimerClient(str(tmp / "fifo"))
    return int(client.signal), type(client.signal).__name__, isinstance(client, timer.TimerClient)


@case("timer.FileTimerClient")
def case_tme_file_timer_client_signal_not_a_number(root, tmp):
    timer = module(root, "timer")
    return [outcome(lambda s=s: timer.FileTimerClient(str(tmp / "fifo"), signal=s).acquire("s", 1.0),
                    compare_message=False) for s in (None, "SIGTERM", True)]


@case("timer.FileTimerClient")
def case_tme_file_timer_client_missing_fifo(root, tmp):
    timer = module(root, "timer")
    client = timer.FileTimerClient(str(tmp / "no-server.fifo"))
    start = time.monotonic()
    try:
        client.acquire("s", time.time() + 10)
    except Exception as e:  # noqa: BLE001 - the observation
        elapsed = time.monotonic() - start
        return (type(e).__name__,
                str(e).startswith("Could not send the FileTimerRequest because FileTimerServer is not available"),
                type(e.__cause__).__name__, elapsed >= 0.5, (tmp / "no-server.fifo").exists())
    # (release goes the same way: not timed again, to keep the case short)
    return "no error"


@case("timer.FileTimerClient")
def case_tme_file_timer_client_path_is_a_directory(root, tmp):
    timer = module(root, "timer")
    (tmp / "dir").mkdir()
    try:
        timer.FileTimerClient(str(tmp / "dir")).acquire("s", 1.0)
    except Exception as e:  # noqa: BLE001 - the observation
        return type(e).__name__, type(e.__cause__).__name__
    return "no error"


def _one_request_written(root, tmp, name, send):
    # a regular file at the path: opening it for writing succeeds, so the request lands in it as it would in the FIFO
    # (a fresh file per request: both write each request at offset 0)
    path = tmp / name
    path.write_text("")
    send(module(root, "timer").FileTimerClient(str(path), signal=15))
    (d,) = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(d), d["version"], d["pid"] == os.getpid(), d["scope_id"], d["expiration_time"], d["signal"]


@case("timer.FileTimerClient", "timer.TimerClient.acquire", "timer.TimerClient.release")
def case_tme_file_timer_client_writes_json_lines(root, tmp):
    return (_one_request_written(root, tmp, "acquire", lambda c: c.acquire("s", 12.5)),
            _one_request_written(root, tmp, "negative", lambda c: c.acquire("neg", -3)),
            _one_request_written(root, tmp, "release", lambda c: c.release("s")))


@case("timer.FileTimerClient")
def case_tme_file_timer_client_default_signal_on_the_wire(root, tmp):
    timer = module(root, "timer")
    path = tmp / "requests"
    path.write_text("")
    timer.FileTimerClient(str(path)).acquire("s", 1.0)
    return [json.loads(line)["signal"] for line in path.read_text().splitlines()]


@case("timer.FileTimerClient")
def case_tme_file_timer_client_request_larger_than_pipe_buf(root, tmp):
    timer = module(root, "timer")
    path = tmp / "requests"
    path.write_text("")
    result = outcome(lambda: timer.FileTimerClient(str(path)).acquire("x" * 5000, 1.0), compare_message=False)
    return result, path.read_text() == ""


@case("timer.FileTimerClient", "timer.FileTimerServer", "timer.TimerServer.get_expired_timers")
def case_tme_file_timer_client_to_server_round_trip(root, tmp):
    timer = module(root, "timer")
    path = str(tmp / "watchdog.fifo")
    server = timer.FileTimerServer(path, "run", max_interval=0.01)
    server.start()
    try:
        client = timer.FileTimerClient(path, signal=15)
        # far-future deadlines: the watchdog must not signal this (test) process
        client.acquire("a", 1e11)
        client.acquire("b", 1e12)
        client.release("b")
        deadline = time.monotonic() + 2
        expired = {}
        while time.monotonic() < deadline:
            expired = server.get_expired_timers(2e11)
            if expired:
                break
            time.sleep(0.01)
        return {pid == os.getpid(): sorted((r.scope_id, r.expiration_time, r.signal) for r in reqs)
                for pid, reqs in expired.items()}
    finally:
        server.clear_timers({os.getpid()})
        server.stop()


def _open_fifo_for_writing(path):
    deadline = time.monotonic() + 5  # upstream's server opens its FIFO in the watchdog thread, after start()
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@case("timer.FileTimerClient", "timer.FileTimerServer")
def case_tme_file_timer_signal_zero_or_negative_does_not_kill(root, tmp):
    # FileTimerClient documents: "Using a negative or zero signal will not kill the process". The requests are
    # written to the FIFO as FileTimerClient(path, signal=0 / -1) in those processes would write them.
    timer = module(root, "timer")
    path = str(tmp / "watchdog.fifo")
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    server = timer.FileTimerServer(path, "run", max_interval=0.01)
    server.start()
    try:
        fd = _open_fifo_for_writing(path)
        try:
            for proc, sig in zip(sleepers, (0, -1), strict=True):
                line = {"version": 1, "pid": proc.pid, "scope_id": "s", "expiration_time": 1.0, "signal": sig}
                os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
        time.sleep(0.3)  # many watchdog passes
        return [p.poll() for p in sleepers], server.get_expired_timers(time.time())
    finally:
        server.stop()
        for p in sleepers:
            p.kill()
            p.wait()


@contextlib.contextmanager
def _capture_logger(logger: logging.Logger, level: int = logging.DEBUG):
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record)

    grab = Grab()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(grab)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(grab)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@case("timer.debug_info_logging.log_debug_info_for_expired_timers")
def case_tme_log_debug_info_for_expired_timers(root, tmp):
    debug = module(root, "timer.debug_info_logging")
    with _capture_logger(debug.logger) as records:
        results = (
            debug.log_debug_info_for_expired_timers("run-1", {}),
            debug.log_debug_info_for_expired_timers("run-1", {123: ["scope-a", "scope-b"], 456: []}),
            debug.log_debug_info_for_expired_timers(None, {1: ["s"]}),
        )
    return results, [(r.levelname, r.getMessage()) for r in records]


@case("timer.debug_info_logging.log_debug_info_for_expired_timers")
def case_tme_log_debug_info_default_level(root, tmp):
    # at the logger's own level (LOGLEVEL, default WARNING) the INFO line is not emitted
    debug = module(root, "timer.debug_info_logging")
    return logging.getLevelName(debug.logger.level), debug.logger.isEnabledFor(logging.INFO) == (
        debug.logger.getEffectiveLevel() <= logging.INFO)


# ---------------------------------------------------------------------------------------------- metrics


@contextlib.contextmanager
def _metrics_state(root):
    """Restore the module-wide handlers (default and per group) a case changes."""
    api = module(root, "metrics.api")
    old_default, old_map = api._default_metrics_handler, dict(api._metrics_map)
    try:
        yield api
    finally:
        api._default_metrics_handler = old_default
        api._metrics_map.clear()
        api._metrics_map.update(old_map)


def _recording_handler(root, into: list):
    metrics = module(root, "metrics")

    class Recording(metrics.MetricHandler):
        def emit(self, metric_data):
            into.append(metric_data)

    return Recording()


def _plain(data, keep_value=True):
    return (data.group_name, data.name, data.value if keep_value else type(data.value).__name__)


@case("metrics.api.MetricHandler")
def case_tme_metric_handler_is_abstract(root, tmp):
    api = module(root, "metrics.api")
    return outcome(api.MetricHandler), sorted(api.MetricHandler.__abstractmethods__)


@case("metrics.api.MetricHandler", "metrics.configure", "metrics.put_metric")
def case_tme_metrics_configure_group_and_default(root, tmp):
    metrics = module(root, "metrics")
    default, grouped = [], []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, default))
        metrics.configure(_recording_handler(root, grouped), group="mine")
        metrics.put_metric("a", 1, "mine")
        metrics.put_metric("b", 2, "other")
        metrics.put_metric("c", 3)
        return [_plain(d) for d in default], [_plain(d) for d in grouped]


@case("metrics.configure", "metrics.put_metric")
def case_tme_metrics_configure_returns_and_replaces(root, tmp):
    metrics = module(root, "metrics")
    first, second = [], []
    with _metrics_state(root):
        results = (metrics.configure(_recording_handler(root, first), "g"),
                   metrics.configure(_recording_handler(root, second), "g"))
        metrics.put_metric("m", 1, "g")
        return results, len(first), len(second)


@case("metrics.configure", "metrics.put_metric")
def case_tme_metrics_configure_duck_typed_handler(root, tmp):
    # a handler object with an emit() method that does not subclass MetricHandler
    metrics = module(root, "metrics")
    seen = []

    class Duck:
        def emit(self, metric_data):
            seen.append(metric_data)

    with _metrics_state(root):
        result = outcome(lambda: metrics.configure(Duck(), "duck"), compare_message=False)
        metrics.put_metric("m", 5, "duck")
        return result, [_plain(d) for d in seen]


@case("metrics.configure", "metrics.put_metric")
def case_tme_metrics_configure_none_handler(root, tmp):
    metrics = module(root, "metrics")
    with _metrics_state(root):
        return outcome(lambda: (metrics.configure(None, "nothing"), metrics.put_metric("m", 1, "nothing")),
                       compare_message=False)


@case("metrics.configure", "metrics.put_metric")
def case_tme_metrics_group_none_and_empty(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got))
        metrics.put_metric("n", 1, None)
        metrics.put_metric("e", 2, "")
        return [_plain(d) for d in got]


@case("metrics.put_metric")
def case_tme_metrics_put_metric_values_passed_through(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got), "v")
        for value in (0, -1, 1.5, "text", None, True):
            metrics.put_metric("m", value, "v")
        return [_plain(d) for d in got]


@case("metrics.put_metric")
def case_tme_metrics_put_metric_bad_name(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got), "v")
        results = [outcome(lambda n=name: metrics.put_metric(n, 1, "v"), compare_message=False)
                   for name in ("", None, 5)]
        return results, [_plain(d) for d in got]


@case("metrics.put_metric", "metrics.api.NullMetricHandler")
def case_tme_metrics_default_handler_is_null(root, tmp):
    metrics = module(root, "metrics")
    api = module(root, "metrics.api")
    out = io.StringIO()
    with _metrics_state(root), contextlib.redirect_stdout(out):
        stream = api.getStream("never-configured-group")
        metrics.put_metric("m", 1, "never-configured-group")
        return type(stream.handler).__name__, stream.group_name, out.getvalue()


@case("metrics.api.NullMetricHandler")
def case_tme_metrics_null_handler_emits_nothing(root, tmp):
    api = module(root, "metrics.api")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = api.NullMetricHandler().emit(api.MetricData(1.0, "g", "n", 1))
        none_result = api.NullMetricHandler().emit(None)
    return result, none_result, out.getvalue(), err.getvalue(), isinstance(api.NullMetricHandler(), api.MetricHandler)


@case("metrics.api.ConsoleMetricHandler")
def case_tme_metrics_console_handler_line_format(root, tmp):
    api = module(root, "metrics.api")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = api.ConsoleMetricHandler().emit(api.MetricData(1.5, "grp", "name.x", 3))
        api.ConsoleMetricHandler().emit(api.MetricData(0, None, "", None))
    return result, out.getvalue()


@case("metrics.api.ConsoleMetricHandler", "metrics.configure", "metrics.put_metric")
def case_tme_metrics_console_handler_through_put_metric(root, tmp):
    metrics = module(root, "metrics")
    out = io.StringIO()
    with _metrics_state(root), contextlib.redirect_stdout(out):
        metrics.configure(metrics.ConsoleMetricHandler(), "console-group")
        before = time.time()
        metrics.put_metric("latency", 42, "console-group")
    m = re.fullmatch(r"\[([0-9.]+)\]\[console-group\]: latency=42\n", out.getvalue())
    return bool(m), m is not None and before - 1 <= float(m.group(1)) <= time.time() + 1


@case("metrics.put_metric", "metrics.api.MetricHandler")
def case_tme_metrics_metric_data_and_stream(root, tmp):
    api = module(root, "metrics.api")
    data = api.MetricData(1.0, "g", "n", 2)
    got = []
    with _metrics_state(root):
        api.configure(_recording_handler(root, got), "s")
        stream = api.getStream("s")
        stream.add_value("x", 9)
        start = time.time() - 0.25
        return (api.MetricData._fields, tuple(data), data == (1.0, "g", "n", 2), stream.group_name,
                [_plain(d) for d in got], 200 <= api.get_elapsed_time_ms(start) < 5000,
                type(api.get_elapsed_time_ms(start)).__name__)


def _module_level_profiled():
    return "done"


def _module_level_raises():
    raise ValueError("bad")


@case("metrics.prof", "metrics.put_metric")
def case_tme_metrics_prof_names_and_groups(root, tmp):
    metrics = module(root, "metrics")
    got = []

    class Trainer:
        @metrics.prof
        def step(self):
            return "stepped"

    def nested():
        return "nested"

    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got))
        results = (
            metrics.prof(_module_level_profiled)(),
            metrics.prof(group="custom")(_module_level_profiled)(),
            Trainer().step(),
            metrics.prof(nested)(),
            metrics.prof(_module_level_profiled).__name__,
        )
        return results, [_plain(d, keep_value=d.name.endswith((".success", ".failure"))) for d in got]


@case("metrics.prof", "metrics.put_metric")
def case_tme_metrics_prof_failure(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got))
        result = outcome(metrics.prof(_module_level_raises))
        return result, [_plain(d, keep_value=not d.name.endswith(".ms")) for d in got]


@case("metrics.prof", "metrics.put_metric")
def case_tme_metrics_prof_base_exception(root, tmp):
    # KeyboardInterrupt/SystemExit are not Exceptions: neither .success nor .failure, only the duration
    metrics = module(root, "metrics")
    got = []

    def interrupted():
        raise KeyboardInterrupt

    def exits():
        raise SystemExit(3)

    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got))
        results = outcome(metrics.prof(interrupted)), outcome(metrics.prof(exits))
        return results, [_plain(d, keep_value=False) for d in got]


@case("metrics.prof")
def case_tme_metrics_prof_passes_arguments(root, tmp):
    metrics = module(root, "metrics")
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, []))

        @metrics.prof(group="args")
        def add(a, b=2, *rest, **kw):
            return a + b + sum(rest) + sum(kw.values())

        return add(1), add(1, 3, 4, x=5), add.__name__, add.__doc__


@case("metrics.prof")
def case_tme_metrics_prof_not_callable(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root):
        metrics.configure(_recording_handler(root, got))
        decorated = outcome(lambda: callable(metrics.prof(5)), compare_message=False)
        return decorated, [d.name for d in got]


@case("metrics.prof")
def case_tme_metrics_profile_deprecated(root, tmp):
    metrics = module(root, "metrics")
    got = []
    with _metrics_state(root), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics.configure(_recording_handler(root, got))

        @metrics.profile("old-group")
        def legacy():
            return "legacy"

        result = legacy()
        return (result, sorted({(w.category.__name__, str(w.message)) for w in caught}),
                [_plain(d, keep_value=not d.name.endswith(".ms")) for d in got])


# ---------------------------------------------------------------------------------------------- events


@case("events.api.Event", "events.api.EventSource")
def case_tme_events_event_defaults_repr_equality(root, tmp):
    api = module(root, "events.api")
    e = api.Event("n", api.EventSource.AGENT)
    other = api.Event("n", api.EventSource.AGENT)
    other.metadata["k"] = 1
    return (e.timestamp, e.metadata, repr(e), e == api.Event("n", api.EventSource.AGENT), e == other,
            e.metadata is not api.Event("m", api.EventSource.WORKER).metadata,
            outcome(lambda: hash(e), compare_message=False), outcome(lambda: api.Event("n"), compare_message=False))


@case("events.api.Event", "events.api.EventSource", "events.api.EventMetadataValue")
def case_tme_events_serialize_round_trip(root, tmp):
    api = module(root, "events.api")
    e = api.Event("n", api.EventSource.WORKER, 123, {"s": "x", "i": 1, "f": 1.5, "b": False, "none": None})
    text = e.serialize()
    back = api.Event.deserialize(text)
    return (text, str(e) == text, back == e, type(back.source).__name__, back.source.name,
            api.Event.deserialize(e) is e)


@case("events.api.Event")
def case_tme_events_deserialize_malformed(root, tmp):
    api = module(root, "events.api")
    inputs = ["{not json", '{"name": "n", "source": "BOGUS", "timestamp": 0, "metadata": {}}',
              '{"name": "n", "timestamp": 0, "metadata": {}}', "[1]",
              '{"name": "n", "source": "AGENT", "timestamp": 0, "metadata": {}, "extra": 1}']
    return [outcome(lambda d=data: api.Event.deserialize(d), compare_message=False)[:2] for data in inputs]


@case("events.api.Event")
def case_tme_events_deserialize_minimal_object(root, tmp):
    api = module(root, "events.api")
    e = api.Event.deserialize('{"name": "n", "source": "AGENT"}')
    return e.name, e.source.name, e.timestamp, e.metadata


@case("events.api.Event", "events.api.EventMetadataValue")
def case_tme_events_serialize_non_json_metadata(root, tmp):
    api = module(root, "events.api")
    return outcome(lambda: api.Event("n", api.EventSource.AGENT, 0, {"obj": object()}).serialize(),
                   compare_message=False)[:2]


@case("events.api.Event", "events.api.EventSource")
def case_tme_events_source_as_plain_string(root, tmp):
    # dataclasses do not check types: a plain string source serializes like the member
    api = module(root, "events.api")
    e = api.Event("n", "AGENT")
    return e.serialize(), api.Event.deserialize(e.serialize()).source.name


@case("events.api.EventSource")
def case_tme_events_event_source_members(root, tmp):
    api = module(root, "events.api")
    src = api.EventSource
    return ([(m.name, m.value) for m in src], src("AGENT").name, src["WORKER"].value, src.AGENT == "AGENT",
            isinstance(src.AGENT, str), str(src.AGENT), f"{src.WORKER}", json.dumps(src.AGENT),
            outcome(lambda: src("nobody"), compare_message=False))


@case("events.api.EventMetadataValue")
def case_tme_events_metadata_value_type(root, tmp):
    api = module(root, "events.api")
    events = module(root, "events")
    args = typing.get_args(api.EventMetadataValue)
    return sorted(a.__name__ for a in args), events.EventMetadataValue == api.EventMetadataValue


@contextlib.contextmanager
def _console_stream(root):
    events = module(root, "events")
    stream = io.StringIO()
    handler = events.get_logging_handler("console")
    old = handler.setStream(stream)
    try:
        yield stream
    finally:
        handler.setStream(old)


@case("events.record", "events.get_logging_handler", "events.api.Event")
def case_tme_events_record_console(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    with _console_stream(root) as stream:
        result = events.record(api.Event("to-console", api.EventSource.AGENT, 5, {"a": 1}), "console")
        events.record(api.Event("to-null", api.EventSource.AGENT, 5))
        events.record(api.Event("to-null-2", api.EventSource.AGENT, 5), "null")
    return result, stream.getvalue()


@case("events.record", "events.api.Event")
def case_tme_events_record_zero_timestamp(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    e = api.Event("zero", api.EventSource.WORKER)
    with _console_stream(root) as stream:
        events.record(e, "console")
    return json.loads(stream.getvalue())["timestamp"], e.timestamp


def _record_console_with_loglevel(root, loglevel):
    # the destination's logger takes its level from LOGLEVEL when first used
    events = module(root, "events")
    api = module(root, "events.api")
    old_logger = events._events_loggers.pop("console", None)
    old_level = old_logger.level if old_logger is not None else logging.INFO
    old_env = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = loglevel
    try:
        with _console_stream(root) as stream:
            result = outcome(lambda: events.record(api.Event("quiet", api.EventSource.AGENT, 5), "console"),
                             compare_message=False)
        return result, stream.getvalue()
    finally:
        if old_env is None:
            del os.environ["LOGLEVEL"]
        else:
            os.environ["LOGLEVEL"] = old_env
        new_logger = events._events_loggers.pop("console", None)
        if new_logger is not None:
            new_logger.setLevel(old_level)
        if old_logger is not None:
            events._events_loggers["console"] = old_logger


@case("events.record")
def case_tme_events_record_loglevel_warning_silences_console(root, tmp):
    return _record_console_with_loglevel(root, "WARNING")


@case("events.record")
def case_tme_events_record_loglevel_invalid(root, tmp):
    return _record_console_with_loglevel(root, "not-a-level")


@case("events.record")
def case_tme_events_record_unknown_destination(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    return outcome(lambda: events.record(api.Event("n", api.EventSource.AGENT), "nowhere"), compare_message=False)


@case("events.record")
def case_tme_events_record_not_an_event(root, tmp):
    events = module(root, "events")
    return outcome(lambda: events.record("not an event"), compare_message=False)


@case("events.get_logging_handler")
def case_tme_events_get_logging_handler_known(root, tmp):
    events = module(root, "events")
    return (type(events.get_logging_handler()).__name__, type(events.get_logging_handler("null")).__name__,
            type(events.get_logging_handler("console")).__name__,
            type(events.get_logging_handler("dynamic_rendezvous")).__name__,
            events.get_logging_handler("null") is events.get_logging_handler(),
            events.get_logging_handler("console") is events.get_logging_handler("console"))


@case("events.get_logging_handler")
def case_tme_events_get_logging_handler_unknown(root, tmp):
    events = module(root, "events")
    return [outcome(lambda d=dest: events.get_logging_handler(d), compare_message=False)
            for dest in ("nowhere", None, "")]


@case("events.get_logging_handler")
def case_tme_events_get_logging_handler_unknown_message(root, tmp):
    events = module(root, "events")
    return outcome(lambda: events.get_logging_handler("nowhere"))


@contextlib.contextmanager
def _rdzv_destination(root):
    """Send the dynamic_rendezvous destination to a string stream (it is a null handler, which skips recording)."""
    events = module(root, "events")
    handlers = module(root, "events.handlers")
    stream = io.StringIO()
    capture = logging.StreamHandler(stream)
    old_handler = handlers._log_handlers["dynamic_rendezvous"]
    old_logger = events._events_loggers.pop("dynamic_rendezvous", None)
    handlers._log_handlers["dynamic_rendezvous"] = capture
    try:
        yield stream
    finally:
        logger = events._events_loggers.pop("dynamic_rendezvous", None)
        if logger is not None:
            logger.removeHandler(capture)
        handlers._log_handlers["dynamic_rendezvous"] = old_handler
        if old_logger is not None:
            events._events_loggers["dynamic_rendezvous"] = old_logger


def _recorded_rdzv(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_skipped_for_null_destination(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    return events.construct_and_record_rdzv_event("run", "msg", api.NodeState.RUNNING)


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_fields(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    with _rdzv_destination(root) as stream:
        result = events.construct_and_record_rdzv_event(
            run_id="run", message="joined", node_state=api.NodeState.SUCCEEDED, name="Handler.join",
            hostname="host-1", pid=4321, master_endpoint="h:1", local_id=3, rank=0)
    return result, _recorded_rdzv(stream)


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_defaults(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    with _rdzv_destination(root) as stream:
        events.construct_and_record_rdzv_event("run", "m", api.NodeState.INIT, hostname="h")
        events.construct_and_record_rdzv_event("run", "m", api.NodeState.RUNNING, hostname="h", pid=0, rank=None)
    return [(d["name"], d["pid"] == os.getpid(), d["rank"], d["local_id"], d["master_endpoint"], d["node_state"],
             d["error_trace"]) for d in _recorded_rdzv(stream)]


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_failed_inside_except(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    with _rdzv_destination(root) as stream:
        try:
            raise RuntimeError("rendezvous broke")
        except RuntimeError:
            events.construct_and_record_rdzv_event("run", "failed", api.NodeState.FAILED, hostname="h", pid=1)
    (d,) = _recorded_rdzv(stream)
    return d["node_state"], "RuntimeError: rendezvous broke" in d["error_trace"], d["error_trace"].startswith(
        "Traceback")


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_failed_outside_except(root, tmp):
    events = module(root, "events")
    api = module(root, "events.api")
    with _rdzv_destination(root) as stream:
        events.construct_and_record_rdzv_event("run", "failed", api.NodeState.FAILED, hostname="h", pid=1)
    return [d["error_trace"] for d in _recorded_rdzv(stream)]


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_hostname_default(root, tmp):
    import socket

    events = module(root, "events")
    api = module(root, "events.api")
    with _rdzv_destination(root) as stream:
        events.construct_and_record_rdzv_event("run", "m", api.NodeState.INIT, pid=1)
    (d,) = _recorded_rdzv(stream)
    return d["hostname"] == socket.getfqdn(), bool(d["hostname"])


@case("events.construct_and_record_rdzv_event")
def case_tme_events_rdzv_event_node_state_as_string(root, tmp):
    events = module(root, "events")
    with _rdzv_destination(root) as stream:
        events.construct_and_record_rdzv_event("run", "m", "RUNNING", hostname="h", pid=1)
    return [d["node_state"] for d in _recorded_rdzv(stream)]


test_same_observable_behaviour = same_behaviour_test(__name__)
