"""Socket and c10d store helpers: free ports and TCPStore creation with bounded retries."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

from elastic_impl.utils.clock import REAL_CLOCK
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here
from elastic_impl.utils.store import barrier

__all__ = ["create_c10d_store", "get_free_port", "get_socket_with_port"]

logger = logging.getLogger(__name__)

_FULL_RANK_PREFIX = "_tcp_store/num_members"  # upstream's barrier key prefix, so mixed members count each other


def get_socket_with_port() -> socket.socket:
    """A listening socket bound to a free port (keep it open to reserve the port; close it before reuse)."""
    last_error: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE):
        sock = socket.socket(family, kind, proto)
        try:
            sock.bind((addr[0], 0))
            sock.listen(0)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
    raise RuntimeError(f"could not bind a free port on localhost: {last_error}")


def get_free_port() -> int:
    """A port that was free a moment ago (another process may still take it before you bind)."""
    sock = get_socket_with_port()
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def create_c10d_store(
    is_server: bool,
    server_addr: str,
    server_port: int = -1,
    world_size: int = 1,
    timeout: float = 600,
    wait_for_workers: bool = True,
    retries=3,
    use_libuv: bool | None = None,
):
    """Create a TCPStore; a server with ``server_port=-1`` picks a free port, retrying up to ``retries`` times."""
    from torch.distributed import TCPStore

    if server_port != -1 and not 0 <= server_port <= 65535:
        raise ValueError(f"server_port must be -1 (pick one) or 0-65535, got {server_port}")
    if server_port == -1 and world_size > 1:
        # the other members could not know a port the server picks; upstream's wording
        raise ValueError(
            f"server_port must be specified when world_size > 1, got server_port={server_port}, world_size={world_size}"
        )
    attempts = max(1, int(retries))
    last_error: Exception | None = None
    for attempt in range(attempts):
        port = get_free_port() if server_port == -1 else server_port
        try:
            kwargs = {} if use_libuv is None else {"use_libuv": use_libuv}
            store = TCPStore(
                host_name=server_addr,
                port=port,
                world_size=world_size,
                is_master=is_server,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=wait_for_workers,
                **kwargs,
            )
        except (RuntimeError, OSError) as e:
            last_error = e
            # Only a port we picked ourselves can have been raced; a fixed port will not free itself.
            if server_port != -1 or "ddress already in use" not in str(e):
                break
            logger.warning("port %s was taken before TCPStore bound it (attempt %s/%s)", port, attempt + 1, attempts)
            REAL_CLOCK.sleep(0.1)
            continue
        if wait_for_workers:
            # Every member, clients too, returns only once all world_size joined (as upstream, same store keys).
            try:
                barrier(store, world_size, key_prefix=_FULL_RANK_PREFIX, barrier_timeout=timeout)
            except RuntimeError as e:
                raise TimeoutError(f"timed out waiting for all {world_size} members to join: {e}") from e
        return store
    where = f"{server_addr}:{server_port}"
    first = str(last_error).strip().splitlines()[0] if last_error else "unknown error"
    message = f"could not create the c10d store ({'server' if is_server else 'client'}) at {where}: {first}"
    # Keep TCPStore's own error type (DistNetworkError, DistStoreError): callers of either implementation catch it.
    error_type = type(last_error) if isinstance(last_error, RuntimeError) else RuntimeError
    try:
        error = error_type(message)
    except Exception:  # noqa: BLE001 - a type that cannot take one message: the generic one
        error = RuntimeError(message)
    raise error from last_error
