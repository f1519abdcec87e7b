"""python -m benchmarks [--quick] [--only NAME[,NAME]] [--results-dir DIR] [--table-only]"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from benchmarks import conformance_bench, launchers, rendezvous, simulator_bench, workers_bench
from benchmarks._harness import RESULTS_DIR, machine_info, write_json

BENCHMARKS = {
    "recovery": launchers.run_recovery,
    "rendezvous": rendezvous.run,
    "cold_start": launchers.run_cold_start,
    "workers_cold_start": workers_bench.run_cold_start,
    "workers_recovery": workers_bench.run_recovery,
    "simulator": simulator_bench.run,
    "conformance": conformance_bench.run,
}


def _fmt(side: dict | None, unit: str) -> str:
    if side is None:
        return "-"
    if "unavailable" in side:
        return "unavailable"
    median = side["median"]
    spread = f" [{side['min']:.3g}-{side['max']:.3g}]" if side.get("n", 1) > 1 else ""
    return f"{median:.3g} {unit}{spread}"


def _extra(side: dict | None) -> str:
    if not side or "unavailable" in side:
        return ""
    if "store_ops_per_rendezvous" in side:
        return (f"{side['store_ops_per_rendezvous']:.0f} ops, {side['store_bytes_per_rendezvous'] / 1024:.1f} KiB"
                f" ({side['store_ops_per_node']:.1f} ops/node)")
    if side.get("events_per_s"):
        return f"{side['events_per_s']:.3g} events/s"
    if side.get("breakdown"):
        return ", ".join(f"{name} {seconds:.3g}" for name, seconds in side["breakdown"].items())
    if "verdicts" in side:
        return ", ".join(f"{k} {v}" for k, v in sorted(side["verdicts"].items()))
    return ""


def table(results: dict) -> str:
    lines = ["| benchmark | case | ours | upstream | ours/upstream | ours store cost / notes | upstream store cost / notes |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for name, res in results.items():
        for case, sides in res.get("cases", {}).items():
            ours, upstream = sides.get("ours"), sides.get("upstream")
            r = sides.get("ratio")
            lines.append(f"| {name} | {case} | {_fmt(ours, res['unit'])} | {_fmt(upstream, res['unit'])} | "
                         f"{'-' if r is None else f'{r:.2f}x'} | {_extra(ours)} | {_extra(upstream)} |")
            if sides.get("note"):
                notes.append(f"- {name} / {case}: {sides['note']}")
            for label, side in (("ours", ours), ("upstream", upstream)):
                if side and "unavailable" in side:
                    notes.append(f"- {name} / {case} / {label}: unavailable: {side['unavailable']}")
    for name, res in results.items():
        for key in ("store_ops_growth_exponent", "store_bytes_growth_exponent"):
            if key in res:
                exps = ", ".join(f"{side} N^{v:.2f}" for side, v in res[key].items() if v is not None)
                notes.append(f"- {name}: {key.replace('_', ' ')}: {exps or 'n/a'}")
    return "\n".join(lines + ([""] + notes if notes else []))


# benchmarks/results/tmp/ is git-ignored: where --quick writes unless told otherwise.
QUICK_RESULTS_DIR = RESULTS_DIR / "tmp" / "quick"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="minimal sizes and one repetition (a smoke run)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where <name>.json and latest.md go (default {RESULTS_DIR}; with --quick "
                             f"{QUICK_RESULTS_DIR}, git-ignored, so a smoke run never overwrites the committed results)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rebuild latest.md from the results JSON already in --results-dir")
    args = parser.parse_args(argv)
    if args.results_dir is None:
        args.results_dir = QUICK_RESULTS_DIR if args.quick else RESULTS_DIR
    names = [] if args.table_only else list(BENCHMARKS)
    if args.only and not args.table_only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.exit(2, f"python -m benchmarks: error: unknown benchmark {unknown[0]!r}; "
                           f"choose from: {', '.join(BENCHMARKS)}\n")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.table_only:
        found = [json.loads((args.results_dir / f"{n}.json").read_text()) for n in BENCHMARKS
                 if (args.results_dir / f"{n}.json").exists()]
        if not found:
            parser.exit(2, f"python -m benchmarks: error: no results JSON in {args.results_dir} to build a table from\n")
        started = min(r["started_utc"] for r in found)
        args.quick = all(r.get("quick") for r in found)
    results = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        before = machine_info()
        t0 = time.time()
        try:
            res = BENCHMARKS[name](args.quick)
        except KeyboardInterrupt:
            print("python -m benchmarks: interrupted", file=sys.stderr)
            return 130
        res["wall_s"] = time.time() - t0
        res["quick"] = args.quick
        res["started_utc"] = started
        res["machine"] = before
        # Load average before and after: the machine is shared, so a noisy run must be visible in the numbers.
        res["loadavg_after"] = machine_info()["loadavg"]
        results[name] = res
        write_json(name, res, args.results_dir)
        print(f"[bench] {name} done in {res['wall_s']:.1f}s", file=sys.stderr, flush=True)
    # latest.md shows every benchmark's latest result, so an --only rerun does not drop the others from it.
    for name in BENCHMARKS:
        path = args.results_dir / f"{name}.json"
        if name not in results and path.exists():
            results[name] = json.loads(path.read_text())
    results = {name: results[name] for name in BENCHMARKS if name in results}
    info = machine_info()
    md = [f"# Benchmarks ({'quick' if args.quick else 'full'} run, {started})", "",
          f"Machine: {info['cores']} cores, {info['cpu_model']}, Python {info['python']}, torch {info['torch']}, "
          f"{info['platform']}.", "",
          "Load average (1/5/15 min) per benchmark, before -> after: "
          + "; ".join(f"{n} (run {r['started_utc']}): {r['machine']['loadavg'][0]:.2f} -> {r['loadavg_after'][0]:.2f}"
                      for n, r in results.items()), "",
          "Values: median [min-max] over the runs; ratio = ours / upstream median (lower is better for ours).", "",
          table(results), ""]
    text = "\n".join(md)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
