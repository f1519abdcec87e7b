"""``get_logger``: a logger named after the calling module, at level ``$LOGLEVEL`` (default WARNING)."""

from __future__ import annotations

import inspect
import logging
import os

from elastic_impl.utils.log_level import get_log_level

__all__ = ["get_logger"]


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (default: the caller's module name) with its level from ``LOGLEVEL``."""
    if name is None:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        name = caller.f_globals.get("__name__", "root") if caller is not None else "root"
        del frame, caller
    level = os.environ.get("LOGLEVEL", get_log_level()).upper()
    if not isinstance(logging.getLevelName(level), int):
        allowed = ["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET"]
        raise ValueError(f"invalid LOGLEVEL {os.environ.get('LOGLEVEL')!r}; allowed: {allowed}")
    logger = logging.getLogger(name)
    logger.setLevel(level)
    return logger
