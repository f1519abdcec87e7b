"""torch.distributed.elastic.metrics: handlers, configure, put_metric and @prof."""

from __future__ import annotations

import contextlib
import io
import time
import uuid

from conformance.registry import check

MT = "metrics"
SLEEP_S = 0.25  # a profiled call's known duration


def _collector(ctx):
    base = ctx.get(f"{MT}.api.MetricHandler")

    class Collector(base):
        def __init__(self) -> None:
            self.seen = []

        def emit(self, metric_data):
            self.seen.append(metric_data)

    return Collector()


DEFAULT_GROUP = "torchelastic"  # the documented default group of put_metric and prof


@contextlib.contextmanager
def _configured(ctx, group: str):
    """A collector as ``group``'s handler for the block (then the documented NullMetricHandler again); yields what
    it saw."""
    collector = _collector(ctx)
    ctx.get(f"{MT}.configure")(collector, group)
    try:
        yield collector.seen
    finally:
        ctx.get(f"{MT}.configure")(ctx.get(f"{MT}.api.NullMetricHandler")(), group)


def _group() -> str:
    # A fresh group per check, so the process-wide handler table of other groups is never touched.
    return f"conformance-{uuid.uuid4().hex[:8]}"


@check(f"{MT}.api.MetricHandler")
def metric_handler(ctx) -> None:
    base = ctx.get(f"{MT}.api.MetricHandler")
    ctx.expect_raises(TypeError, base, what="instantiating the abstract MetricHandler")
    collector, group = _collector(ctx), _group()
    ctx.get(f"{MT}.configure")(collector, group)
    ctx.get(f"{MT}.put_metric")("m", 5, group)
    ctx.expect_equal(len(collector.seen), 1, "emit() calls for one put_metric()")


@check(f"{MT}.api.ConsoleMetricHandler")
def console_handler(ctx) -> None:
    group = _group()
    ctx.get(f"{MT}.configure")(ctx.get(f"{MT}.api.ConsoleMetricHandler")(), group)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ctx.get(f"{MT}.put_metric")("console_metric", 42, group)
    text = out.getvalue()
    ctx.expect("console_metric=42" in text and group in text, f"console output {text!r} lacks name=value and group")


@check(f"{MT}.api.NullMetricHandler")
def null_handler(ctx) -> None:
    group = _group()
    handler = ctx.get(f"{MT}.api.NullMetricHandler")()
    ctx.expect(isinstance(handler, ctx.get(f"{MT}.api.MetricHandler")), "NullMetricHandler is not a MetricHandler")
    ctx.get(f"{MT}.configure")(handler, group)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        ctx.get(f"{MT}.put_metric")("null_metric", 1, group)
    ctx.expect_equal(out.getvalue() + err.getvalue(), "", "output of NullMetricHandler")


@check(f"{MT}.configure")
def configure(ctx) -> None:
    first, second, group = _collector(ctx), _collector(ctx), _group()
    configure = ctx.get(f"{MT}.configure")
    configure(first, group)
    ctx.get(f"{MT}.put_metric")("a", 1, group)
    configure(second, group)  # reconfiguring a group replaces its handler
    ctx.get(f"{MT}.put_metric")("b", 2, group)
    ctx.get(f"{MT}.put_metric")("c", 3, _group())  # another group never reaches these handlers
    ctx.expect_equal([m.name for m in first.seen], ["a"], "metrics seen by the first handler")
    ctx.expect_equal([m.name for m in second.seen], ["b"], "metrics seen by the replacing handler")
    # Without a group: the handler becomes the default of every group that has none of its own.
    default = _collector(ctx)
    configure(default)
    try:
        unconfigured = _group()
        ctx.get(f"{MT}.put_metric")("d", 4, unconfigured)
        ctx.get(f"{MT}.put_metric")("e", 5, group)
    finally:
        configure(ctx.get(f"{MT}.api.NullMetricHandler")())  # the documented default, for later rows
    ctx.expect_equal([(m.name, m.group_name) for m in default.seen], [("d", unconfigured)],
                     "metrics reaching configure(handler) without a group (the default handler)")
    # A handler is anything with emit(metric_data): it need not subclass MetricHandler.
    seen, duck_group = [], _group()

    class DuckHandler:
        def emit(self, metric_data):
            seen.append(metric_data)

    configure(DuckHandler(), duck_group)
    ctx.get(f"{MT}.put_metric")("duck", 6, duck_group)
    ctx.expect_equal([(m.name, m.value) for m in seen], [("duck", 6)], "metrics seen by a handler with emit()")


