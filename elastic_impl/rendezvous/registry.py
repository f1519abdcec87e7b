"""Built-in backend registrations (lazy: a backend's modules are imported only when a handler is created)."""

from __future__ import annotations

import logging

from .api import RendezvousHandler, RendezvousParameters, rendezvous_handler_registry


def _create_static_handler(params: RendezvousParameters) -> RendezvousHandler:
    from . import static_tcp_rendezvous

    return static_tcp_rendezvous.create_rdzv_handler(params)


def _create_c10d_handler(params: RendezvousParameters) -> RendezvousHandler:
    from . import dynamic_rendezvous
    from .c10d_rendezvous_backend import create_backend

    backend, store = create_backend(params)
    return dynamic_rendezvous.create_handler(store, backend, params)


# Backends whose modules live elsewhere in this package (the etcd ones): importing the module registers the real
# creator, replacing the placeholder. Modules are tried in order.
_LAZY_MODULES = {
    "etcd": ("etcd_rendezvous",),
    "etcd-v2": ("etcd_rendezvous_backend",),
    "etcd-v3": ("etcd_v3_rendezvous_backend", "etcd_rendezvous_backend"),
}


def _placeholder(backend: str):
    def create(params: RendezvousParameters) -> RendezvousHandler:
        import importlib

        tried = []
        for module in _LAZY_MODULES[backend]:
            name = f"{__package__}.{module}"
            tried.append(name)
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name != name:
                    raise ValueError(f"rendezvous backend {backend!r} needs the package {e.name!r}, which is not installed") from None
                continue
            creator = rendezvous_handler_registry._registry.get(backend)
            if creator is not None and not getattr(creator, "is_placeholder", False):
                return creator(params)
        raise ValueError(f"rendezvous backend {backend!r} is not available (no module registered it; tried {', '.join(tried)})")

    create.is_placeholder = True  # type: ignore[attr-defined]
    return create


def _register_default_handlers() -> None:
    rendezvous_handler_registry.register("static", _create_static_handler)
    rendezvous_handler_registry.register("c10d", _create_c10d_handler)
    for backend in _LAZY_MODULES:
        if backend not in rendezvous_handler_registry._registry:
            rendezvous_handler_registry.register(backend, _placeholder(backend))


_register_default_handlers()

# Upstream's public names in this module.
log = logging.getLogger(__name__)
handler_registry = rendezvous_handler_registry


def get_rendezvous_handler(params: RendezvousParameters) -> RendezvousHandler:
    """A handler for ``params.backend``, made by the creator registered under that name."""
    return handler_registry.create_handler(params)


def __getattr__(name: str):
    # ``create_handler`` (dynamic_rendezvous's) is exposed here as upstream does, but resolved on first use so that
    # importing the package keeps not importing the dynamic rendezvous until a handler is created.
    if name == "create_handler":
        from .dynamic_rendezvous import create_handler

        return create_handler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
