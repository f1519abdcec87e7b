"""Logging handlers per event destination name."""

from __future__ import annotations

import logging

_log_handlers: dict[str, logging.Handler] = {
    "console": logging.StreamHandler(),
    "dynamic_rendezvous": logging.NullHandler(),
    "null": logging.NullHandler(),
}


def known_destinations() -> list[str]:
    """The event destinations :func:`get_logging_handler` knows, sorted."""
    return sorted(_log_handlers)


def get_logging_handler(destination: str = "null") -> logging.Handler:
    """The handler events for ``destination`` are written to (``console``, ``dynamic_rendezvous`` or ``null``)."""
    try:
        return _log_handlers[destination]
    except (KeyError, TypeError):
        # KeyError as upstream (code may catch it), with a message naming the allowed destinations
        raise KeyError(f"unknown event destination {destination!r}; allowed: {known_destinations()}") from None
