"""torch.distributed.elastic.multiprocessing: start_processes, PContext, MultiprocessContext, SubprocessContext."""

from __future__ import annotations

import json
import os
import tempfile
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
    started = time.monotonic()
    ctx.expect(pctx.wait(timeout=0.5) is None, "wait() on running workers should return None after the timeout")
    waited = time.monotonic() - started
    ctx.expect(0.45 <= waited < 5, f"wait(timeout=0.5) on running workers returned after {waited:.2f} s")
    pctx.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.05)
    ctx.expect(not any(_alive(p) for p in pids.values()), "close() left worker processes alive")
    # The workers close() stopped did not succeed: a poll afterwards reports them failed (by their signal).
    stopped = pctx.wait(timeout=0)
    ctx.expect(stopped is not None and stopped.is_failed() and set(stopped.failures) == {0, 1}
               and all(f.exitcode != 0 for f in stopped.failures.values()),
               f"wait(0) after close() must report both stopped workers failed, got {stopped}")
    # close() delivers death_sig (SIGTERM by default) first, so a worker can clean up before the SIGKILL.
    marker = ctx.tmpdir / "sigterm-seen"
    entry, args = ctx.worker_command("trap_sigterm", str(marker))
    trapper = _start(ctx, "trapper", entry, {0: args}, {0: ctx.worker_env()})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (ctx.tmpdir / "sigterm-seen.ready").exists():
        time.sleep(0.02)
    ctx.expect((ctx.tmpdir / "sigterm-seen.ready").exists(), "the SIGTERM-trapping worker never got ready")
    trapper.close()
    ctx.expect(marker.exists(), "close() never delivered SIGTERM (the default death_sig) to a worker before killing it")
    _close_grace(ctx)
    _user_subclass(ctx)


CLOSE_GRACE_S = 1.0  # close(timeout=...) given to a worker that ignores SIGTERM
CLOSE_BOUND_S = 8.0  # slack for a loaded machine; a grace that fell back to the 30 s default still fails it


def _close_grace(ctx) -> None:
    """close(death_sig, timeout) is documented to wait ``timeout`` for the processes to finish after death_sig, then
    SIGKILL them: a worker that ignores SIGTERM gets the signal, lives through (most of) the grace, and is gone when
    close() returns, not much later than the grace."""
    marker = ctx.tmpdir / "sigterm-ignored"
    entry, args = ctx.worker_command("ignore_sigterm", str(marker))
    stubborn = _start(ctx, "stubborn", entry, {0: args}, {0: ctx.worker_env()})
    ready = ctx.tmpdir / "sigterm-ignored.ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ready.exists():
        time.sleep(0.02)
    ctx.expect(ready.exists(), "the SIGTERM-ignoring worker never got ready")
    pid = stubborn.pids()[0]
    started = time.monotonic()
    stubborn.close(timeout=CLOSE_GRACE_S)
    took = time.monotonic() - started
    ctx.expect(not _alive(pid), f"close(timeout={CLOSE_GRACE_S}) returned with a SIGTERM-ignoring worker still running")
    ctx.expect(took <= CLOSE_GRACE_S + CLOSE_BOUND_S,
               f"close(timeout={CLOSE_GRACE_S}) took {took:.2f} s to end a worker that ignores SIGTERM")
    if not marker.exists():
        ctx.expect(False, f"close(timeout={CLOSE_GRACE_S}) killed a SIGTERM-ignoring worker without delivering SIGTERM "
                          "(the default death_sig) first")
        return
    alive = ctx.tmpdir / "sigterm-ignored.alive"
    lived = float(alive.read_text()) - float(marker.read_text()) if alive.exists() else 0.0
    ctx.expect(lived >= CLOSE_GRACE_S / 2,
               f"a worker that ignores SIGTERM was seen running only {lived:.2f} s after it, not through "
               f"close()'s grace ({CLOSE_GRACE_S} s): killed before its timeout")


