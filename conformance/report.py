"""Certification reports: terminal table, report.json, report.md and JUnit XML."""

from __future__ import annotations

import json
import os
import platform
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conformance.runner import FAILING_VERDICTS, Result
from conformance.table import Claims

VERDICT_ORDER = ("REGRESSION", "VIOLATION", "NO-CHECK", "UNDOCUMENTED-SUPPORT", "KNOWN-DIFFERENCE", "CLAIMED-UNSUPPORTED",
                 "SKIPPED", "CONFORMS")


def summary(results: Iterable[Result]) -> dict[str, int]:
    counts = Counter(r.verdict for r in results)
    return {v: counts[v] for v in VERDICT_ORDER if counts[v]}


def progress_line(index: int, total: int, result: Result) -> str:
    tail = f"  {result.error}" if result.error else ""
    if len(tail) > 160:
        tail = tail[:157] + "..."
    return f"[{index:>3}/{total}] {result.verdict:<20} {result.observed:<4} {result.duration_s:6.2f}s  {result.api}{tail}"


def terminal_table(results: list[Result]) -> str:
    width = max((len(r.api) for r in results), default=10)
    lines = [f"{'api':<{width}}  claimed  observed  verdict", "-" * (width + 40)]
    lines += [f"{r.api:<{width}}  {r.claimed:<7}  {r.observed:<8}  {r.verdict}" for r in results]
    failing = [r for r in results if r.verdict in FAILING_VERDICTS]
    if failing:
        lines.append(f"{len(failing)} failing row(s):")
        lines += [f"  {r.verdict}: {r.api}: {r.error}" for r in failing]
    lines.append("summary: " + ", ".join(f"{k}={v}" for k, v in summary(results).items()))
    return "\n".join(lines)


NOT_CERTIFIED = "NOT CERTIFIED"

# Settings the checks apply on purpose, written into every report so that nobody reads a certification as covering
# what it deliberately sidesteps.
SCENARIO_SETTINGS = {
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": (
        "1 during the agent scenarios (upstream's documented switch): with upstream's default shared rendezvous "
        "store a restarted worker group's init_process_group reads the previous attempt's addresses "
        "(pytorch/pytorch#135712; gloo connectFullMesh 'Connection refused' on every restart here)"),
}


def _meta(impl: str, device: str, backend: str, table: str) -> dict[str, Any]:
    import torch

    return {
        "impl": impl,
        "device": device,
        "backend": backend,  # with the device, what was certified: "hccl" alone names Ascend's and Habana's
        "table": table,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s)",
        "settings": dict(SCENARIO_SETTINGS),
    }


def write_reports(results: list[Result], out_dir: Path, *, impl: str, device: str, table: str | None = None,
                  claims: Claims | None = None, backend: str = "gloo", run: dict[str, Any] | None = None,
                  not_certified: str | None = None) -> list[Path]:
    """``run``: how the certification ran (jobs, wall time, ...), recorded in the reports' metadata.

    ``not_certified``: why nothing was certified (the requested device is absent); the reports then say NOT
    CERTIFIED in their title and summary and carry no row verdicts at all.
    """
    if not_certified is not None and results:
        raise ValueError("a NOT CERTIFIED report carries no row results")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _meta(impl, device, backend, claims.name if claims else table or "?")
    if claims is not None and claims.hardware:
        meta["hardware"] = claims.hardware
    meta.update(run or {})
    meta["summary"] = summary(results)
    if not_certified is not None:
        meta.update(outcome=NOT_CERTIFIED, reason=not_certified)
    else:
        meta["outcome"] = "FAILED" if any(r.verdict in FAILING_VERDICTS for r in results) else "PASSED"
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=1) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(results, meta))
    xml_path = out_dir / "junit.xml"
    _junit(results, meta).write(xml_path, encoding="utf-8", xml_declaration=True)
    wpt_path = out_dir / "wpt.json"
    wpt_path.write_text(json.dumps(wpt_report(results, meta), indent=1) + "\n")
    paths = [json_path, md_path, xml_path, wpt_path]
    observed_path = out_dir / "observed_table.md"
    if claims is not None and claims.layout is not None and not_certified is None:
        observed_path.write_text(observed_table(results, claims, meta))
        paths.append(observed_path)
    elif _is_observed_table(observed_path):
        # An earlier run's table next to this run's report would read as this run's measurement: say it is not.
        observed_path.write_text(_no_observed_table(meta))
        paths.append(observed_path)
    return paths


