"""Small helpers: required env variables, a free loopback port, and launcher argument macros."""

from __future__ import annotations

import os
import socket
from string import Template
from typing import Any

__all__ = ["get_env_variable_or_raise", "get_socket_with_port", "macros"]


def get_env_variable_or_raise(env_name: str) -> str:
    """The value of ``env_name``; ValueError naming it when unset."""
    value = os.environ.get(env_name)
    if value is None:
        raise ValueError(f"environment variable {env_name} expected, but not set")
    return value


def get_socket_with_port() -> socket.socket:
    """A listening socket on a free localhost port (the caller closes it once it has read the port)."""
    last_error: OSError | None = None
    for family, type_, proto, _, addr in socket.getaddrinfo(
        "localhost", 0, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        sock = socket.socket(family, type_, proto)
        try:
            sock.bind(addr)
            sock.listen(0)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
    raise RuntimeError(f"could not bind a free port on localhost: {last_error}")


class macros:  # noqa: N801 -- upstream's public name
    """Placeholders substituted in worker arguments by the agent."""

    local_rank = "${local_rank}"

    @staticmethod
    def substitute(args: list[Any], local_rank: str) -> list[str]:
        """``args`` with ``${local_rank}`` replaced in every string; other values are passed through."""
        return [Template(a).safe_substitute(local_rank=local_rank) if isinstance(a, str) else a for a in args]
