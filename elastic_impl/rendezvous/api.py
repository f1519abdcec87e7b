"""Public rendezvous API: parameters, handler interface, results, errors and the handler registry.

Names and signatures follow ``torch.distributed.elastic.rendezvous.api`` so user code ports by changing the import.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from elastic_impl.utils.distributed import get_free_port  # noqa: F401 -- upstream exposes it here

from .options import check_run_id, node_count_problem

__all__ = [
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousHandler",
    "RendezvousHandlerRegistry",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousStateError",
    "RendezvousStoreInfo",
    "RendezvousTimeoutError",
    "rendezvous_handler_registry",
]


class RendezvousError(Exception):
    """Base class of every rendezvous error."""


class RendezvousClosedError(RendezvousError):
    """The rendezvous run was closed; no further rounds will form."""


class RendezvousTimeoutError(RendezvousError):
    """A rendezvous round did not complete within its join timeout."""


class RendezvousConnectionError(RendezvousError):
    """The rendezvous backend (store, etcd) could not be reached or failed mid-operation."""


class RendezvousStateError(RendezvousError):
    """The rendezvous state in the backend is corrupt or unreadable."""


class RendezvousGracefulExitError(RendezvousError):
    """This node is not needed (or was shut down) and should exit without error."""


@dataclass
class RendezvousStoreInfo:
    """Where the bootstrap store of a round lives (rank 0's address and a port on it)."""

    MASTER_ADDR_KEY: ClassVar[str] = "MASTER_ADDR"
    MASTER_PORT_KEY: ClassVar[str] = "MASTER_PORT"
    master_addr: str
    master_port: int

    @staticmethod
    def build(rank: int, store, local_addr: str | None, server_port: int | None = None) -> RendezvousStoreInfo:
        """Rank 0 publishes its address and a port through ``store``; every other rank reads them (blocking get)."""
        if rank == 0:
            addr = local_addr or socket.getfqdn()
            port = server_port or _free_port()  # 0, like None, means "pick a free port" (as upstream)
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, addr.encode())
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(port).encode())
            return RendezvousStoreInfo(addr, port)
        addr = store.get(RendezvousStoreInfo.MASTER_ADDR_KEY).decode()
        port = int(store.get(RendezvousStoreInfo.MASTER_PORT_KEY).decode())
        return RendezvousStoreInfo(addr, port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RendezvousInfo:
    """What a completed rendezvous gives a node: the round's store, its rank, the world size, bootstrap info."""

    def __init__(self, store, rank: int, world_size: int, bootstrap_store_info: RendezvousStoreInfo | None):
        self._store = store
        self._rank = rank
        self._world_size = world_size
        self._bootstrap_store_info = bootstrap_store_info

    @property
    def store(self):
        return self._store

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def bootstrap_store_info(self) -> RendezvousStoreInfo | None:
        return self._bootstrap_store_info

    def __repr__(self) -> str:
        return f"RendezvousInfo(rank={self._rank}, world_size={self._world_size})"


class RendezvousHandler(ABC):
    """The interface an elastic agent uses to form groups of nodes."""

    @abstractmethod
    def get_backend(self) -> str:
        """Name of the rendezvous backend (``c10d``, ``etcd``, ``static``...)."""

    @property
    def use_agent_store(self) -> bool:
        """Whether the store returned by ``next_rendezvous`` may be shared with the agent and its workers."""
        return False

    @abstractmethod
    def next_rendezvous(self) -> RendezvousInfo:
        """Block until this node is part of a completed round; return its :class:`RendezvousInfo`."""

    @abstractmethod
    def is_closed(self) -> bool:
        """Whether the run was closed (no further rounds)."""

    @abstractmethod
    def set_closed(self):
        """Close the run for every node."""

    @abstractmethod
    def num_nodes_waiting(self) -> int:
        """Nodes waiting to be admitted; > 0 tells agents to re-rendezvous."""

    @abstractmethod
    def get_run_id(self) -> str:
        """The run id of this rendezvous."""

    @abstractmethod
    def shutdown(self) -> bool:
        """Release this handler's resources; return whether that succeeded.

        The dynamic handler also closes the run for every node, as upstream's does (case
        rdzv_shutdown_without_a_round); a node that only goes away calls its ``leave()`` extension instead.
        """


# The messages of RendezvousParameters and RendezvousHandlerRegistry are upstream's, word for word: code and tests
# written against upstream match on them.
_EMPTY_BACKEND = "The rendezvous backend name must be a non-empty string."


def _require_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"rendezvous {name} must be a non-empty string, got {value!r}")
    return value


def _require_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"rendezvous {name} must be an integer, got {value!r}")
    return value


