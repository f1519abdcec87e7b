"""Runs the registered checks for the rows of a table and assigns each row a verdict."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conformance.adapters import Adapter, ApiNotFound, one_line
from conformance.context import CheckContext, SuiteResources, descendants, kill_pids, process_start_ticks
from conformance.device import Device, backend_for
from conformance.known_differences import known_difference, signature_difference
from conformance.registry import REGISTRY, Check, CheckFailed, CheckSkipped, load_checks
from conformance.signatures import compare, describe, load_snapshot
from conformance.table import Row

CONFORMS = "CONFORMS"
VIOLATION = "VIOLATION"
CLAIMED_UNSUPPORTED = "CLAIMED-UNSUPPORTED"
UNDOCUMENTED_SUPPORT = "UNDOCUMENTED-SUPPORT"
SKIPPED = "SKIPPED"
KNOWN_DIFFERENCE = "KNOWN-DIFFERENCE"
NO_CHECK = "NO-CHECK"  # a table row the suite has no check for: a defect of the suite itself
REGRESSION = "REGRESSION"  # passed in the --baseline report, fails now: a failure whatever the claim
FAILING_VERDICTS = (VIOLATION, NO_CHECK, REGRESSION)


@dataclass
class Result:
    api: str
    group: str
    claimed: str  # yes | no
    observed: str  # pass | fail | skip
    duration_s: float
    verdict: str
    error: str = ""  # one line
    detail: str = ""  # traceback or extra lines, for report.json
    notes: str = ""
    # The expectations the check evaluated, in order ({"name", "status": PASS|FAIL, "message"}): see wpt.json.
    assertions: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_for(supported: bool, observed: str) -> str:
    if observed == "skip":
        return SKIPPED
    if supported:
        return CONFORMS if observed == "pass" else VIOLATION
    return UNDOCUMENTED_SUPPORT if observed == "pass" else CLAIMED_UNSUPPORTED


def _needles(pattern: str | None) -> list[str]:
    """The comma-separated substrings of a -k ``pattern`` (blank ones dropped)."""
    return [p.strip() for p in (pattern or "").split(",") if p.strip()]


def select(rows: Iterable[Row], pattern: str | None) -> list[Row]:
    """Rows whose API contains any of the comma-separated, case-insensitive substrings of ``pattern``."""
    rows = list(rows)
    if not pattern:
        return rows
    needles = [n.lower() for n in _needles(pattern)]
    return [r for r in rows if any(n in r.api.lower() for n in needles)]


def unmatched(rows: Iterable[Row], pattern: str | None) -> list[str]:
    """The comma-separated substrings of ``pattern`` that match no row (see :func:`select`)."""
    apis = [r.api.lower() for r in rows]
    return [n for n in _needles(pattern) if not any(n.lower() in api for api in apis)]


def _execute(check: Check, ctx: CheckContext, snapshot: dict[str, Any], waived: list[str]) -> None:
    try:
        obj = ctx.adapter.resolve(check.api)
    except ApiNotFound as exc:
        raise CheckFailed(f"missing: {exc}") from None
    expected = snapshot.get(check.api)
    if expected is not None:
        problems = compare(check.api.rsplit(".", 1)[-1], expected, describe(obj))
        reason = signature_difference(ctx.adapter.name, check.api)
        if problems and reason:
            waived.append(f"signature difference waived ({'; '.join(problems)}): {reason}")
        elif problems:
            ctx.record("signature as documented", False, "signature: " + "; ".join(problems))
            raise CheckFailed("signature: " + "; ".join(problems))
        ctx.record("signature as documented", True)
    check.fn(ctx)


def run_row(row: Row, resources: SuiteResources, snapshot: dict[str, Any]) -> Result:
    check = REGISTRY.get(row.api)
    if check is None:
        return Result(row.api, "-", row.claimed, "fail", 0.0, NO_CHECK, f"no check registered for {row.api}")
    if check.device and not resources.device.available:
        return Result(row.api, check.group, row.claimed, "skip", 0.0, SKIPPED, resources.device.reason)
    ctx = CheckContext(row.api, resources)
    recorded: dict[str, Any] = {}  # written by the check thread only
    recorded_waivers: list[str] = []

    def target() -> None:
        try:
            _execute(check, ctx, snapshot, recorded_waivers)
            recorded["observed"] = "pass"
        except CheckSkipped as exc:
            recorded.update(observed="skip", error=str(exc))
        except BaseException as exc:  # any failure of the implementation is a finding, not a crash of the suite
            recorded.update(observed="fail", error=one_line(exc), detail=traceback.format_exc(limit=8))

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"check:{row.short_api}", daemon=True)
    thread.start()
    thread.join(check.timeout)
    # Copy what the check recorded before closing its context: a timed-out check thread keeps running, and the
    # cleanup (e.g. closing its workers) would otherwise let it overwrite the timeout with a consequential error.
    if thread.is_alive():
        outcome: dict[str, Any] = {"observed": "fail", "error": f"timed out after {check.timeout:g} s"}
    else:
        outcome = dict(recorded)
    waived = list(recorded_waivers)
    assertions = list(ctx.assertions)
    duration = time.monotonic() - started
    ctx.close()
    observed = outcome["observed"]
    verdict = verdict_for(row.supported, observed)
    notes = "; ".join(([row.notes] if row.notes not in ("", "-") else []) + waived)
    reason = known_difference(resources.adapter.name, row.api)
    if reason is not None:
        if observed == "fail":
            verdict = KNOWN_DIFFERENCE
            notes = f"known difference: {reason}"
        elif observed == "pass":
            notes = f"listed as known difference but passes (stale entry?): {reason}"
    return Result(row.api, check.group, row.claimed, observed, round(duration, 3), verdict,
                  outcome.get("error", ""), outcome.get("detail", ""), notes, assertions)


def certify(
    rows: Iterable[Row],
    adapter: Adapter,
    device: Device,
    *,
    progress: Callable[[int, int, Result], None] | None = None,
    workdir: Path | None = None,
) -> list[Result]:
    """Run the check of every row (in table order) against ``adapter`` on ``device``."""
    load_checks()
    rows = list(rows)
    snapshot = load_snapshot()
    results: list[Result] = []
    started_ticks = process_start_ticks(os.getpid()) if os.path.exists("/proc") else 0
    began = _now_ticks()
    with tempfile.TemporaryDirectory(prefix="conformance-", dir=workdir) as tmp:
        resources = SuiteResources(adapter, device, Path(tmp))
        try:
            for index, row in enumerate(rows, start=1):
                result = run_row(row, resources, snapshot)
                results.append(result)
                if progress is not None:
                    progress(index, len(rows), result)
        finally:
            resources.close()
            if began is not None:
                _reap_leftovers(max(began, started_ticks))
    return results


def _now_ticks() -> int | None:
    """Clock ticks since boot (the unit of /proc/<pid>/stat start times), or None off Linux."""
    try:
        with open("/proc/uptime") as fh:
            return int(float(fh.read().split()[0]) * os.sysconf("SC_CLK_TCK")) - 1
    except (OSError, ValueError):
        return None


def _reap_leftovers(since_ticks: int) -> None:
    # A check that timed out, or an implementation that leaks workers, must not leave orphans behind the suite.
    leftovers = descendants(os.getpid(), since_ticks)
    if leftovers:
        print(f"conformance: killing {len(leftovers)} process(es) left behind by checks: {leftovers}",
              file=sys.stderr)
        kill_pids(leftovers)


def exit_code(results: Iterable[Result]) -> int:
    return 1 if any(r.verdict in FAILING_VERDICTS for r in results) else 0


class BaselineError(ValueError):
    """The --baseline report cannot be used; one-line message."""


def read_baseline(path: str | Path) -> tuple[str, dict[str, str]]:
    """(``device/backend`` it was certified on, api -> observed) of an earlier report.json."""
    shown = f"--baseline {str(path)!r}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BaselineError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise BaselineError(f"{shown} is not a report.json written by certify ({exc})") from None
    meta = data.get("meta") if isinstance(data, dict) else None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not isinstance(results, list):
        raise BaselineError(f"{shown} is not a report.json written by certify (expected a 'meta' object and a "
                            "'results' list)")
    device = meta.get("device")
    if not isinstance(device, str) or not device:
        raise BaselineError(f"{shown} is not a report.json written by certify (its meta names no device)")
    try:
        observed = {r["api"]: r["observed"] for r in results}
    except (KeyError, TypeError) as exc:
        raise BaselineError(f"{shown} is not a report.json written by certify (a result without "
                            f"api/observed: {exc})") from None
    kind = device.split("->")[-1]
    return f"{kind}/{meta.get('backend') or backend_for(kind)}", observed


def check_baseline_device(path: str | Path, then: str, device_key: str) -> None:
    if then != device_key:
        raise BaselineError(f"--baseline {str(path)!r} was certified on {then}; this run is on {device_key}")


def apply_baseline(results: list[Result], baseline: dict[str, str], source: str) -> list[Result]:
    """A row that passed in the baseline and fails now becomes a REGRESSION, whatever its claim or waiver."""
    for result in results:
        if baseline.get(result.api) == "pass" and result.observed == "fail":
            was = result.verdict
            result.verdict = REGRESSION
            result.notes = "; ".join(x for x in (f"passed in {source}; would be {was} without the baseline",
                                                 result.notes) if x)
    return results
