"""Logging handlers per event destination name."""

from __future__ import annotations

import logging

_log_handlers: dict[str, logging.Handler] = {
    "console": logging.StreamHandler(),
    "dynamic_rendezvous": logging.NullHandler(),
    "null": logging.NullHandler(),
}


def get_logging_handler(destination: str = "null") -> logging.Handler:
    """The handler events for ``destination`` are written to (``console``, ``dynamic_rendezvous`` or ``null``)."""
    try:
        return _log_handlers[destination]
    except (KeyError, TypeError):
        # KeyError as upstream (code may catch it), with a message naming the allowed destinations
        raise KeyError(f"unknown event destination {destination!r}; allowed: {sorted(_log_handlers)}") from None
