"""Structured events.

``record(event, destination)`` logs the serialized event to the logger of that destination (see
:func:`get_logging_handler`). Two extensions of ours feed the simulator's history:

* ``add_listener(fn)`` / ``remove_listener(fn)``: every recorded event (``Event`` or ``RdzvEvent``, any destination)
  is passed to each listener, in this process.
* env ``ELASTIC_IMPL_EVENTS_FILE``: every recorded event is appended to that file as one JSON line
  (``serialize()``), written with a single ``O_APPEND`` ``write`` so lines from concurrent processes never interleave.

An ``Event`` recorded with ``timestamp == 0`` is stamped with the current wall time in milliseconds (a copy; the
caller's object is untouched) so histories built from several processes can be ordered.
A failing listener, file or handler is logged and swallowed: recording never breaks the caller.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Union

from elastic_impl.events.api import Event, EventMetadataValue, EventSource, NodeState, RdzvEvent
from elastic_impl.events.handlers import get_logging_handler
from elastic_impl.utils.clock import REAL_CLOCK, Clock

__all__ = [
    "Event",
    "EventMetadataValue",
    "EventSource",
    "NodeState",
    "RdzvEvent",
    "add_listener",
    "construct_and_record_rdzv_event",
    "get_logging_handler",
    "record",
    "record_rdzv_event",
    "remove_listener",
    "EVENTS_FILE_ENV",
]

EVENTS_FILE_ENV = "ELASTIC_IMPL_EVENTS_FILE"

_log = logging.getLogger(__name__)
_events_loggers: dict[str, logging.Logger] = {}
_listeners: list[Callable[[Union[Event, RdzvEvent]], None]] = []
_listeners_lock = threading.Lock()
# the clock that stamps events recorded without a timestamp; the simulator may swap it for virtual time
_clock: Clock = REAL_CLOCK


def set_clock(clock: Clock) -> None:
    """Use ``clock`` (``time()``) to stamp events recorded with ``timestamp == 0``."""
    global _clock
    _clock = clock


def _get_or_create_logger(destination: str = "null") -> logging.Logger:
    if destination in _events_loggers:
        return _events_loggers[destination]
    handler = get_logging_handler(destination)
    logger = logging.getLogger(f"elastic_impl.events.{destination}")
    # events are logged at INFO: LOGLEVEL (as upstream) can silence them, e.g. LOGLEVEL=WARNING; an invalid value is INFO
    try:
        logger.setLevel(os.environ.get("LOGLEVEL", "INFO"))
    except (ValueError, TypeError):
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False  # events go to their destination only, not to the root logger
    _events_loggers[destination] = logger
    return logger


def add_listener(fn: Callable[[Union[Event, RdzvEvent]], None]) -> None:
    """Call ``fn(event)`` for every event recorded in this process from now on."""
    if not callable(fn):
        raise TypeError(f"event listener must be callable, got {fn!r}")
    with _listeners_lock:
        _listeners.append(fn)


def remove_listener(fn: Callable[[Union[Event, RdzvEvent]], None]) -> None:
    """Stop calling ``fn``; removing a listener that is not registered is a no-op."""
    with _listeners_lock:
        try:
            _listeners.remove(fn)
        except ValueError:
            pass


def _append_to_events_file(line: str) -> None:
    path = os.environ.get(EVENTS_FILE_ENV)
    if not path:
        return
    data = (line.replace("\n", " ") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write per line: O_APPEND makes it atomic w.r.t. other appenders
    finally:
        os.close(fd)


def _dispatch(event: Union[Event, RdzvEvent]) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(event)
        except Exception as e:  # a broken listener must not break the agent or rendezvous
            _log.warning("event listener %r failed on %s: %s", fn, event.name, e)
    try:
        _append_to_events_file(event.serialize())
    except Exception as e:
        _log.warning(
            "could not append event %s to %s=%s: %s",
            event.name,
            EVENTS_FILE_ENV,
            os.environ.get(EVENTS_FILE_ENV),
            e,
        )


def record(event: Event, destination: str = "null") -> None:
    """Record ``event`` to ``destination``'s logger, the listeners and the events file.

    Raises before recording anything, as upstream does: ``KeyError`` for an unknown ``destination`` (see
    :func:`get_logging_handler`), ``AttributeError`` for an ``event`` without ``serialize()``.
    """
    get_logging_handler(destination)
    if not callable(getattr(event, "serialize", None)):
        raise AttributeError(f"record() expects an Event (an object with serialize()), got {event!r:.80}")
    if isinstance(event, Event) and event.timestamp == 0:
        try:
            event = dataclasses.replace(event, timestamp=int(_clock.time() * 1000))
        except Exception:
            pass
    _dispatch(event)
    try:
        _get_or_create_logger(destination).info(event.serialize())
    except Exception as e:
        _log.warning(
            "could not log event %s to destination %r: %s", getattr(event, "name", event), destination, e
        )


def record_rdzv_event(event: RdzvEvent) -> None:
    """Record a rendezvous event to the ``dynamic_rendezvous`` destination."""
    record(event, "dynamic_rendezvous")  # type: ignore[arg-type]


def construct_and_record_rdzv_event(
    run_id: str,
    message: str,
    node_state: NodeState,
    name: str = "",
    hostname: str = "",
    pid: int | None = None,
    master_endpoint: str = "",
    local_id: int | None = None,
    rank: int | None = None,
) -> None:
    """Build a :class:`RdzvEvent` and record it to the ``dynamic_rendezvous`` destination.

    The event's name is ``"<caller's file name>:<name>"`` (``name`` defaults to the calling function's name), as
    upstream; ``pid`` defaults (also when 0) to this process, ``hostname`` to this host's name, and a ``FAILED`` event
    carries the traceback of the exception being handled.
    """
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    filename = os.path.basename(caller.f_code.co_filename) if caller is not None else "no_file"
    if not name:
        name = caller.f_code.co_name if caller is not None else ""
    del frame, caller
    _construct_and_record(run_id, message, node_state, f"{filename}:{name}", hostname, pid, master_endpoint,
                          local_id, rank)


def _construct_and_record(
    run_id: str,
    message: str,
    node_state: NodeState,
    name: str,
    hostname: str = "",
    pid: int | None = None,
    master_endpoint: str = "",
    local_id: int | None = None,
    rank: int | None = None,
) -> None:
    """:func:`construct_and_record_rdzv_event` with ``name`` taken as it is (our rendezvous names its events
    ``rdzv.<step>`` and the simulator reads them by those names)."""
    # building an event costs work; skip it when nobody can observe the result
    if (
        not _listeners
        and not os.environ.get(EVENTS_FILE_ENV)
        and isinstance(get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
    ):
        return
    if not hostname:
        hostname = socket.gethostname()  # getfqdn may block on DNS
    if not pid:
        pid = os.getpid()
    error_trace = ""
    if node_state == NodeState.FAILED:
        error_trace = traceback.format_exc()
        if error_trace.strip() == "NoneType: None":
            error_trace = ""
    event = RdzvEvent(
        name=name,
        run_id=run_id,
        message=message,
        hostname=hostname,
        pid=pid,
        node_state=node_state,
        master_endpoint=master_endpoint,
        rank=rank,
        local_id=local_id,
        error_trace=error_trace,
    )
    record_rdzv_event(event)
