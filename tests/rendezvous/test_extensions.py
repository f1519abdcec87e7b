"""The handler extensions the agent and the launcher use are declared protocols (rendezvous.extensions): our dynamic
handler offers every one with the declared signatures; upstream-shaped handlers (static, etcd v1) offer none, and
the launcher falls back to upstream's behaviour for them."""

from __future__ import annotations

import inspect

import pytest

from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry
from elastic_impl.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from elastic_impl.rendezvous.etcd_rendezvous import EtcdRendezvousHandler
from elastic_impl.rendezvous.extensions import (
    LeavingHandler,
    RestartCountingHandler,
    RoundReportingHandler,
    detection_window,
)
from elastic_impl.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from tests.launcher.conftest import free_port

METHOD_PROTOCOLS = (LeavingHandler, RoundReportingHandler, RestartCountingHandler)


def _declared_methods(protocol) -> list[str]:
    return [name for name, member in vars(protocol).items() if inspect.isfunction(member) and not name.startswith("_")]


@pytest.mark.parametrize("protocol", METHOD_PROTOCOLS, ids=lambda p: p.__name__)
def test_the_dynamic_handler_offers_each_extension_with_its_declared_signature(protocol):
    assert issubclass(DynamicRendezvousHandler, protocol)
    for name in _declared_methods(protocol):
        declared = list(inspect.signature(getattr(protocol, name)).parameters)
        offered = list(inspect.signature(getattr(DynamicRendezvousHandler, name)).parameters)
        assert offered == declared, (name, offered, declared)


@pytest.mark.parametrize("handler_class", [StaticTCPRendezvous, EtcdRendezvousHandler], ids=lambda c: c.__name__)
def test_upstream_shaped_handlers_offer_no_extension(handler_class):
    assert not any(issubclass(handler_class, protocol) for protocol in METHOD_PROTOCOLS)


def test_a_live_c10d_handler_reports_its_detection_window_and_the_static_one_none():
    params = RendezvousParameters("c10d", f"127.0.0.1:{free_port()}", "ext", 1, 1, keep_alive_interval="2",
                                  keep_alive_max_attempt="4")
    handler = rendezvous_handler_registry.create_handler(params)
    try:
        assert all(isinstance(handler, protocol) for protocol in METHOD_PROTOCOLS)
        assert detection_window(handler) == 8.0
    finally:
        handler.shutdown()
    static = StaticTCPRendezvous("127.0.0.1", free_port(), 0, 1, "ext", 5)
    assert detection_window(static) is None
    assert not isinstance(static, LeavingHandler)


class _NoLeave:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def shutdown(self) -> bool:
        self.calls.append("shutdown")
        return True


class _WithLeave(_NoLeave):
    def leave(self) -> bool:
        self.calls.append("leave")
        return True


@pytest.mark.parametrize("handler_class, close, expected", [
    (_WithLeave, False, ["leave"]),
    (_WithLeave, True, ["shutdown"]),
    (_NoLeave, False, ["shutdown"]),  # nothing finer to offer than upstream's shutdown
])
def test_the_launcher_leaves_through_the_protocol(handler_class, close, expected):
    from elastic_impl.launcher.api import _release_rendezvous

    handler = handler_class()
    _release_rendezvous(handler, close=close)
    assert handler.calls == expected
