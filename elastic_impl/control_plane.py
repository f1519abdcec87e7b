"""``worker_main``: the context manager a worker's main entry runs in, for the control plane.

While it is active, and ``TORCH_WORKER_SERVER_SOCKET`` names a Unix socket path, torch's worker server answers
HTTP on that socket (``/handler/`` lists handlers; ``POST /handler/ping`` answers ``pong``;
``dump_traceback`` and others serve debugging). Leaving the block shuts the server down. Without the variable
nothing is served. Creating it also initialises the error handler as :func:`~elastic_impl.multiprocessing.errors.record`
does, since it is wrapped by ``record``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from elastic_impl.multiprocessing.errors import record

__all__ = ["worker_main"]

TORCH_WORKER_SERVER_SOCKET = "TORCH_WORKER_SERVER_SOCKET"


@contextlib.contextmanager
def _serving(socket_path: str) -> Iterator[None]:
    # The server itself is a torch primitive (C++); only its lifetime is ours to manage.
    from torch._C._distributed_c10d import _WorkerServer

    server = _WorkerServer(socket_path)
    try:
        yield
    finally:
        server.shutdown()


@record
@contextlib.contextmanager
def worker_main() -> Iterator[None]:
    """Use as ``with worker_main(): ...`` or as a decorator ``@worker_main()`` on the worker's main function."""
    socket_path = os.environ.get(TORCH_WORKER_SERVER_SOCKET)
    with _serving(socket_path) if socket_path is not None else contextlib.nullcontext():
        yield
