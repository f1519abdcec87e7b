"""Parameters, timeouts, the registry and the one-line errors for bad input."""

from __future__ import annotations

from datetime import timedelta

import pytest

from elastic_impl.rendezvous import (
    RendezvousHandlerRegistry,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from elastic_impl.rendezvous.dynamic_rendezvous import RendezvousSettings, RendezvousTimeout
from elastic_impl.rendezvous.utils import parse_rendezvous_endpoint


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backend": ""}, "backend"),
        ({"run_id": ""}, "run_id"),
        ({"min_nodes": 0}, "The minimum number of rendezvous nodes (0) must be greater than zero."),
        ({"min_nodes": 3, "max_nodes": 2}, "The maximum number of rendezvous nodes (2) must be greater than or equal"),
        ({"min_nodes": "2"}, "min_nodes must be an integer, got '2'"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, needle):
    args = {"backend": "c10d", "endpoint": "localhost:0", "run_id": "r", "min_nodes": 1, "max_nodes": 2, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        RendezvousParameters(**args)
    assert needle in one_line(excinfo)


def test_parameter_accessors():
    params = RendezvousParameters("c10d", "h:1", "r", 1, 2, flag="Yes", off="0", n="7", bad="maybe")
    assert params.get("missing", 5) == 5
    assert params.get_as_bool("flag") is True and params.get_as_bool("off") is False
    assert params.get_as_bool("missing") is None
    assert params.get_as_int("n") == 7
    with pytest.raises(ValueError) as excinfo:
        params.get_as_bool("bad")
    assert "option 'bad' does not represent a valid boolean value" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        params.get_as_int("bad")
    assert "option 'bad' does not represent a valid integer value" in one_line(excinfo)


def test_timeout_defaults_and_validation():
    timeout = RendezvousTimeout()
    assert [t.total_seconds() for t in (timeout.join, timeout.last_call, timeout.close, timeout.heartbeat)] == [
        600.0, 30.0, 30.0, 5.0,
    ]
    assert RendezvousTimeout(join=timedelta(seconds=7)).join == timedelta(seconds=7)
    with pytest.raises(ValueError) as excinfo:
        RendezvousTimeout(last_call=timedelta(seconds=0))
    assert one_line(excinfo) == "The last_call timeout (0:00:00) must be positive."  # upstream's words
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError, match="join timeout=.* is out of range"):
            RendezvousTimeout(join=bad)


def test_api_timeouts_and_settings_share_the_options_bounds():
    # RendezvousTimeout/RendezvousSettings parse seconds like --rdzv-conf does: heartbeat=0.001 passed here while
    # --rdzv-conf heartbeat=0.001 was refused, and a blank run_id passed here while RendezvousParameters refused it.
    with pytest.raises(ValueError, match=r"rendezvous heartbeat timeout=0.001 is out of range .*0.01 <= seconds"):
        RendezvousTimeout(heartbeat=0.001)
    with pytest.raises(ValueError, match=r"keep_alive_interval timeout=0.001 is out of range .*0.01 <= seconds"):
        RendezvousSettings("job", 1, 1, RendezvousTimeout(), 0.001, 3)
    with pytest.raises(ValueError, match="rendezvous run_id must be a non-empty string, got ' '"):
        RendezvousSettings(" ", 1, 1, RendezvousTimeout(), 5, 3)
    assert RendezvousSettings("job", 1, 2, RendezvousTimeout(), 0.01, 3).heartbeat_expiry_seconds == pytest.approx(0.03)


def test_unknown_backend_is_named_in_upstreams_words():
    params = RendezvousParameters("no-such-backend", "", "r", 1, 1)
    with pytest.raises(ValueError) as excinfo:
        rendezvous_handler_registry.create_handler(params)
    assert one_line(excinfo) == (
        "The rendezvous backend 'no-such-backend' is not registered. Did you forget to call `register`?"
    )


def test_registry_rejects_conflicting_creator_and_checks_backend_name():
    registry = RendezvousHandlerRegistry()

    def creator(params):
        from elastic_impl.rendezvous.static_tcp_rendezvous import create_rdzv_handler

        return create_rdzv_handler(params)

    registry.register("mine", creator)
    registry.register("mine", creator)  # same creator again: fine
    with pytest.raises(ValueError, match="as it is already registered with"):
        registry.register("mine", lambda p: None)
    params = RendezvousParameters("mine", "127.0.0.1:1", "r", 1, 1, rank=0)
    with pytest.raises(RuntimeError, match="backend 'static' does not match the requested backend 'mine'"):
        registry.create_handler(params)


def test_entry_point_backends_are_loaded(monkeypatch):
    import importlib.metadata

    from elastic_impl.rendezvous import api

    ep = importlib.metadata.EntryPoint(
        name="static-plugin", value="elastic_impl.rendezvous.static_tcp_rendezvous:create_rdzv_handler", group=api.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [ep] if group == api.ENTRY_POINT_GROUP else [])
    registry = RendezvousHandlerRegistry()
    assert "static-plugin" in registry.names()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [("", ("localhost", 29400)), ("h", ("h", 29400)), ("h:12", ("h", 12)), ("[::1]:5", ("::1", 5)), ("::1", ("::1", 29400))],
)
def test_parse_endpoint(endpoint, expected):
    assert parse_rendezvous_endpoint(endpoint, 29400) == expected