def unread_options(params: RendezvousParameters) -> list[str]:
    """Options set in ``params`` that nothing has asked for (through ``get``/``get_as_*``) so far."""
    asked = getattr(params, "_asked", None)
    return [] if asked is None else sorted(set(params.config) - asked)


class RendezvousParameters:
    """Everything needed to construct a rendezvous handler; backend-specific options go in ``**kwargs``."""

    def __init__(
        self,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        **kwargs,
    ):
        if not backend:
            raise ValueError(_EMPTY_BACKEND)
        self.backend = _require_text("backend", backend)
        self.run_id = check_run_id(run_id)
        if endpoint is not None and not isinstance(endpoint, str):
            raise ValueError(f"rendezvous endpoint must be a string like host:port, got {endpoint!r}")
        self.endpoint = endpoint or ""
        min_nodes = _require_int("min_nodes", min_nodes)
        max_nodes = _require_int("max_nodes", max_nodes)
        problem = node_count_problem(min_nodes, max_nodes)
        if problem:
            raise ValueError(problem[1])
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.local_addr = local_addr
        self.config = kwargs
        # Option names a handler asked for: the launcher warns about given options no handler asked for (typos).
        self._asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """The backend option ``key``, or ``default`` when it is not set."""
        self._asked.add(key)
        return self.config.get(key, default)

    def get_as_bool(self, key: str, default: bool | None = None) -> bool | None:
        """The option ``key`` as a bool (accepts 1/0, true/false, t/f, yes/no, y/n, case-insensitive, as upstream)."""
        value = self.get(key, default)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            text = value.lower()
            if text in ("1", "true", "t", "yes", "y"):
                return True
            if text in ("0", "false", "f", "no", "n"):
                return False
        raise ValueError(f"The rendezvous configuration option '{key}' does not represent a valid boolean value.")

    def get_as_int(self, key: str, default: int | None = None) -> int | None:
        """The option ``key`` as an int."""
        value = self.get(key, default)
        if value is None:
            return value
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"The rendezvous configuration option '{key}' does not represent a valid integer value."
            ) from None

    def __repr__(self) -> str:
        return (
            f"RendezvousParameters(backend={self.backend!r}, endpoint={self.endpoint!r}, run_id={self.run_id!r}, "
            f"min_nodes={self.min_nodes}, max_nodes={self.max_nodes}, local_addr={self.local_addr!r}, "
            f"config={self.config!r})"
        )


RendezvousHandlerCreator = Callable[[RendezvousParameters], RendezvousHandler]

# Third-party packages register backends under this entry-point group: name = backend, value = creator callable.
ENTRY_POINT_GROUP = "elastic_impl.rendezvous"


class RendezvousHandlerRegistry:
    """Maps backend names to handler creators."""

    def __init__(self) -> None:
        self._registry: dict[str, RendezvousHandlerCreator] = {}
        self._entry_points_loaded = False

    def register(self, backend: str, creator: RendezvousHandlerCreator) -> None:
        """Register ``creator`` for ``backend``; re-registering the same creator is a no-op, a different one errors."""
        if not backend:
            raise ValueError(_EMPTY_BACKEND)
        current = self._registry.get(backend)
        # A built-in lazy placeholder (see registry.py) gives way to the real creator its module registers.
        if current is not None and current != creator and not getattr(current, "is_placeholder", False):
            raise ValueError(
                f"The rendezvous backend '{backend}' cannot be registered with '{creator}' as it is already "
                f"registered with '{current}'."
            )
        self._registry[backend] = creator

    def names(self) -> list[str]:
        """Registered backend names (after loading entry points)."""
        self._load_entry_points()
        return sorted(self._registry)

    def create_handler(self, params: RendezvousParameters) -> RendezvousHandler:
        """Create the handler for ``params.backend``; unknown backends raise a ValueError listing the known ones."""
        self._load_entry_points()
        creator = self._registry.get(params.backend)
        if creator is None:
            # upstream's wording (its tests match it); the launcher adds the registered names
            raise ValueError(
                f"The rendezvous backend '{params.backend}' is not registered. Did you forget to call `register`?"
            )
        handler = creator(params)
        if handler.get_backend() != params.backend:
            raise RuntimeError(
                f"The rendezvous backend '{handler.get_backend()}' does not match the requested backend "
                f"'{params.backend}'."
            )
        return handler

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._registry:
                continue
            # Loaded lazily: a broken plugin must not stop the built-in backends from working.
            self._registry[ep.name] = _lazy_entry_point_creator(ep)


def _lazy_entry_point_creator(ep) -> RendezvousHandlerCreator:
    def create(params: RendezvousParameters) -> RendezvousHandler:
        return ep.load()(params)

    return create


rendezvous_handler_registry = RendezvousHandlerRegistry()
"""The process-wide registry; built-in backends are registered by ``elastic_impl.rendezvous.registry``."""
