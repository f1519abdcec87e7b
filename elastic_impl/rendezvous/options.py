"""Rendezvous options (``--rdzv-conf`` / ``RendezvousParameters.config``): one place for their spellings, defaults,
bounds and parsing, so every backend reads an option the same way and bad values fail the same way.

A bad value is one ``ValueError`` line naming the option as the user spelt it and the allowed range. Bounds are
what the runtime can honour: a timeout must be a finite number of seconds (``inf`` overflowed TCPStore's
millisecond timeout, ``nan`` compared false with everything and slipped past ``> 0`` checks), and a heartbeat
shorter than 10 ms would be blamed on the store as "no answer within 0.0 s".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, overload

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_JOIN_TIMEOUT",
    "DEFAULT_KEEP_ALIVE_INTERVAL",
    "DEFAULT_KEEP_ALIVE_MAX_ATTEMPT",
    "DEFAULT_LAST_CALL_TIMEOUT",
    "MAX_SECONDS",
    "RDZV_CONF_ALIASES",
    "RendezvousOptions",
    "canonical_option",
    "canonical_rdzv_configs",
    "check_handler_run_id",
    "check_run_id",
    "keep_alive_options",
    "node_count_problem",
    "option_int",
    "option_label",
    "option_seconds",
    "seconds_value",
    "timeout_seconds",
]

# Our spellings of torchrun's keep-alive options (accepted by the CLI and by LaunchConfig.rdzv_configs).
RDZV_CONF_ALIASES = {"heartbeat": "keep_alive_interval", "missed_heartbeats": "keep_alive_max_attempt"}
_ALIAS_OF = {canonical: alias for alias, canonical in RDZV_CONF_ALIASES.items()}

# The dynamic rendezvous' defaults (upstream's): every backend and the handler take them from here.
DEFAULT_JOIN_TIMEOUT = 600.0  # seconds a node waits for its round to complete
DEFAULT_LAST_CALL_TIMEOUT = 30.0  # seconds a round with min_nodes waits for more
DEFAULT_CLOSE_TIMEOUT = 30.0  # seconds closing or leaving may take
DEFAULT_KEEP_ALIVE_INTERVAL = 5.0  # seconds between heartbeats
DEFAULT_KEEP_ALIVE_MAX_ATTEMPT = 3  # heartbeats missed before a node counts as dead
DEFAULT_READ_TIMEOUT = 60.0  # seconds a store call may block (upstream's default)

MAX_SECONDS = 30 * 24 * 3600.0  # 30 days: longer than any rendezvous wait anyone meant, far from any overflow
_MIN_SECONDS = {"keep_alive_interval": 0.01, "heartbeat_timeout": 0.01}  # options with a floor above "positive"
_INT_BOUNDS = {"keep_alive_max_attempt": (1, 1000)}


def canonical_option(key: str) -> str:
    return RDZV_CONF_ALIASES.get(key, key)


def canonical_rdzv_configs(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """The options under their canonical names (``heartbeat`` -> ``keep_alive_interval``, ...), from a mapping or
    from ``(key, value)`` pairs in the order given (the CLI's text, where a key may repeat). An option given twice,
    under either spelling, is a one-line ValueError naming it."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out: dict[str, Any] = {}
    for key, value in pairs:
        canonical = canonical_option(key)
        if canonical in out:
            spellings = "; ".join(f"{alias} = {name}" for alias, name in RDZV_CONF_ALIASES.items())
            raise ValueError(f"rendezvous option {canonical!r} is given twice (as {key!r}; aliases: {spellings})")
        out[canonical] = value
    return out


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


# A RendezvousTimeout / RendezvousSettings argument and the option that sets it from --rdzv-conf (same bounds).
_OPTION_OF_ARGUMENT = {
    "join": "join_timeout",
    "last_call": "last_call_timeout",
    "close": "close_timeout",
    "heartbeat": "heartbeat_timeout",
    "keep_alive_interval": "keep_alive_interval",
}


def timeout_seconds(name: str, value: Any, default: float) -> float:
    """An API timeout argument (``RendezvousTimeout(join=...)``, ``RendezvousSettings.keep_alive_interval``) in
    seconds: a timedelta or a number (text is for ``--rdzv-conf`` only), ``default`` when None, within the same
    bounds as the option that sets it (``heartbeat`` has ``keep_alive_interval``'s 10 ms floor)."""
    if value is None:
        return default
    if isinstance(value, str):
        raise ValueError(f"rendezvous {name} timeout must be a timedelta or seconds, got {value!r}")
    if isinstance(value, timedelta) and value <= timedelta(0):
        raise ValueError(f"The {name} timeout ({value}) must be positive.")  # upstream's words (its tests match them)
    minimum = _MIN_SECONDS.get(_OPTION_OF_ARGUMENT.get(name, name), 0.0)
    return seconds_value(f"rendezvous {name} timeout", value, minimum=minimum)


@overload
def option_seconds(params, key: str, default: float) -> float: ...
@overload
def option_seconds(params, key: str, default: None) -> float | None: ...
def option_seconds(params, key: str, default: float | None) -> float | None:
    """Option ``key`` of ``params`` (a RendezvousParameters, or a mapping of options) in seconds, within its
    bounds; ``default`` if unset."""
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
    return interval, option_int(params, "keep_alive_max_attempt", DEFAULT_KEEP_ALIVE_MAX_ATTEMPT)


def check_run_id(run_id: Any) -> str:
    """``run_id`` if it is a non-empty string; else a one-line ValueError naming it."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"rendezvous run_id must be a non-empty string, got {run_id!r}")
    return run_id


def check_handler_run_id(run_id: Any) -> str:
    """:func:`check_run_id` for the dynamic handler and the backends: an empty or missing run id gets upstream's
    words there (its handler and backends raise them; code and tests written against upstream match them)."""
    if run_id is None or run_id == "":
        raise ValueError("The run id must be a non-empty string.")
    return check_run_id(run_id)


def node_count_problem(min_nodes: int, max_nodes: int) -> tuple[str, str] | None:
    """None if ``1 <= min_nodes <= max_nodes``; else (the bad argument's name, a one-line message naming its value
    and the bound, in upstream's wording). Callers raise it as their own error type."""
    if min_nodes < 1:
        return "min_nodes", f"The minimum number of rendezvous nodes ({min_nodes}) must be greater than zero."
    if max_nodes < min_nodes:
        return "max_nodes", (
            f"The maximum number of rendezvous nodes ({max_nodes}) must be greater than or equal to the minimum "
            f"number of rendezvous nodes ({min_nodes})."
        )
    return None


# Options any backend reads as seconds / as a bounded integer: checked when the options are built, before anything
# starts (a store, a connection), whichever backend reads them later.
SECONDS_OPTIONS = frozenset({
    "join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "keep_alive_interval", "read_timeout",
    "connect_timeout", "store_liveness_timeout", "timeout",
})
INT_OPTIONS = frozenset(_INT_BOUNDS)


@dataclass(frozen=True)
class RendezvousOptions:
    """A node's rendezvous options, parsed and checked once where they enter (``launch_agent``, for the CLI and the
    API alike): canonical option names, numbers as numbers, the endpoint split into its members.

    ``config`` keeps every option under its canonical name (backends read their own ones from it); every time and
    count option any backend reads is checked here. :meth:`parameters` is what the handler registry takes.
    """

    backend: str
    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    local_addr: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    # (host, port or None) of each member of ``endpoint`` (``h1:p1,h2:p2`` names an etcd cluster); () when empty.
    endpoints: tuple[tuple[str, int | None], ...] = ()
    # The time options that were given, in seconds (their text stays in ``config``: each backend parses it with
    # the same parser, so it reads the same number).
    seconds: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        backend: str,
        endpoint: str | None,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        config: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    ) -> RendezvousOptions:
        """Check and normalize; the first bad value raises a one-line ValueError naming it and what is allowed."""
        from .utils import parse_rendezvous_endpoint

        if not isinstance(backend, str) or not backend.strip():
            raise ValueError(f"rendezvous backend must be a backend name such as c10d, etcd or static, got {backend!r}")
        check_run_id(run_id)
        problem = node_count_problem(min_nodes, max_nodes)
        if problem:
            raise ValueError(problem[1])
        options = canonical_rdzv_configs(config)
        seconds = {key: option_seconds(options, key, 0.0) for key in sorted(SECONDS_OPTIONS & options.keys())}
        for key in sorted(INT_OPTIONS & options.keys()):
            option_int(options, key, 0)
        text = (endpoint or "").strip()
        members = text.split(",") if text else []
        if any(not member.strip() for member in members):
            raise ValueError(f"rendezvous endpoint {endpoint!r} has an empty member (expected host[:port][,host[:port]...])")
        endpoints = tuple(parse_rendezvous_endpoint(member, None) for member in members)
        return cls(backend, text, run_id, min_nodes, max_nodes, local_addr, options, endpoints, seconds)

    def parameters(self):
        """These options as the ``RendezvousParameters`` a handler is created from."""
        from .api import RendezvousParameters

        return RendezvousParameters(
            backend=self.backend,
            endpoint=self.endpoint,
            run_id=self.run_id,
            min_nodes=self.min_nodes,
            max_nodes=self.max_nodes,
            local_addr=self.local_addr,
            **self.config,
        )


def store_liveness_timeout(params) -> float:
    """How long a rendezvous store call may go unanswered before the store host counts as gone.

    Option ``store_liveness_timeout`` (seconds); default: the heartbeat expiry, ``keep_alive_interval`` (5 s) x
    ``keep_alive_max_attempt`` (3) = 15 s, never more than ``read_timeout``. A peer silent that long is evicted;
    the store host gets the same bound instead of the 60 s read timeout. A joining node rides out a store that
    does not answer for as long (see DynamicRendezvousHandler).
    """
    read_timeout = option_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT)
    interval, max_attempt = keep_alive_options(params)
    if params.get("store_liveness_timeout") is not None:
        return option_seconds(params, "store_liveness_timeout", interval * max_attempt)
    return default_store_liveness_timeout(interval, max_attempt, read_timeout)


def default_store_liveness_timeout(keep_alive_interval: float, keep_alive_max_attempt: int,
                                   read_timeout: float = DEFAULT_READ_TIMEOUT) -> float:
    """``store_liveness_timeout`` when the option is not given: the heartbeat expiry, at most ``read_timeout``
    (the virtual-time simulator, which has no options, takes its bound from here too)."""
    return min(keep_alive_interval * keep_alive_max_attempt, read_timeout)
