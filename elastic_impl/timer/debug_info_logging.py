"""``log_debug_info_for_expired_timers``: the hook a timer server calls with the timers it found expired.

It logs them at INFO on this module's logger (silent at the default ``LOGLEVEL`` of WARNING); an empty mapping
logs nothing. Deployments replace or wrap it to collect more (stack dumps, metrics) before the workers are killed.
"""

from __future__ import annotations

from elastic_impl.utils.logging import get_logger

__all__ = ["log_debug_info_for_expired_timers"]

logger = get_logger(__name__)


def log_debug_info_for_expired_timers(run_id: str, expired_timers: dict[int, list[str]]) -> None:
    """``expired_timers``: worker pid -> the scope ids of its expired timers."""
    if expired_timers:
        logger.info("Timers expired for run:[%s] [%s].", run_id, expired_timers)