def _user_subclass(ctx) -> None:
    """A PContext subclass implementing the documented abstract methods (_start, _poll, pids, _close) works."""
    base, rpr = ctx.get(f"{M}.api.PContext"), ctx.get(f"{M}.api.RunProcsResult")

    class Finished(base):
        def _start(self):
            self.started = True

        def _poll(self):
            return rpr(return_values=dict.fromkeys(range(self.nprocs)))

        def pids(self):
            return {}

        def _close(self, death_sig, timeout=30):
            self.closed = True

    try:
        own = Finished("own", "unused", {0: ()}, {0: {}}, _logs_specs(ctx))
    except TypeError as e:
        ctx.expect(False, f"a PContext subclass with _start, _poll, pids and _close cannot be instantiated: {e}")
        return
    own.start()
    result = own.wait(timeout=1, period=0.01)
    own.close()
    ctx.expect(own.started and own.closed and result is not None and result.return_values == {0: None},
               f"a user's PContext subclass: start/wait/close did not use its methods (result {result})")


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
    # redirects=ALL + tee=ALL: the lines go to the log files AND both reach the parent's console.
    teed = ctx.run_python("tee_run", str(ctx.tmpdir / "tee-logs"), timeout=90)
    tail = (teed.stderr.strip().splitlines() or [""])[-1]
    ctx.expect_equal(teed.returncode, 0, f"exit status of a tee=ALL run ({tail})")
    ctx.expect("teed-line" in teed.stdout, f"tee=ALL: the worker's stdout line is not on the console: {teed.stdout!r}")
    ctx.expect("err:teed-line" in teed.stderr, "tee=ALL: the worker's stderr line is not on the console")
    logged = {p.name: p.read_text() for p in (ctx.tmpdir / "tee-logs").rglob("std*.log")}
    ctx.expect("teed-line" in logged.get("stdout.log", "") and "err:teed-line" in logged.get("stderr.log", ""),
               f"tee=ALL with redirects=ALL: the log files lack the lines: {logged}")


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
    # documented: stdouts/stderrs map every local rank, "empty string if no redirect"
    ctx.expect_equal((result.stdouts, result.stderrs), ({0: ""}, {0: ""}), "stdouts/stderrs without redirects")


def _custom_logs_run(ctx):
    """One real worker started with a user-written LogsSpecs subclass: what reify() got, and the files it chose."""

    def produce():
        base = ctx.get(f"{M}.api.LogsSpecs")
        dest_cls = ctx.get(f"{M}.api.LogsDest")
        log_dir = ctx.resources.workdir / "custom-logs"
        log_dir.mkdir(exist_ok=True)
        seen: dict = {}

        class FileLogsSpecs(base):
            def reify(self, envs):
                seen["envs"] = {rank: dict(env) for rank, env in envs.items()}
                return dest_cls(stdouts={0: str(log_dir / "out-0.log")}, stderrs={0: str(log_dir / "err-0.log")},
                                tee_stdouts={}, tee_stderrs={}, error_files={0: str(log_dir / "error-0.json")})

            @property
            def root_log_dir(self) -> str:
                return str(log_dir)

        entry, args = ctx.worker_command("echo", "custom-logs-marker")
        pctx = ctx.get(f"{M}.start_processes")(name="custom-logs", entrypoint=entry, args={0: args},
                                               envs={0: ctx.worker_env({"CONFORMANCE_MARK": "m0"})},
                                               logs_specs=FileLogsSpecs(log_dir=str(log_dir)))
        try:
            result = _wait(ctx, pctx, 60)
        finally:
            pctx.close()
        return {"seen": seen, "result": result, "log_dir": log_dir}

    return ctx.resources.shared("custom-logs-specs-run", produce)


@check(f"{M}.api.LogsSpecs", timeout=90)
def logs_specs(ctx) -> None:
    base = ctx.get(f"{M}.api.LogsSpecs")
    ctx.expect_raises(TypeError, base, what="LogsSpecs() (abstract: reify and root_log_dir)")
    run = _custom_logs_run(ctx)
    ctx.expect(not run["result"].is_failed(), f"worker with a custom LogsSpecs failed: {run['result'].failures}")
    out = run["log_dir"] / "out-0.log"
    ctx.expect(out.exists() and "custom-logs-marker" in out.read_text(),
               "stdout did not go to the file the custom LogsSpecs chose")


@check(f"{M}.api.LogsSpecs.reify", timeout=90)
def logs_specs_reify(ctx) -> None:
    run = _custom_logs_run(ctx)
    envs = run["seen"].get("envs")
    ctx.expect(envs is not None, "start_processes never called reify()")
    ctx.expect_equal(sorted(envs), [0], "reify() envs keys (local ranks)")
    ctx.expect_equal(envs[0].get("CONFORMANCE_MARK"), "m0", "reify() got the worker's environment")


@check(f"{M}.api.LogsDest", timeout=90)
def logs_dest(ctx) -> None:
    empty = ctx.get(f"{M}.api.LogsDest")()
    ctx.expect_equal((empty.stdouts, empty.stderrs, empty.tee_stdouts, empty.tee_stderrs, empty.error_files),
                     ({}, {}, {}, {}, {}), "LogsDest() defaults")
    ctx.expect(empty.stdouts is not ctx.get(f"{M}.api.LogsDest")().stdouts, "LogsDest instances share one dict")
    run = _custom_logs_run(ctx)
    err = run["log_dir"] / "err-0.log"
    ctx.expect(err.exists() and "err:custom-logs-marker" in err.read_text(),
               "stderr did not go to LogsDest.stderrs[0]")
    ctx.expect_equal(run["result"].stdouts.get(0), str(run["log_dir"] / "out-0.log"),
                     "RunProcsResult.stdouts reports LogsDest.stdouts")


