"""Wall time of the full conformance table: `elastic-conformance certify --impl elastic_impl|torch`.

Runs with the certifier's default ``--jobs`` (one worker process per CPU), as CI does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from benchmarks._harness import (
    Unavailable,
    module_available,
    python,
    ratio,
    run_side,
    summarize,
    timed_command,
)

IMPLS = {"ours": "elastic_impl", "upstream": "torch"}
NOT_PASSING = ("VIOLATION", "NO-CHECK", "ERROR")


def certify(side: str, timeout: float, rows: str | None = None) -> dict:
    reason = module_available("conformance.cli")
    if reason:
        raise Unavailable(reason)
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-conf-{side}-"))
    cmd = [python(), "-m", "conformance.cli", "certify", "--impl", IMPLS[side], "--device", "cpu", "-q",
           "--out", str(out_dir)]
    if rows:
        cmd += ["-k", rows]
    try:
        wall, rc, last_line = timed_command(cmd, timeout, out_dir)
        report = out_dir / "report.json"
        if not report.exists():
            raise Unavailable(f"certify --impl {IMPLS[side]} exited rc={rc} without a report: {last_line}")
        data = json.loads(report.read_text())
        out = summarize([wall])
        out["exit_code"] = rc
        out["jobs"] = data["meta"].get("jobs")
        out["certify_wall_s"] = data["meta"].get("wall_s")  # without interpreter start-up and table validation
        out["verdicts"] = _verdict_counts(data)
        return out
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _verdict_counts(report: dict) -> dict:
    counts: dict[str, int] = {}
    for row in report["results"]:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return counts


def run(quick: bool) -> dict:
    # --quick certifies a few cheap rows only, to prove the plumbing; the full table is the real measurement.
    rows = "errors,ChildFailedError" if quick else None
    timeout = 120.0 if quick else 600.0  # upstream's full table took > 300 s with the shared machine at load ~28
    case = {side: run_side(certify, side, timeout, rows) for side in ("upstream", "ours")}
    case["ratio"] = ratio(case["ours"], case["upstream"])
    failing = {k: v for k, v in case["ours"].get("verdicts", {}).items() if k in NOT_PASSING}
    if failing:
        # Failing checks often stop early, so a fast failing run is not a fast suite.
        case["ratio"] = None
        case["note"] = "ours: " + ", ".join(f"{v} {k}" for k, v in sorted(failing.items())) + \
                       "; wall time not comparable until ours conforms"
    return {
        "description": "elastic-conformance certify --impl X --device cpu (default --jobs = CPU count), "
                       "wall time (s), one run each"
                       + (" (quick: a few rows only)" if quick else " (full table)"),
        "unit": "s", "target": None,
        "cases": {"certify " + ("subset" if quick else "full table"): case},
    }
