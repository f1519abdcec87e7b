"""torch.distributed.elastic.multiprocessing: start_processes, PContext, MultiprocessContext, SubprocessContext."""

from __future__ import annotations

import json
import os
import time

from conformance.context import free_port
from conformance.registry import check

M = "multiprocessing"


def _logs_specs(ctx, **kwargs):
    return ctx.get(f"{M}.api.DefaultLogsSpecs")(log_dir=str(ctx.tmpdir / "logs"), **kwargs)


def _start(ctx, name, entrypoint, args, envs, **kwargs):
    pctx = ctx.get(f"{M}.start_processes")(name=name, entrypoint=entrypoint, args=args, envs=envs,
                                           logs_specs=_logs_specs(ctx, **kwargs.pop("logs", {})), **kwargs)
    ctx.add_cleanup(pctx.close)
    return pctx


def _wait(ctx, pctx, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = pctx.wait(timeout=1)
        if result is not None:
            return result
    ctx.expect(False, f"workers did not finish within {timeout} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@check(f"{M}.start_processes", device=True, timeout=120)
def start_processes(ctx) -> None:
    """Two real workers (one per device index) all-reduce over the device's process-group backend."""
    device = ctx.device
    nproc = 2 if device.kind == "cpu" else min(2, device.count)
    port = free_port()
    entry, args = ctx.worker_command("allreduce", str(ctx.tmpdir), device.backend, device.kind)
    envs = {
        r: ctx.worker_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(nproc)
    }
    pctx = _start(ctx, "allreduce", entry, {r: args for r in range(nproc)}, envs)
    result = _wait(ctx, pctx, 100)
    ctx.expect(not result.is_failed(), f"workers failed: {result.failures}")
    expected = float(sum(range(1, nproc + 1)))
    for r in range(nproc):
        out = json.loads((ctx.tmpdir / f"allreduce-rank{r}.json").read_text())
        ctx.expect_equal(out["sum"], expected, f"all-reduce result on rank {r}")
        if device.kind != "cpu":
            ctx.expect_equal(out["device"], f"{device.kind}:{r}", f"rank {r} device (LOCAL_RANK -> device index)")


@check(f"{M}.api.PContext")
def pcontext(ctx) -> None:
    entry, args = ctx.worker_command("sleep", "60")
    pctx = _start(ctx, "sleepers", entry, {0: args, 1: args}, {0: ctx.worker_env(), 1: ctx.worker_env()})
    ctx.expect(isinstance(pctx, ctx.get(f"{M}.api.PContext")), f"start_processes returned {type(pctx).__name__}, not a PContext")
    pids = pctx.pids()
    ctx.expect_equal(sorted(pids), [0, 1], "pids() keys (local ranks)")
    ctx.expect(all(_alive(p) for p in pids.values()), "pids() names processes that are not running")
    ctx.expect(pctx.wait(timeout=0.2) is None, "wait() on running workers should return None after the timeout")
    pctx.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.05)
    ctx.expect(not any(_alive(p) for p in pids.values()), "close() left worker processes alive")


@check(f"{M}.api.MultiprocessContext", timeout=150)  # spawned workers import torch: slow on a loaded machine
def multiprocess_context(ctx) -> None:
    from conformance.workers import square

    pctx = _start(ctx, "square", square, {0: (3,), 1: (4,)}, {0: {}, 1: {}}, start_method="spawn")
    ctx.expect(isinstance(pctx, ctx.get(f"{M}.api.MultiprocessContext")),
               f"function entrypoint gave {type(pctx).__name__}, documented MultiprocessContext")
    result = _wait(ctx, pctx, 140)
    ctx.expect(not result.is_failed(), f"function workers failed: {result.failures}")
    ctx.expect_equal(result.return_values, {0: 9, 1: 16}, "return_values of function workers")


@check(f"{M}.api.SubprocessContext")
def subprocess_context(ctx) -> None:
    std = ctx.get(f"{M}.api.Std")
    entry, ok_args = ctx.worker_command("echo", "hello-from-rank0")
    _, fail_args = ctx.worker_command("exit", "3")
    pctx = _start(ctx, "echo", entry, {0: ok_args, 1: fail_args}, {0: ctx.worker_env(), 1: ctx.worker_env()},
                  logs={"redirects": std.ALL})
    ctx.expect(isinstance(pctx, ctx.get(f"{M}.api.SubprocessContext")),
               f"binary entrypoint gave {type(pctx).__name__}, documented SubprocessContext")
    result = _wait(ctx, pctx, 30)
    ctx.expect(result.is_failed(), "a worker exiting 3 must make the result failed")
    ctx.expect_failed_ranks(result.failures, 1, 3, "failed local ranks")
    stdout0 = result.stdouts.get(0)
    ctx.expect(stdout0 and os.path.exists(stdout0), f"redirected stdout file of rank 0 missing: {stdout0!r}")
    # After a failure the context terminates the rest, so rank 0 may or may not have printed; if it ran to
    # completion its line is in the file.
    if 0 not in result.failures and os.path.getsize(stdout0):
        ctx.expect("hello-from-rank0" in open(stdout0).read(), "redirected stdout lacks the worker's output")


@check(f"{M}.api.RunProcsResult")
def run_procs_result(ctx) -> None:
    rpr = ctx.get(f"{M}.api.RunProcsResult")
    pf = ctx.get(f"{M}.errors.ProcessFailure")
    empty = rpr()
    ctx.expect_equal((empty.return_values, empty.failures, empty.stdouts, empty.stderrs), ({}, {}, {}, {}),
                     "RunProcsResult() defaults")
    ctx.expect(not empty.is_failed(), "RunProcsResult() without failures reports is_failed()")
    failed = rpr(failures={0: pf(local_rank=0, pid=1, exitcode=1, error_file="<none>")})
    ctx.expect(failed.is_failed(), "RunProcsResult with a failure does not report is_failed()")
    entry, args = ctx.worker_command("exit", "0")
    result = _wait(ctx, _start(ctx, "ok", entry, {0: args}, {0: ctx.worker_env()}), 30)
    ctx.expect(isinstance(result, rpr), f"wait() returned {type(result).__name__}, documented RunProcsResult")
    ctx.expect(not result.is_failed() and 0 in result.return_values, f"clean exit result: {result}")