_OBSERVED_TITLE = "# Observed support: "
_NO_OBSERVED_TITLE = "# No observed support table: "


def _is_observed_table(path: Path) -> bool:
    """Whether ``path`` holds a table an earlier certify wrote (a file of the user's by that name is left alone)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith((_OBSERVED_TITLE, _NO_OBSERVED_TITLE))


def _no_observed_table(meta: dict[str, Any]) -> str:
    why = (f"nothing was certified ({meta['reason']})" if meta.get("outcome") == NOT_CERTIFIED
           else f"table `{meta['table']}` has no per-hardware columns (use --table ascend-2.13 --hardware ...)")
    return (f"{_NO_OBSERVED_TITLE}`{meta['impl']}` on `{meta['device']}`, {meta['created']}\n\n"
            f"This run wrote no per-hardware table: {why}. The table an earlier run left here was replaced, so that "
            "it cannot be read as this run's measurement; see report.md.\n")


def wpt_report(results: list[Result], meta: dict[str, Any]) -> dict[str, Any]:
    """The per-assertion results in web-platform-tests' report layout: one test per row (status OK when the check
    ran to its end or stopped at a failed expectation, ERROR when something else broke it, TIMEOUT, SKIP), with one
    subtest per expectation it evaluated (PASS/FAIL and the failure's message). Our verdict and the claim ride along
    as extra fields."""
    tests = []
    for r in results:
        failed_expectation = any(a["status"] == "FAIL" for a in r.assertions)
        if r.observed == "skip":
            status = "SKIP"
        elif r.observed == "pass" or failed_expectation:
            status = "OK"
        elif r.error.startswith("timed out after"):
            status = "TIMEOUT"
        else:
            status = "ERROR"
        tests.append({
            "test": r.api,
            "status": status,
            "message": r.error or None,
            "duration": int(r.duration_s * 1000),
            "subtests": [{"name": a["name"], "status": a["status"], "message": a["message"] or None}
                         for a in r.assertions],
            "verdict": r.verdict,
            "claimed": r.claimed,
        })
    return {"run_info": meta, "results": tests}


def observed_table(results: list[Result], claims: Claims, meta: dict[str, Any]) -> str:
    """The vendor's own per-hardware layout with the certified column as measured (✔ passed, ✘ failed, ? not run),
    the other columns as claimed, then every row where measurement and claim differ."""
    layout = claims.layout
    assert layout is not None and claims.hardware is not None
    measured = {r.api: {"pass": "✔", "fail": "✘"}.get(r.observed, "?") for r in results}
    column = layout.columns.index(claims.hardware)
    lines = [f"{_OBSERVED_TITLE}`{meta['impl']}` on `{meta['device']}` (backend `{meta['backend']}`), "
             f"column {claims.hardware} measured",
             "", f"Measured {meta['created']}; the other columns are copied from `{layout.source}` (claimed, not "
             "measured here). ✔ the row's check passed, ✘ it failed, ? not run (skipped or not selected).", "",
             "|section|API|" + "|".join(layout.columns) + "|", "|--|--|" + ":-:|" * len(layout.columns)]
    diff = []
    for entry in layout.entries:
        marks = ["✔" if c else "✘" for c in entry.claims]
        claimed = marks[column]
        marks[column] = measured.get(entry.api, "?")
        api = entry.api + (" (new)" if entry.new else "")
        lines.append(f"|{entry.section}|{api}|" + "|".join(marks) + "|")
        if marks[column] != "?" and marks[column] != claimed:
            diff.append(f"|{entry.api}|{claimed}|{marks[column]}|")
    lines += ["", f"## Measured vs claimed ({claims.hardware})", ""]
    if diff:
        lines += ["|API|claimed|measured|", "|--|:-:|:-:|", *diff]
    else:
        lines.append("No difference: every measured row agrees with the claim.")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(results: list[Result], meta: dict[str, Any]) -> str:
    where = f"`{meta['impl']}` on `{meta['device']}` (backend `{meta['backend']}`)"
    table = f"`{meta['table']}`" + (f" column `{meta['hardware']}`" if "hardware" in meta else "")
    about = (f"torch {meta['torch']}, Python {meta['python']}, table {table}, created {meta['created']} "
             f"on {meta['host']}" + "".join(f", {k} {meta[k]}" for k in ("jobs", "wall_s") if k in meta) + ".")
    if meta["outcome"] == NOT_CERTIFIED:
        return "\n".join([f"# {NOT_CERTIFIED}: {where}", "", about, "",
                          f"Summary: **{NOT_CERTIFIED}**: {_cell(meta['reason'])}. No row was run.", ""])
    lines = [
        f"# Conformance report: {where}",
        "",
        about,
        "",
        "Summary: " + ", ".join(f"**{k}** {v}" for k, v in meta["summary"].items()),
        "",
        *[f"Setting: `{k}`={v}." for k, v in meta.get("settings", {}).items()],
        "",
        "|module|rows|" + "|".join(VERDICT_ORDER) + "|",
        "|--|--|" + "--|" * len(VERDICT_ORDER),
    ]
    groups: dict[str, Counter] = {}
    for r in results:
        groups.setdefault(r.group, Counter())[r.verdict] += 1
    for group, counts in groups.items():
        cells = "|".join(str(counts[v] or "") for v in VERDICT_ORDER)
        lines.append(f"|{group}|{sum(counts.values())}|{cells}|")
    lines += [
        "",
        "|api|claimed|observed|verdict|duration s|error / notes|",
        "|--|--|--|--|--|--|",
    ]
    for r in results:
        extra = "; ".join(x for x in (r.error, r.notes) if x)
        lines.append(f"|`{r.api}`|{r.claimed}|{r.observed}|{r.verdict}|{r.duration_s:.2f}|{_cell(extra)}|")
    return "\n".join(lines) + "\n"


def _junit(results: list[Result], meta: dict[str, Any]) -> ET.ElementTree:
    counts = Counter(r.verdict for r in results)
    suite = ET.Element(
        "testsuite",
        name=f"conformance-{meta['impl']}-{meta['device']}",
        tests=str(len(results)),
        failures=str(sum(counts[v] for v in FAILING_VERDICTS)),
        skipped=str(counts["SKIPPED"]),
        errors="0",
        time=f"{sum(r.duration_s for r in results):.3f}",
    )
    if meta["outcome"] == NOT_CERTIFIED:  # one failing case, so CI cannot read an empty suite as a pass
        suite.set("tests", "1")
        suite.set("errors", "1")
        case = ET.SubElement(suite, "testcase", classname="conformance.device", name=meta["device"], time="0")
        ET.SubElement(case, "error", message=f"{NOT_CERTIFIED}: {meta['reason']}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.group}", name=r.api,
                             time=f"{r.duration_s:.3f}")
        props = ET.SubElement(case, "properties")
        for key in ("claimed", "observed", "verdict"):
            ET.SubElement(props, "property", name=key, value=getattr(r, key))
        if r.verdict in FAILING_VERDICTS:
            failure = ET.SubElement(case, "failure", message=f"{r.verdict}: {r.error}")
            failure.text = r.detail or r.error
        elif r.verdict == "SKIPPED":
            ET.SubElement(case, "skipped", message=r.error)
        elif r.error:
            ET.SubElement(case, "system-out").text = f"{r.verdict}: {r.error}"
    return ET.ElementTree(suite)
