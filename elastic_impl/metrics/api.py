"""Metrics: named integer values published to a per-group handler."""

from __future__ import annotations

import abc
import functools
import sys
import time
import warnings
from typing import NamedTuple

__all__ = [
    "MetricData",
    "MetricHandler",
    "ConsoleMetricHandler",
    "StdoutMetricHandler",
    "NullMetricHandler",
    "MetricStream",
    "MetricsConfig",
    "configure",
    "getStream",
    "prof",
    "profile",
    "put_metric",
    "publish_metric",
    "get_elapsed_time_ms",
]


class MetricData(NamedTuple):
    """One published value: when (epoch seconds), which group, which metric, what value."""

    timestamp: float
    group_name: str
    name: str
    value: int


class MetricsConfig:
    """Free-form configuration for a metrics backend (string key/values)."""

    __slots__ = ["params"]

    def __init__(self, params: dict[str, str] | None = None):
        self.params = params if params is not None else {}


class MetricHandler(abc.ABC):
    """Receives every metric published to the groups it is configured for."""

    @abc.abstractmethod
    def emit(self, metric_data: MetricData):
        pass


class ConsoleMetricHandler(MetricHandler):
    """Prints ``[timestamp][group]: name=value`` lines to stdout."""

    def emit(self, metric_data: MetricData):
        print(
            f"[{metric_data.timestamp}][{metric_data.group_name}]: {metric_data.name}={metric_data.value}",
            file=sys.stdout,
        )


class StdoutMetricHandler(ConsoleMetricHandler):
    """Same lines as :class:`ConsoleMetricHandler` (kept as a separate name for configs that use it)."""


class NullMetricHandler(MetricHandler):
    """Drops every metric (the default)."""

    def emit(self, metric_data: MetricData):
        pass


class MetricStream:
    """Publishes values of one group to one handler."""

    def __init__(self, group_name: str, handler: MetricHandler):
        self.group_name = group_name
        self.handler = handler

    def add_value(self, metric_name: str, metric_value: int):
        self.handler.emit(MetricData(time.time(), self.group_name, metric_name, metric_value))


_metrics_map: dict[str, MetricHandler] = {}
_default_metrics_handler: MetricHandler = NullMetricHandler()


def configure(handler: MetricHandler, group: str | None = None):
    """Send metrics of ``group`` to ``handler``; ``group=None`` sets the handler for every unconfigured group."""
    # any object with an emit(metric_data) method will do (upstream does not require the base class either)
    if isinstance(handler, type) or not callable(getattr(handler, "emit", None)):  # a class is not a handler
        raise TypeError(f"metric handler must be a MetricHandler (an object with emit(metric_data)), got {handler!r}")
    if group is not None and not isinstance(group, str):
        raise TypeError(f"metric group must be a str or None, got {group!r}")
    global _default_metrics_handler
    if group is None:
        _default_metrics_handler = handler
    else:
        _metrics_map[group] = handler


def getStream(group: str):  # noqa: N802 -- upstream's public name
    """The stream for ``group``: its configured handler, else the default one."""
    return MetricStream(group, _metrics_map.get(group, _default_metrics_handler))


def _get_metric_name(fn) -> str:
    # methods and nested functions: their qualified name ("Class.method"); a top-level function is
    # prefixed with the last part of its module ("module.function") so names from different files stay apart
    qualname = fn.__qualname__
    if "." in qualname:
        return qualname
    module = getattr(fn, "__module__", None)
    return f"{module.split('.')[-1]}.{qualname}" if module else qualname


def prof(fn=None, group: str = "torchelastic"):
    """Decorator: put ``<name>.success`` or ``<name>.failure`` (1) and ``<name>.duration.ms`` per call."""

    def wrap(f):
        if not callable(f):
            raise TypeError(f"prof can only decorate a callable, got {f!r}")

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            key = _get_metric_name(f)
            start = time.time()
            try:
                result = f(*args, **kwargs)
                put_metric(f"{key}.success", 1, group)
            except Exception:
                put_metric(f"{key}.failure", 1, group)
                raise
            finally:
                put_metric(f"{key}.duration.ms", get_elapsed_time_ms(start), group)
            return result

        return wrapper

    if fn:
        return wrap(fn)
    return wrap


def profile(group=None):
    """Deprecated: use :func:`prof`. Puts ``<function __name__>.success/failure/duration.ms`` to ``group`` as it is
    (None included) through :func:`publish_metric`, as upstream."""
    warnings.warn("Deprecated, use `@prof` instead", FutureWarning, stacklevel=2)

    def wrap(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                result = func(*args, **kwargs)
                publish_metric(group, f"{func.__name__}.success", 1)
            except Exception:
                publish_metric(group, f"{func.__name__}.failure", 1)
                raise
            finally:
                publish_metric(group, f"{func.__name__}.duration.ms", get_elapsed_time_ms(start))
            return result

        return wrapper

    return wrap


def put_metric(metric_name: str, metric_value: int, metric_group: str = "torchelastic"):
    """Publish ``metric_name=metric_value`` to ``metric_group``'s handler."""
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError(f"metric name must be a non-empty str, got {metric_name!r}")
    getStream(metric_group).add_value(metric_name, metric_value)


def publish_metric(metric_group: str, metric_name: str, metric_value: int):
    """Deprecated: use :func:`put_metric`."""
    warnings.warn(
        "Deprecated, use `put_metric(metric_group)(metric_name, metric_value)` instead", FutureWarning, stacklevel=2
    )
    getStream(metric_group).add_value(metric_name, metric_value)


def get_elapsed_time_ms(start_time_in_seconds: float):
    """Milliseconds (int) elapsed since ``start_time_in_seconds`` (a ``time.time()`` value)."""
    return int((time.time() - start_time_in_seconds) * 1000)