def _layout(dest) -> tuple[dict, ...]:
    """A LogsDest's per-rank paths as '<rank>/<file>' below the attempt folder ('' for the console)."""
    def rel(paths: dict) -> dict:
        return {rank: "/".join(p.split("/")[-2:]) if p else "" for rank, p in paths.items()}

    return rel(dest.stdouts), rel(dest.stderrs), rel(dest.tee_stdouts), rel(dest.tee_stderrs)


def _reify_two_ranks(ctx, **kwargs):
    specs = ctx.get(f"{M}.api.DefaultLogsSpecs")(log_dir=str(ctx.tmpdir / "default-logs"), **kwargs)
    envs = {r: {"TORCHELASTIC_RUN_ID": "conf-run", "TORCHELASTIC_RESTART_COUNT": "0"} for r in range(2)}
    return specs, specs.reify(envs)


@check(f"{M}.api.DefaultLogsSpecs")
def default_logs_specs(ctx) -> None:
    specs = ctx.get(f"{M}.api.DefaultLogsSpecs")
    log_dir = ctx.tmpdir / "created" / "here"
    ctx.expect_equal(specs(log_dir=str(log_dir)).root_log_dir, str(log_dir), "root_log_dir")
    ctx.expect(log_dir.is_dir(), "DefaultLogsSpecs(log_dir) did not create a missing log_dir")
    a_file = ctx.tmpdir / "a-file"
    a_file.write_text("")
    ctx.expect_raises(NotADirectoryError, specs, log_dir=str(a_file), what="DefaultLogsSpecs(log_dir=<a file>)")
    default = specs()
    ctx.expect(ctx.get(f"{M}.api.LogsSpecs") in type(default).__mro__, "DefaultLogsSpecs is not a LogsSpecs")
    # log_dir=None (the default): a fresh folder of its own in the temp dir.
    root = default.root_log_dir
    ctx.expect(root and os.path.isdir(root) and os.path.dirname(root) == tempfile.gettempdir()
               and os.path.basename(root).startswith("torchelastic_") and root != specs().root_log_dir,
               f"DefaultLogsSpecs() root_log_dir {root!r}: a new torchelastic_* folder in {tempfile.gettempdir()!r}")


@check(f"{M}.api.DefaultLogsSpecs.reify")
def default_logs_specs_reify(ctx) -> None:
    std = ctx.get(f"{M}.api.Std")
    specs, dest = _reify_two_ranks(ctx, redirects=std.ALL, tee=std.ERR)
    for rank in range(2):
        out, err = dest.stdouts[rank], dest.stderrs[rank]
        for path, name in ((out, "stdout.log"), (err, "stderr.log"), (dest.error_files[rank], "error.json")):
            ctx.expect(path.endswith(f"attempt_0/{rank}/{name}"), f"rank {rank} {name} path: {path!r}")
            ctx.expect(path.startswith(specs.root_log_dir), f"{path!r} is not under log_dir")
        ctx.expect(os.path.isdir(os.path.dirname(out)), f"{out!r}: its folder is missing")
        ctx.expect_equal(dest.tee_stderrs.get(rank), err, f"rank {rank} tee=ERR duplicates stderr")
        ctx.expect(rank not in dest.tee_stdouts, f"rank {rank}: stdout teed though tee=ERR")
    run_dir = os.path.basename(dest.stdouts[0].split("/attempt_0/")[0])
    ctx.expect(run_dir.startswith("conf-run"), f"the run's folder {run_dir!r} does not start with the run id")
    _, plain = _reify_two_ranks(ctx)
    ctx.expect_equal((plain.stdouts.get(0, ""), plain.stderrs.get(0, "")), ("", ""),
                     "redirects=NONE: no file, the console (an empty path or none)")
    # Per-rank maps: a rank missing from the map gets Std.NONE; teeing a stream needs (and makes) its file.
    _, mapped = _reify_two_ranks(ctx, redirects={0: std.OUT}, tee={1: std.ERR})
    ctx.expect_equal(_layout(mapped), ({0: "0/stdout.log", 1: ""}, {0: "", 1: "1/stderr.log"}, {}, {1: "1/stderr.log"}),
                     "(stdouts, stderrs, tee_stdouts, tee_stderrs) of redirects={0: OUT}, tee={1: ERR}")
    # local_ranks_filter narrows what is teed to the console, not what is written to the files.
    _, filtered = _reify_two_ranks(ctx, tee=std.ALL, local_ranks_filter={1})
    ctx.expect_equal(_layout(filtered), ({0: "0/stdout.log", 1: "1/stdout.log"}, {0: "0/stderr.log", 1: "1/stderr.log"},
                                         {1: "1/stdout.log"}, {1: "1/stderr.log"}),
                     "(stdouts, stderrs, tee_stdouts, tee_stderrs) of tee=ALL, local_ranks_filter={1}")