@pytest.mark.parametrize("endpoint", ["h:port", "h:70000", ":12"])
def test_parse_bad_endpoint(endpoint):
    with pytest.raises(ValueError) as excinfo:
        parse_rendezvous_endpoint(endpoint, 29400)
    assert repr(endpoint) in one_line(excinfo)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"store_type": "carrier-pigeon"}, "store_type='carrier-pigeon' is invalid; allowed: tcp, file"),
        ({"read_timeout": "soon"}, "read_timeout='soon'"),
        ({"join_timeout": "-1"}, "join_timeout='-1' is out of range"),
    ],
)
def test_bad_c10d_options_are_one_line_errors(config, needle, tcp_store):
    params = RendezvousParameters("c10d", f"127.0.0.1:{tcp_store.port}", "r", 1, 1, is_host=False, **config)
    with pytest.raises(ValueError) as excinfo:
        rendezvous_handler_registry.create_handler(params)
    assert needle in one_line(excinfo)


def test_unreachable_endpoint_fails_fast_naming_it():
    from elastic_impl.rendezvous import RendezvousConnectionError
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()  # nobody listens there
    params = RendezvousParameters("c10d", f"127.0.0.1:{port}", "r", 1, 1, is_host=False, read_timeout=1)
    with pytest.raises(RendezvousConnectionError) as excinfo:
        rendezvous_handler_registry.create_handler(params)
    assert f"127.0.0.1:{port}" in one_line(excinfo)


def test_etcd_placeholders_are_listed_and_give_way_to_real_creators():
    from elastic_impl.rendezvous import registry

    assert {"etcd", "etcd-v2", "etcd-v3"} <= set(rendezvous_handler_registry.names())
    local = RendezvousHandlerRegistry()
    placeholder = registry._placeholder("etcd-v3")
    local.register("etcd-v3", placeholder)

    def real(params):
        raise NotImplementedError

    local.register("etcd-v3", real)  # the module's own registration replaces the placeholder
    assert local._registry["etcd-v3"] is real


def test_endpoint_held_by_something_else_is_named_within_connect_timeout():
    """An HTTP server on the endpoint: TCPStore's handshake waits for an answer that never comes (10+ minutes,
    as in torchrun); ours gives up right after connect_timeout (the port accepts connections, so it is not a store
    still starting) and says what answered."""
    import http.server
    import threading
    import time

    from elastic_impl.rendezvous import RendezvousConnectionError

    # threads: the stuck TCPStore handshake must not keep the server from answering the probe (as `python -m
    # http.server` does)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        params = RendezvousParameters("c10d", f"127.0.0.1:{port}", "r", 1, 1, is_host=False, connect_timeout=2)
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError) as excinfo:
            rendezvous_handler_registry.create_handler(params)
        took = time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()
    message = one_line(excinfo)
    assert f"127.0.0.1:{port}" in message and "no TCPStore answered within 2 s" in message, message
    assert "HTTP/1.0 501" in message, message  # what answered: BaseHTTPRequestHandler has no HEAD handler
    # connect_timeout, a 1 s probe, 1 s for a handshake in flight, the 1 s HEAD probe naming what answered, and a
    # margin for a loaded machine; before, the bound was 2 x connect_timeout + 5 s (10.9 s seen here)
    assert 2 <= took < 2 + 3 + 2, took
