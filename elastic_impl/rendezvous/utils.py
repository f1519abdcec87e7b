"""Helpers shared by the rendezvous backends: endpoint parsing and "is this host me?" (options: see .options)."""

from __future__ import annotations

import ipaddress
import re
import socket

__all__ = ["parse_rendezvous_endpoint", "matches_this_machine"]


_ENDPOINT_FORMS = "expected host[:port] or [ipv6-address][:port] with a port in 0..65535"
_HOSTNAME = re.compile(r"[\w.-]+")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_rendezvous_endpoint(endpoint: str | None, default_port: int | None) -> tuple[str, int | None]:
    """Split ``host[:port]`` or ``[ipv6-address][:port]`` into host and port (``default_port`` when it has none).

    The one endpoint parser: the launcher and every backend use it, so they accept the same endpoints and agree on
    the port. An empty endpoint is localhost; a bare IPv6 address (``fe80::1``) is a host without a port, since its
    last group cannot be told from a port -- a port after an IPv6 address needs brackets. Anything else is a
    one-line ValueError naming the endpoint and the accepted forms.
    """
    if endpoint is not None and not isinstance(endpoint, str):
        raise ValueError(f"bad rendezvous endpoint {endpoint!r}: {_ENDPOINT_FORMS}")
    text = (endpoint or "").strip()
    if not text:
        return "localhost", default_port
    port_text: str | None = None
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not _is_ip_address(host) or (rest and not rest.startswith(":")):
            raise ValueError(f"bad rendezvous endpoint {endpoint!r}: {_ENDPOINT_FORMS}")
        if rest:
            port_text = rest[1:]
    elif text.count(":") > 1:
        if not _is_ip_address(text):
            raise ValueError(f"bad rendezvous endpoint {endpoint!r}: {_ENDPOINT_FORMS}")
        host = text
    else:
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad rendezvous endpoint {endpoint!r}: {_ENDPOINT_FORMS}")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bad rendezvous endpoint {endpoint!r}: {_ENDPOINT_FORMS}")
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
