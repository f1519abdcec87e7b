"""Virtual-time simulator: one rendezvous round at 100 / 1,000 / 10,000 nodes, and 1,000 randomized fault schedules.

No upstream counterpart: absolute wall times (target: 10,000 virtual nodes <= 10 s). Drives the simulator's public
surface only: `simulator.virtual` for rendezvous rounds, `elastic-sim fuzz` for randomized schedules.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._harness import Unavailable, module_available, python, run_side, summarize, timed_command

# Entry points the virtual simulator may expose for "run one rendezvous round of N nodes" (first found wins).
ROUND_ENTRY_POINTS = ("run_rendezvous_round", "simulate_rendezvous", "rendezvous_round", "simulate_round")


def _round_entry():
    reason = module_available("simulator.virtual")
    if reason:
        raise Unavailable(reason)
    virtual = importlib.import_module("simulator.virtual")
    for name in ROUND_ENTRY_POINTS:
        fn = getattr(virtual, name, None)
        if callable(fn):
            return name, fn
    raise Unavailable(f"simulator.virtual has none of {', '.join(ROUND_ENTRY_POINTS)}")


def _events_of(outcome) -> int | None:
    for attr in ("events", "event_count", "num_events", "history"):
        value = outcome.get(attr) if isinstance(outcome, dict) else getattr(outcome, attr, None)
        if isinstance(value, int):
            return value
        if value is not None and hasattr(value, "__len__"):
            return len(value)
    return None


def virtual_round(n: int, repeats: int) -> dict:
    name, fn = _round_entry()
    params = inspect.signature(fn).parameters
    kwargs = {"seed": 0} if "seed" in params else {}
    size_kw = next((k for k in ("nodes", "num_nodes", "n_nodes", "n") if k in params), None)
    walls, events = [], []
    for i in range(repeats):
        if "seed" in kwargs:
            kwargs["seed"] = i
        t0 = time.perf_counter()
        outcome = fn(**{size_kw: n}, **kwargs) if size_kw else fn(n, **kwargs)
        walls.append(time.perf_counter() - t0)
        events.append(_events_of(outcome))
    out = summarize(walls)
    out["entry_point"] = f"simulator.virtual.{name}"
    if all(e is not None for e in events):
        out["events"] = events[0]
        out["events_per_s"] = events[0] / out["median"] if out["median"] else None
    return out


def fuzz_schedules(runs: int, timeout: float) -> dict:
    reason = module_available("simulator.cli")
    if reason:
        raise Unavailable(reason)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    try:
        cmd = [python(), "-m", "simulator.cli", "fuzz", "--seed", "1", "--runs", str(runs)]
        wall, rc, last_line = timed_command(cmd, timeout, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # rc 1 = the fuzzer found (and shrank) a violation: the run itself completed and its time counts.
    if rc not in (0, 1):
        raise Unavailable(f"elastic-sim fuzz exited rc={rc}: {last_line}")
    out = summarize([wall])
    out.update(exit_code=rc, schedules_per_s=runs / wall, last_line=last_line)
    return out


def run(quick: bool) -> dict:
    sizes = (100, 1000) if quick else (100, 1000, 10000)
    cases = {}
    for n in sizes:
        cases[f"round N={n}"] = {"ours": run_side(virtual_round, n, 1 if quick or n >= 10000 else 3)}
    runs = 20 if quick else 1000
    cases[f"fuzz {runs} schedules"] = {"ours": run_side(fuzz_schedules, runs, 60.0 if quick else 300.0)}
    return {
        "description": "virtual-time simulator wall time (s); no upstream counterpart",
        "unit": "s", "target": "10,000 nodes <= 10 s",
        "cases": cases,
    }
