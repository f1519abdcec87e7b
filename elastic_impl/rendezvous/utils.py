"""Helpers shared by the rendezvous backends: endpoint parsing, "is this host me?", config parsing."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["parse_rendezvous_endpoint", "matches_this_machine"]


def parse_rendezvous_endpoint(endpoint: str | None, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 as ``[addr]:port``) into host and port; an empty endpoint means localhost."""
    if endpoint is not None and not isinstance(endpoint, str):
        raise ValueError(f"rendezvous endpoint must be a string like host:port, got {endpoint!r}")
    text = (endpoint or "").strip()
    if not text:
        return "localhost", default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"rendezvous endpoint {endpoint!r} is not a valid [ipv6]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        host, port_text = text, ""  # bare IPv6 address
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"rendezvous endpoint {endpoint!r} has an empty host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"rendezvous endpoint {endpoint!r} has an invalid port {port_text!r} (allowed: 0-65535)")
    return host, int(port_text)


def matches_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, our hostname/FQDN, or one of our addresses)."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return False
    if addr.is_loopback:
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        local = set()
    return str(addr) in local


def positive_seconds(params, key: str, default: float) -> float:
    """Option ``key`` of ``params`` (a RendezvousParameters) in seconds within its bounds (see :mod:`.options`)."""
    from .options import option_seconds

    seconds = option_seconds(params, key, default)
    assert seconds is not None
    return seconds
