"""Built-in backend registrations (lazy: a backend's modules are imported only when a handler is created)."""

from __future__ import annotations

from .api import RendezvousHandler, RendezvousParameters, rendezvous_handler_registry


def _create_static_handler(params: RendezvousParameters) -> RendezvousHandler:
    from . import static_tcp_rendezvous

    return static_tcp_rendezvous.create_rdzv_handler(params)


def _create_c10d_handler(params: RendezvousParameters) -> RendezvousHandler:
    from . import dynamic_rendezvous
    from .c10d_rendezvous_backend import create_backend

    backend, store = create_backend(params)
    return dynamic_rendezvous.create_handler(store, backend, params)


def _register_default_handlers() -> None:
    rendezvous_handler_registry.register("static", _create_static_handler)
    rendezvous_handler_registry.register("c10d", _create_c10d_handler)


_register_default_handlers()
