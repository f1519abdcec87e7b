"""torch.distributed.elastic.timer.debug_info_logging: the hook timer servers call with expired timers."""

from __future__ import annotations

from conformance.registry import check

T = "timer.debug_info_logging"


@check(f"{T}.log_debug_info_for_expired_timers", timeout=60)
def log_debug_info_for_expired_timers(ctx) -> None:
    """In a worker at LOGLEVEL=INFO: an empty mapping logs nothing; expired timers are logged at INFO with the run id,
    the worker pid and the scope ids."""
    proc = ctx.run_python("debug_info_logging", "conf-run-7", env={"LOGLEVEL": "INFO"})
    ctx.expect_equal(proc.returncode, 0, f"log_debug_info_for_expired_timers failed: {proc.stderr.strip()[-300:]!r}")
    before, marker, after = proc.stderr.partition("empty-done")
    ctx.expect(marker, f"the worker did not get past the empty mapping: {proc.stderr[-300:]!r}")
    ctx.expect("Timers expired" not in before, f"an empty mapping logged: {before.strip()[-200:]!r}")
    lines = [ln for ln in after.splitlines() if "Timers expired" in ln]
    ctx.expect(len(lines) == 1, f"expected one 'Timers expired' line, got {after.strip()[-300:]!r}")
    for needle in ("conf-run-7", "4242", "scope-a", "scope-b"):
        ctx.expect(needle in lines[0], f"the expired-timers line lacks {needle!r}: {lines[0]!r}")
    ctx.expect("INFO" in lines[0] or lines[0].startswith("I"), f"not logged at INFO: {lines[0]!r}")
    ctx.expect(ctx.get(f"{T}.log_debug_info_for_expired_timers")("r", {}) is None, "an empty mapping returns None")
