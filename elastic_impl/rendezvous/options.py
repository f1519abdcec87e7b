"""Rendezvous options (``--rdzv-conf`` / ``RendezvousParameters.config``): one place for their spellings, defaults,
bounds and parsing, so every backend reads an option the same way and bad values fail the same way.

A bad value is one ``ValueError`` line naming the option as the user spelt it and the allowed range. Bounds are
what the runtime can honour: a timeout must be a finite number of seconds (``inf`` overflowed TCPStore's
millisecond timeout, ``nan`` compared false with everything and slipped past ``> 0`` checks), and a heartbeat
shorter than 10 ms would be blamed on the store as "no answer within 0.0 s".
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

__all__ = [
    "DEFAULT_KEEP_ALIVE_INTERVAL",
    "DEFAULT_KEEP_ALIVE_MAX_ATTEMPT",
    "MAX_SECONDS",
    "RDZV_CONF_ALIASES",
    "canonical_option",
    "keep_alive_options",
    "option_int",
    "option_label",
    "option_seconds",
    "seconds_value",
]

# Our spellings of torchrun's keep-alive options (accepted by the CLI and by LaunchConfig.rdzv_configs).
RDZV_CONF_ALIASES = {"heartbeat": "keep_alive_interval", "missed_heartbeats": "keep_alive_max_attempt"}
_ALIAS_OF = {canonical: alias for alias, canonical in RDZV_CONF_ALIASES.items()}

DEFAULT_KEEP_ALIVE_INTERVAL = 5.0  # seconds between heartbeats (upstream's default)
DEFAULT_KEEP_ALIVE_MAX_ATTEMPT = 3  # heartbeats missed before a node counts as dead (upstream's default)

MAX_SECONDS = 30 * 24 * 3600.0  # 30 days: longer than any rendezvous wait anyone meant, far from any overflow
_MIN_SECONDS = {"keep_alive_interval": 0.01}  # options with a floor above "positive"
_INT_BOUNDS = {"keep_alive_max_attempt": (1, 1000)}


def canonical_option(key: str) -> str:
    return RDZV_CONF_ALIASES.get(key, key)


def option_label(key: str) -> str:
    """The option as the user may have spelt it: ``heartbeat (keep_alive_interval)``."""
    alias = _ALIAS_OF.get(key)
    return f"{alias} ({key})" if alias else key


def _number_text(x: float) -> str:
    return f"{x:.10g}"


def seconds_value(what: str, value: Any, minimum: float = 0.0, maximum: float = MAX_SECONDS) -> float:
    """``value`` (a timedelta, a number or a numeric string) as seconds in ``(minimum, maximum]`` — ``minimum``
    itself is allowed when it is above 0. Raises a one-line ValueError naming ``what``."""
    lower = f"{_number_text(minimum)} <=" if minimum > 0 else "0 <"
    allowed = f"allowed: a number of seconds with {lower} seconds <= {_number_text(maximum)}"
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is not a number of seconds ({allowed})")
    else:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}={value!r} is not a number of seconds ({allowed})") from None
    if not math.isfinite(seconds) or seconds > maximum or seconds < minimum or seconds <= 0:
        raise ValueError(f"{what}={value!r} is out of range ({allowed})")
    return seconds


def option_seconds(params, key: str, default: float | None) -> float | None:
    """Option ``key`` of ``params`` (a RendezvousParameters) in seconds, within its bounds; ``default`` if unset."""
    value = params.get(key)
    if value is None:
        return default
    return seconds_value(f"rendezvous option {option_label(key)}", value, minimum=_MIN_SECONDS.get(key, 0.0))


def option_int(params, key: str, default: int) -> int:
    """Option ``key`` of ``params`` as an int within its bounds; ``default`` if unset."""
    value = params.get(key)
    if value is None:
        return default
    low, high = _INT_BOUNDS.get(key, (0, 2**31 - 1))
    allowed = f"allowed: an integer with {low} <= value <= {high}"
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None:
        raise ValueError(f"rendezvous option {option_label(key)}={value!r} is not an integer ({allowed})")
    if not low <= number <= high:
        raise ValueError(f"rendezvous option {option_label(key)}={value!r} is out of range ({allowed})")
    return number


def keep_alive_options(params) -> tuple[float, int]:
    """(heartbeat interval in seconds, heartbeats missed before a node counts as dead), validated."""
    interval = option_seconds(params, "keep_alive_interval", DEFAULT_KEEP_ALIVE_INTERVAL)
    assert interval is not None
    return interval, option_int(params, "keep_alive_max_attempt", DEFAULT_KEEP_ALIVE_MAX_ATTEMPT)
