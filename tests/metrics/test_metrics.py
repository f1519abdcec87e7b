"""elastic_impl.metrics: handlers per group, put_metric, prof."""

from __future__ import annotations

import pytest

from elastic_impl import metrics
from elastic_impl.metrics import api


class Collect(metrics.MetricHandler):
    def __init__(self):
        self.data: list[metrics.MetricData] = []

    def emit(self, metric_data):
        self.data.append(metric_data)


@pytest.fixture(autouse=True)
def restore_handlers():
    saved_map, saved_default = dict(api._metrics_map), api._default_metrics_handler
    yield
    api._metrics_map.clear()
    api._metrics_map.update(saved_map)
    api._default_metrics_handler = saved_default


def test_group_handler_and_default_handler():
    mine, default = Collect(), Collect()
    metrics.configure(mine, "mygroup")
    metrics.configure(default)
    metrics.put_metric("a", 3, "mygroup")
    metrics.put_metric("b", 4)
    assert [(d.group_name, d.name, d.value) for d in mine.data] == [("mygroup", "a", 3)]
    assert [(d.group_name, d.name, d.value) for d in default.data] == [("torchelastic", "b", 4)]
    assert mine.data[0].timestamp > 0


def test_console_handler_prints_line(capsys):
    metrics.configure(metrics.ConsoleMetricHandler(), "g")
    metrics.put_metric("m", 7, "g")
    metrics.configure(metrics.StdoutMetricHandler(), "g")
    metrics.put_metric("m", 8, "g")
    metrics.configure(metrics.NullMetricHandler(), "g")
    metrics.put_metric("m", 9, "g")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith("[g]: m=7") and out[1].endswith("[g]: m=8")


class Worker:
    @metrics.prof(group="p")
    def ok(self):
        return 5

    @metrics.prof
    def bad(self):
        raise KeyError("x")


def test_prof_records_success_failure_and_duration():
    sink = Collect()
    metrics.configure(sink, "p")
    metrics.configure(sink, "torchelastic")
    assert Worker().ok() == 5
    with pytest.raises(KeyError):
        Worker().bad()
    names = [(d.group_name, d.name) for d in sink.data]
    assert names == [
        ("p", "Worker.ok.success"),
        ("p", "Worker.ok.duration.ms"),
        ("torchelastic", "Worker.bad.failure"),
        ("torchelastic", "Worker.bad.duration.ms"),
    ]
    assert all(d.value >= 0 for d in sink.data)


def test_bad_input_is_clear_error():
    with pytest.raises(TypeError, match=r"must be a MetricHandler \(an object with emit\(metric_data\)\), got 'console'"):
        metrics.configure("console")
    with pytest.raises(ValueError, match="non-empty str, got ''"):
        metrics.put_metric("", 1)
    with pytest.raises(TypeError, match="must be a MetricHandler"):  # the class, not an instance: every emit would fail
        metrics.configure(metrics.ConsoleMetricHandler, "g")
    with pytest.raises(TypeError, match="MetricsConfig or None"):
        metrics.initialize_metrics({"a": 1})
    metrics.initialize_metrics(metrics.MetricsConfig({"k": "v"}))


def test_a_handler_need_not_subclass_metric_handler():
    # upstream only calls handler.emit(); a duck-typed handler used to be refused with a TypeError here
    got = []

    class Duck:
        def emit(self, metric_data):
            got.append(metric_data)

    metrics.configure(Duck(), "duck")
    metrics.put_metric("m", 5, "duck")
    assert [(d.group_name, d.name, d.value) for d in got] == [("duck", "m", 5)]
    with pytest.raises(TypeError, match="got None"):
        metrics.configure(None)


def test_profile_is_upstreams_deprecated_decorator():
    # FutureWarning with upstream's texts; metric names are the function's __name__, the group is used as given
    sink = Collect()
    metrics.configure(sink, "old")
    with pytest.warns(FutureWarning, match="Deprecated, use `@prof` instead"):
        decorator = metrics.profile("old")

    @decorator
    def legacy():
        return "r"

    with pytest.warns(FutureWarning, match=r"use `put_metric\(metric_group\)\(metric_name, metric_value\)`"):
        assert legacy() == "r"
    assert [d.name for d in sink.data] == ["legacy.success", "legacy.duration.ms"]


def test_publish_metric_is_deprecated_but_works():
    sink = Collect()
    metrics.configure(sink, "g")
    with pytest.deprecated_call():
        metrics.publish_metric("g", "n", 1)
    assert [(d.name, d.value) for d in sink.data] == [("n", 1)]


def test_metric_names_of_functions_and_methods():
    def inner():
        pass

    class Outer:
        class Inner:
            def m(self):
                pass

    assert api._get_metric_name(Outer.Inner.m).endswith("Outer.Inner.m")
    assert api._get_metric_name(inner).endswith("<locals>.inner")
    assert api._get_metric_name(api.put_metric) == "api.put_metric"


def test_elapsed_time_ms():
    import time

    assert 1900 <= metrics.get_elapsed_time_ms(time.time() - 2) <= 2500
