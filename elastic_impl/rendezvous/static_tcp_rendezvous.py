"""The ``static`` backend: a fixed world (rank and world size given up front), one TCPStore hosted by rank 0."""

from __future__ import annotations

import logging
from datetime import timedelta

from .api import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from .utils import parse_rendezvous_endpoint

__all__ = ["StaticTCPRendezvous", "create_rdzv_handler"]

logger = logging.getLogger(__name__)

_DEFAULT_TIMEOUT = 60


class StaticTCPRendezvous(RendezvousHandler):
    """Every node knows its rank; ``next_rendezvous`` only connects to (rank 0: hosts) the store. One round only."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, run_id: str, timeout: int):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"static rendezvous world_size must be an integer >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"static rendezvous rank must be in 0..{world_size - 1}, got {rank!r}")
        self.master_addr = master_addr
        self.master_port = master_port
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.timeout = timedelta(seconds=timeout)
        self._store = None
        self._closed = False

    def get_backend(self) -> str:
        return "static"

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        from torch.distributed import PrefixStore, TCPStore

        if self._store is None:
            try:
                self._store = TCPStore(
                    self.master_addr,
                    self.master_port,
                    self.world_size,
                    self.rank == 0,
                    self.timeout,
                    multi_tenant=True,
                )
            except (RuntimeError, OSError) as e:
                raise RendezvousConnectionError(
                    f"static rendezvous cannot {'host' if self.rank == 0 else 'reach'} the TCPStore at "
                    f"{self.master_addr}:{self.master_port}: {str(e).strip().splitlines()[0]}"
                ) from None
        store = PrefixStore(self.run_id, self._store)
        info = RendezvousStoreInfo(self.master_addr, self.master_port)
        return RendezvousInfo(store, self.rank, self.world_size, info)

    def is_closed(self):
        return self._closed

    def set_closed(self):
        self._closed = True

    def num_nodes_waiting(self):
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def static_master(endpoint: str) -> tuple[str, int]:
    """The master's (host, port) from a static endpoint; the launcher tells workers the same address the handler
    binds. The port is required (there is no default to disagree on), as upstream."""
    if not endpoint or not endpoint.strip():
        raise ValueError("static rendezvous needs an endpoint host:port (the address of rank 0)")
    host, port = parse_rendezvous_endpoint(endpoint, None)
    if port is None:
        raise ValueError(f"bad static rendezvous endpoint {endpoint!r}: the static backend needs the port of rank 0 "
                         "(host:port or [ipv6-address]:port; torchrun's --master-port)")
    return host, port


def create_rdzv_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Options: ``rank`` (required), ``timeout`` (seconds, default 60); world size = ``max_nodes`` (must equal min)."""
    host, port = static_master(params.endpoint)
    if params.min_nodes != params.max_nodes:
        raise ValueError(
            f"static rendezvous needs min_nodes == max_nodes, got {params.min_nodes}:{params.max_nodes}"
        )
    rank = params.get_as_int("rank")
    if rank is None:
        raise ValueError("static rendezvous needs the option rank=<0..max_nodes-1>")
    timeout = params.get_as_int("timeout", _DEFAULT_TIMEOUT)
    if timeout is None or timeout <= 0:
        raise ValueError(f"static rendezvous option timeout={timeout!r} must be a positive number of seconds")
    return StaticTCPRendezvous(host, port, rank, params.max_nodes, params.run_id, timeout)
