"""Metrics: ``configure(handler, group)``, ``put_metric``, ``prof`` and the handler classes."""

from __future__ import annotations

from elastic_impl.metrics.api import (  # noqa: F401
    ConsoleMetricHandler,
    MetricData,
    MetricHandler,
    MetricsConfig,
    MetricStream,
    NullMetricHandler,
    StdoutMetricHandler,
    configure,
    get_elapsed_time_ms,
    getStream,
    prof,
    profile,
    publish_metric,
    put_metric,
)


def initialize_metrics(cfg: MetricsConfig | None = None):
    """Hook for metrics backends needing set-up; the built-in handlers need none."""
    if cfg is not None and not isinstance(cfg, MetricsConfig):
        raise TypeError(f"initialize_metrics expects a MetricsConfig or None, got {cfg!r}")