@check(f"{MT}.prof")
def prof(ctx) -> None:
    collector, group = _collector(ctx), _group()
    ctx.get(f"{MT}.configure")(collector, group)
    prof_ = ctx.get(f"{MT}.prof")

    @prof_(group=group)
    def profiled_ok(x):
        return x * 2

    @prof_(group=group)
    def profiled_fail():
        raise OSError("fail")

    ctx.expect_equal(profiled_ok(21), 42, "return value through @prof")
    ctx.expect_raises(OSError, profiled_fail, what="exception through @prof")
    names = [m.name for m in collector.seen]
    for suffix, fn in ((".success", "profiled_ok"), (".duration.ms", "profiled_ok"), (".failure", "profiled_fail")):
        ctx.expect(any(n.endswith(suffix) and fn in n for n in names), f"no '{fn}...{suffix}' metric in {names}")
    ok = next(m for m in collector.seen if m.name.endswith(".success"))
    ctx.expect_equal((ok.value, ok.group_name), (1, group), "success metric value and group")

    @prof_(group=group)
    def profiled_sleep():
        time.sleep(SLEEP_S)

    collector.seen.clear()
    started = time.monotonic()
    profiled_sleep()
    elapsed_ms = (time.monotonic() - started) * 1000
    (duration,) = [m.value for m in collector.seen if m.name.endswith(".duration.ms")] or [None]
    ctx.expect(duration is not None and SLEEP_S * 1000 * 0.9 <= duration <= elapsed_ms + 50,
               f"duration.ms of a call that slept {SLEEP_S} s (took {elapsed_ms:.0f} ms): {duration!r}")
    # Bare @prof (no arguments): the same metrics, in the documented default group "torchelastic".
    with _configured(ctx, DEFAULT_GROUP) as default_seen:
        @prof_
        def profiled_bare():
            return "bare"

        ctx.expect_equal(profiled_bare(), "bare", "return value through a bare @prof")
    bare = [(m.name, m.group_name) for m in default_seen if "profiled_bare" in m.name]
    ctx.expect(any(n.endswith(".success") for n, _ in bare) and any(n.endswith(".duration.ms") for n, _ in bare)
               and {g for _, g in bare} == {DEFAULT_GROUP},
               f"a bare @prof's metrics (name, group) in group {DEFAULT_GROUP!r}: {bare}")


@check(f"{MT}.put_metric")
def put_metric(ctx) -> None:
    collector, group = _collector(ctx), _group()
    ctx.get(f"{MT}.configure")(collector, group)
    ctx.get(f"{MT}.put_metric")("conformance.metric", 17, group)
    ctx.expect_equal(len(collector.seen), 1, "metrics emitted")
    data = collector.seen[0]
    ctx.expect_equal((data.name, data.value, data.group_name), ("conformance.metric", 17, group), "MetricData")
    ctx.expect(isinstance(data.timestamp, float) and data.timestamp > 1e9, f"MetricData.timestamp {data.timestamp!r}")
    # Without a group: the documented default group "torchelastic".
    with _configured(ctx, DEFAULT_GROUP) as default_seen:
        ctx.get(f"{MT}.put_metric")("conformance.default_group", 3)
    ctx.expect_equal([(m.name, m.value, m.group_name) for m in default_seen],
                     [("conformance.default_group", 3, DEFAULT_GROUP)], "put_metric(name, value) without a group")
