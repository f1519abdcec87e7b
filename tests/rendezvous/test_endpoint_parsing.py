"""One endpoint parser: the launcher (split_endpoint, the static master) and the rendezvous handlers
(parse_rendezvous_endpoint) accept and reject the same endpoints and agree on the port."""

from __future__ import annotations

import pytest

from elastic_impl.launcher.api import LaunchConfigError, _static_master, split_endpoint
from elastic_impl.rendezvous import RendezvousParameters
from elastic_impl.rendezvous.static_tcp_rendezvous import create_rdzv_handler
from elastic_impl.rendezvous.utils import parse_rendezvous_endpoint

GOOD = [
    ("host", ("host", None)),
    ("host:29400", ("host", 29400)),
    ("10.0.0.1:0", ("10.0.0.1", 0)),
    ("[::1]:29400", ("::1", 29400)),
    ("[fe80::1]", ("fe80::1", None)),
    ("fe80::1", ("fe80::1", None)),  # a bare IPv6 address has no port (the launcher rejected it before)
    (" node-1.example.com:80 ", ("node-1.example.com", 80)),
]
BAD = ["h:", "h:port", "h:70000", ":12", "[::1", "[::1]x", "[::1]:", "fe80::zz", "h o:1", "[not-ipv6]:1", "a:b:c"]


@pytest.mark.parametrize("endpoint, expected", GOOD)
def test_launcher_and_rendezvous_parse_the_same(endpoint, expected):
    assert split_endpoint(endpoint, default_port=None) == expected
    host, port = expected
    assert parse_rendezvous_endpoint(endpoint, 29400) == (host, 29400 if port is None else port)


@pytest.mark.parametrize("endpoint", BAD)
def test_launcher_and_rendezvous_reject_the_same(endpoint):
    with pytest.raises(LaunchConfigError) as launcher_error:
        split_endpoint(endpoint, default_port=None)
    with pytest.raises(ValueError) as handler_error:
        parse_rendezvous_endpoint(endpoint, 29400)
    for error in (launcher_error, handler_error):
        message = str(error.value)
        assert repr(endpoint) in message and "\n" not in message and "host[:port]" in message, message


def _static(endpoint: str) -> RendezvousParameters:
    return RendezvousParameters(backend="static", endpoint=endpoint, run_id="r", min_nodes=1, max_nodes=1, rank=0)


@pytest.mark.parametrize("endpoint, expected", [("127.0.0.1:29611", ("127.0.0.1", 29611)),
                                                ("[::1]:29612", ("::1", 29612))])
def test_static_master_is_where_the_handler_binds(endpoint, expected):
    handler = create_rdzv_handler(_static(endpoint))
    assert _static_master(_static(endpoint)) == expected == (handler.master_addr, handler.master_port)


def test_static_endpoint_without_port_is_rejected_by_both():
    # Before: the launcher told the workers MASTER_PORT=29500 while the handler bound 29400.
    with pytest.raises(LaunchConfigError, match="'127.0.0.1'.*needs the port"):
        _static_master(_static("127.0.0.1"))
    with pytest.raises(ValueError, match="'127.0.0.1'.*needs the port"):
        create_rdzv_handler(_static("127.0.0.1"))
