"""Timeline plot (PNG) of a history: one lane per node with its workers' running spans, rendezvous completions,
failures and restarts, the nemesis' faults as shaded spans, and the job's outcome.

Needs matplotlib (the optional extra ``plot``); without it :func:`plot_timeline` raises :class:`PlotUnavailable`
with the install command.
"""

from __future__ import annotations

from pathlib import Path

from . import history as h
from .history import History


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("timeline plots need matplotlib: pip install '.[plot]'") from None
    return plt


def _node_sort_key(name: str) -> tuple[int, str]:
    digits = name[4:] if name.startswith("node") else ""
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def plot_timeline(history: History, path: str | Path, title: str = "") -> Path:
    plt = _pyplot()
    events = history.sorted().events
    nodes = sorted({e.node for e in events if e.node.startswith("node")}, key=_node_sort_key)
    lane = {n: i for i, n in enumerate(nodes)}
    end = events[-1].t if events else 1.0
    fig, ax = plt.subplots(figsize=(13.5, 1.2 + 0.45 * max(1, len(nodes))))

    # Worker spans: from a node's worker_start (local rank 0) to its next worker_exit/agent_exit.
    open_since: dict[str, tuple[float, int | None]] = {}
    spans: list[tuple[str, float, float, int | None]] = []
    for e in events:
        if e.node not in lane:
            continue
        if e.event == h.WORKER_START and e.detail.get("local_rank", 0) == 0:
            open_since[e.node] = (e.t, e.round)
        elif e.event in (h.WORKER_EXIT, h.AGENT_EXIT) and e.node in open_since:
            start, rnd = open_since.pop(e.node)
            spans.append((e.node, start, e.t, rnd))
    for node, (start, rnd) in open_since.items():
        spans.append((node, start, end, rnd))
    cmap = plt.get_cmap("tab10")
    for node, start, stop, rnd in spans:
        ax.barh(lane[node], max(stop - start, end * 1e-3), left=start, height=0.5,
                color=cmap((rnd or 0) % 10), alpha=0.6, edgecolor="none")

    def marks(names: tuple[str, ...], marker: str, color: str, label: str) -> None:
        pts = [(e.t, lane[e.node]) for e in events if e.event in names and e.node in lane]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label, zorder=3, s=28)

    marks((h.RDZV_COMPLETE,), "|", "black", "rendezvous complete")
    marks((h.WORKER_FAILED,), "x", "red", "worker failed")
    marks((h.RESTART,), ">", "orange", "restart")
    marks((h.AGENT_EXIT,), "s", "dimgray", "agent exit")

    # Faults: a shaded span (start..end, or a thin line when instantaneous) labelled with the fault name.
    starts = [e for e in events if e.event == h.FAULT_START]
    ends = [e for e in events if e.event == h.FAULT_END]
    for i, e in enumerate(starts):
        stop = next((x.t for x in ends if x.detail == e.detail and x.t >= e.t), None)
        if stop is None:
            ax.axvline(e.t, color="purple", alpha=0.5, linewidth=1)
        else:
            ax.axvspan(e.t, stop, color="purple", alpha=0.12)
        label = e.detail.get("fault", "fault")
        target = e.detail.get("target")
        ax.text(e.t, len(nodes) - 0.4 + 0.3 * (i % 3), f"{label} {target or ''}".strip(), fontsize=7, color="purple")
    for e in events:
        if e.event in (h.JOB_SUCCEEDED, h.JOB_FAILED):
            color = "green" if e.event == h.JOB_SUCCEEDED else "red"
            ax.axvline(e.t, color=color, linewidth=2, label=e.event)

    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels(nodes)
    ax.set_ylim(-0.8, len(nodes) + 0.6)
    ax.set_xlim(0, end * 1.02 if end else 1.0)
    ax.set_xlabel("seconds since scenario start (bars: workers running, colored by round)")
    ax.set_title(title or "simulation timeline")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
