"""torch.distributed.elastic.agent.server: specs, worker groups and real agent runs.

One instrumented LocalElasticAgent run (2 real workers, rank 1 fails on the first attempt, max_restarts=1) is shared
by the rows of the SimpleElasticAgent hooks: each row asserts the documented effect of its own hook in that run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from conformance.adapters import ApiNotFound
from conformance.checks._rdzv import c10d_handler
from conformance.context import run_process_group
from conformance.registry import check

A = "agent.server"
HOOKS = ("_rendezvous", "_assign_worker_ranks", "_initialize_workers", "_start_workers", "_monitor_workers",
         "_restart_workers", "_stop_workers", "_exit_barrier", "_shutdown")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def _instrumented(ctx):
    """A LocalElasticAgent subclass that logs every documented hook call (enter/exit, return value)."""
    base = ctx.get(f"{A}.local_elastic_agent.LocalElasticAgent")

    def wrap(name):
        def hook(self, *args, **kwargs):
            self.calls.append(("enter", name, None))
            value = getattr(base, name)(self, *args, **kwargs)
            extra = None
            if name == "_stop_workers":
                extra = {pid: _alive(pid) for pid in self.started_pids}
            if name == "_start_workers":
                self.started_pids.extend((value or {}).values())
            self.calls.append(("exit", name, (value, extra)))
            return value

        return hook

    def init(self, *args, **kwargs):
        self.calls = []
        self.started_pids = []
        base.__init__(self, *args, **kwargs)

    return type("InstrumentedAgent", (base,), {"__init__": init, **{n: wrap(n) for n in HOOKS}})


def _handler_for_spec(ctx):
    """A real handler when the implementation has one; WorkerSpec itself only stores it."""
    try:
        return c10d_handler(ctx, ctx.run_id("spec"))
    except ApiNotFound:
        return object()


def _spec(ctx, handler, out_dir, fail_mode: str, max_restarts: int, nproc: int = 2, args=None):
    entry, default_args = ctx.worker_command("agent_worker", str(out_dir), fail_mode)
    return ctx.get(f"{A}.WorkerSpec")(
        role="trainer", local_world_size=nproc, rdzv_handler=handler, entrypoint=entry,
        args=args if args is not None else default_args, max_restarts=max_restarts, monitor_interval=0.1,
    )


def _run_agent(ctx, tag: str, fail_mode: str, max_restarts: int):
    out_dir = ctx.resources.workdir / f"agent-{tag}"
    out_dir.mkdir(exist_ok=True)
    run_id = ctx.run_id(tag)
    handler = c10d_handler(ctx, run_id, 1, 1)
    logs = ctx.get("multiprocessing.api.DefaultLogsSpecs")(log_dir=str(out_dir / "logs"))
    agent = _instrumented(ctx)(_spec(ctx, handler, out_dir, fail_mode, max_restarts), logs, start_method="spawn",
                               exit_barrier_timeout=30)
    started = time.monotonic()
    try:
        result = agent.run()
    finally:
        handler.shutdown()
    envs = {p.name: json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    return {"agent": agent, "result": result, "envs": envs, "run_id": run_id, "seconds": time.monotonic() - started}


def shared_run(ctx):
    """Rank 1 fails once, the agent restarts the group, the second attempt succeeds."""
    return ctx.resources.shared("agent_run", lambda: _run_agent(ctx, "restart", "first", 1))


def failing_run(ctx):
    return ctx.resources.shared("agent_fail", lambda: _run_agent(ctx, "fail", "always", 0))


def _calls(run, name, phase="exit"):
    return [payload for ph, n, payload in run["agent"].calls if n == name and ph == phase]


def _order(run):
    return [n for ph, n, _ in run["agent"].calls if ph == "enter"]


def _state(ctx, name):
    return getattr(ctx.get(f"{A}.WorkerState"), name)


@check(f"{A}.ElasticAgent")
def elastic_agent(ctx) -> None:
    base = ctx.get(f"{A}.ElasticAgent")
    ctx.expect_raises(TypeError, base, what="instantiating the abstract ElasticAgent")
    ctx.expect({"run", "get_worker_group"} <= set(base.__abstractmethods__), "run/get_worker_group not abstract")
    ctx.expect(issubclass(ctx.get(f"{A}.local_elastic_agent.LocalElasticAgent"), base),
               "LocalElasticAgent is not an ElasticAgent")


@check(f"{A}.ElasticAgent.get_worker_group", timeout=90)
def get_worker_group(ctx) -> None:
    run = shared_run(ctx)
    group = run["agent"].get_worker_group()
    ctx.expect(isinstance(group, ctx.get(f"{A}.WorkerGroup")), f"get_worker_group() gave {type(group).__name__}")
    ctx.expect_equal(group.state, _state(ctx, "SUCCEEDED"), "worker group state after a successful run")
    ctx.expect_equal(group.spec.role, "trainer", "worker group spec role")
    ctx.expect_equal(sorted(w.global_rank for w in group.workers), [0, 1], "global ranks of the group's workers")
    ctx.expect_equal((group.group_rank, group.group_world_size), (0, 1), "group rank / world size of a 1-node job")


@check(f"{A}.ElasticAgent.run", timeout=90)
def agent_run(ctx) -> None:
    run = shared_run(ctx)
    result = run["result"]
    ctx.expect_equal(result.state, _state(ctx, "SUCCEEDED"), "run() state after a recovered failure")
    ctx.expect(not result.is_failed(), "run() result of a successful job is_failed()")
    ctx.expect_equal(sorted(result.return_values), [0, 1], "run() return_values keyed by global rank")
    failed = failing_run(ctx)["result"]
    ctx.expect_equal(failed.state, _state(ctx, "FAILED"), "run() state when a worker always exits 3 (max_restarts=0)")
    ctx.expect(failed.is_failed(), "failed run() result is not is_failed()")
    ctx.expect_failed_ranks(failed.failures, 1, 3, "failed global ranks")


@check(f"{A}.WorkerSpec")
def worker_spec(ctx) -> None:
    ws = ctx.get(f"{A}.WorkerSpec")
    handler = _handler_for_spec(ctx)
    spec = ws(role="r", local_world_size=3, rdzv_handler=handler, entrypoint="/bin/true")
    ctx.expect_equal((spec.role, spec.local_world_size, spec.entrypoint, spec.args, spec.max_restarts,
                      spec.monitor_interval), ("r", 3, "/bin/true", (), 3, 0.1), "WorkerSpec fields and defaults")
    ctx.expect(spec.rdzv_handler is handler, "WorkerSpec.rdzv_handler")
    ctx.expect_raises((AssertionError, ValueError), ws, role="r", local_world_size=0, rdzv_handler=handler,
                      entrypoint="/bin/true", what="WorkerSpec with local_world_size=0")


@check(f"{A}.WorkerSpec.get_entrypoint_name")
def get_entrypoint_name(ctx) -> None:
    ws = ctx.get(f"{A}.WorkerSpec")
    handler = _handler_for_spec(ctx)
    by_path = ws(role="r", local_world_size=1, rdzv_handler=handler, entrypoint="/usr/local/bin/train_job")
    ctx.expect_equal(by_path.get_entrypoint_name(), "train_job", "get_entrypoint_name() of a binary path")

    def my_train_fn():
        return 0

    by_fn = ws(role="r", local_world_size=1, rdzv_handler=handler, entrypoint=my_train_fn)
    ctx.expect_equal(by_fn.get_entrypoint_name(), my_train_fn.__qualname__,
                     "get_entrypoint_name() of a function (its __qualname__)")


@check(f"{A}.WorkerState")
def worker_state(ctx) -> None:
    ws = ctx.get(f"{A}.WorkerState")
    ctx.expect_equal([m for m in ws.__members__], ["UNKNOWN", "INIT", "HEALTHY", "UNHEALTHY", "STOPPED", "SUCCEEDED",
                                                   "FAILED"], "WorkerState members")
    ctx.expect_equal(ws.SUCCEEDED, ws["SUCCEEDED"], "WorkerState lookup by name")


@check(f"{A}.WorkerState.is_running")
def worker_state_is_running(ctx) -> None:
    ws = ctx.get(f"{A}.WorkerState")
    running = {s.name for s in ws if ws.is_running(s)}
    ctx.expect_equal(running, {"HEALTHY", "UNHEALTHY"}, "states for which is_running() is True")


@check(f"{A}.Worker")
def worker(ctx) -> None:
    w = ctx.get(f"{A}.Worker")(local_rank=2)
    ctx.expect_equal((w.local_rank, w.global_rank, w.role_rank, w.world_size, w.role_world_size),
                     (2, -1, -1, -1, -1), "Worker(local_rank=2) fields and defaults")
    ctx.expect(w.id is None, f"a Worker that was not started has id None, got {w.id!r}")
    full = ctx.get(f"{A}.Worker")(local_rank=1, global_rank=5, role_rank=3, world_size=8, role_world_size=4)
    ctx.expect_equal((full.global_rank, full.role_rank, full.world_size, full.role_world_size), (5, 3, 8, 4),
                     "Worker fields")


@check(f"{A}.WorkerGroup")
def worker_group(ctx) -> None:
    handler = _handler_for_spec(ctx)
    spec = ctx.get(f"{A}.WorkerSpec")(role="r", local_world_size=3, rdzv_handler=handler, entrypoint="/bin/true")
    group = ctx.get(f"{A}.WorkerGroup")(spec)
    ctx.expect(group.spec is spec, "WorkerGroup.spec")
    ctx.expect_equal([w.local_rank for w in group.workers], [0, 1, 2], "one worker per local rank")
    ctx.expect_equal(group.state, _state(ctx, "INIT"), "initial WorkerGroup state")
    ctx.expect(group.store is None and group.group_rank is None, "store/group_rank before the rendezvous")


@check(f"{A}.local_elastic_agent.LocalElasticAgent", device=True, timeout=150)
def local_elastic_agent(ctx) -> None:
    """The agent runs a real worker group that all-reduces on the device; env as documented."""
    run = shared_run(ctx)
    envs = run["envs"]
    for rank in (0, 1):
        env = envs.get(f"rank{rank}-restart1.json")
        ctx.expect(env is not None, f"no worker env recorded for rank {rank} on the second attempt: {sorted(envs)}")
        want = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_NAME": "trainer", "TORCHELASTIC_RESTART_COUNT": "1",
                "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RUN_ID": run["run_id"]}
        got = {k: env.get(k) for k in want}
        ctx.expect_equal(got, want, f"worker env of rank {rank}")
        ctx.expect(env.get("MASTER_ADDR") and env.get("MASTER_PORT"), f"MASTER_ADDR/PORT missing for rank {rank}")
    device = ctx.device
    nproc = 2 if device.kind == "cpu" else min(2, device.count)
    out_dir = ctx.tmpdir
    handler = c10d_handler(ctx, ctx.run_id("device"), 1, 1)
    entry, args = ctx.worker_command("allreduce", str(out_dir), device.backend, device.kind)
    spec = _spec(ctx, handler, out_dir, "never", 0, nproc=nproc, args=args)
    logs = ctx.get("multiprocessing.api.DefaultLogsSpecs")(log_dir=str(out_dir / "logs"))
    agent = ctx.get(f"{A}.local_elastic_agent.LocalElasticAgent")(spec, logs, start_method="spawn")
    result = agent.run()
    ctx.expect(not result.is_failed(), f"device worker group failed: {result.failures}")
    for r in range(nproc):
        out = json.loads((out_dir / f"allreduce-rank{r}.json").read_text())
        ctx.expect_equal(out["sum"], float(sum(range(1, nproc + 1))), f"all-reduce on rank {r} via {device.backend}")
        if device.kind != "cpu":
            ctx.expect_equal(out["device"], f"{device.kind}:{out['local_rank']}", "LOCAL_RANK -> device index")
    _launcher_job(ctx, nproc)


def _launcher_job(ctx, nproc: int) -> None:
    """End to end: the implementation's torchrun-equivalent runs the same all-reduce job (standalone)."""
    device = ctx.device
    out_dir = ctx.tmpdir / "launcher"
    out_dir.mkdir()
    # "gpu" asks the launcher itself to count the devices (one worker per GPU).
    nproc_arg = "gpu" if device.kind == "cuda" else str(nproc)
    cmd = [*ctx.adapter.launcher_command(), "--standalone", "--nproc-per-node", nproc_arg, "--max-restarts", "0",
           "--monitor-interval", "0.1", "-m", "conformance.workers", "allreduce", str(out_dir), device.backend,
           device.kind]
    env = dict(os.environ)
    env.update(ctx.worker_env())
    try:
        proc = run_process_group(cmd, 120, env, str(ctx.tmpdir))
    except subprocess.TimeoutExpired:
        ctx.expect(False, f"launcher job did not finish in 120 s: {' '.join(cmd[1:4])}")
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    ctx.expect_equal(proc.returncode, 0, f"exit status of `{' '.join(cmd[1:3])} --standalone` ({tail})")
    expected_workers = device.count if device.kind == "cuda" else nproc
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("allreduce-rank*.json"))]
    ctx.expect_equal(len(results), expected_workers, "workers started by the launcher")
    total = float(sum(range(1, expected_workers + 1)))
    ctx.expect(all(r["sum"] == total for r in results), f"launcher job all-reduce results {results}")


@check(f"{A}.SimpleElasticAgent", timeout=90)
def simple_elastic_agent(ctx) -> None:
    sea = ctx.get(f"{A}.SimpleElasticAgent")
    ctx.expect_raises(TypeError, sea, None, what="instantiating the abstract SimpleElasticAgent")
    ctx.expect(issubclass(ctx.get(f"{A}.local_elastic_agent.LocalElasticAgent"), sea), "LocalElasticAgent base")
    order = _order(shared_run(ctx))
    first = [n for n in order if n in ("_initialize_workers", "_rendezvous", "_start_workers", "_monitor_workers")][:4]
    ctx.expect_equal(first, ["_initialize_workers", "_rendezvous", "_start_workers", "_monitor_workers"],
                     "hook order of a run's first attempt")
    ctx.expect(order.index("_exit_barrier") < len(order) - 1 - order[::-1].index("_shutdown"),
               f"no shutdown after the exit barrier: {order}")


@check(f"{A}.SimpleElasticAgent._assign_worker_ranks", timeout=90)
def assign_worker_ranks(ctx) -> None:
    run = shared_run(ctx)
    returned = _calls(run, "_assign_worker_ranks")
    ctx.expect(returned, "_assign_worker_ranks was never called during rendezvous")
    workers = returned[-1][0]
    ctx.expect_equal(sorted((w.local_rank, w.global_rank, w.role_rank, w.world_size, w.role_world_size) for w in workers),
                     [(0, 0, 0, 2, 2), (1, 1, 1, 2, 2)], "(local, global, role rank, world, role world) assigned")
    order = _order(run)
    ctx.expect(order.index("_rendezvous") < order.index("_assign_worker_ranks") < order.index("_start_workers"),
               f"_assign_worker_ranks not between rendezvous and start: {order}")


@check(f"{A}.SimpleElasticAgent._exit_barrier", timeout=90)
def exit_barrier(ctx) -> None:
    run = shared_run(ctx)
    order = _order(run)
    ctx.expect_equal(order.count("_exit_barrier"), 1, "exit barrier calls in a successful run")
    last_monitor = _calls(run, "_monitor_workers")[-1][0]
    ctx.expect_equal(last_monitor.state, _state(ctx, "SUCCEEDED"), "monitor state right before the exit barrier")
    ctx.expect(len(order) - 1 - order[::-1].index("_monitor_workers") < order.index("_exit_barrier"),
               f"exit barrier before the final monitor: {order}")


@check(f"{A}.SimpleElasticAgent._initialize_workers", timeout=90)
def initialize_workers(ctx) -> None:
    run = shared_run(ctx)
    ctx.expect_equal(_order(run).count("_initialize_workers"), 2, "initialize calls (first attempt + one restart)")
    ctx.expect(all(f"rank{r}-restart{a}.json" in run["envs"] for r in (0, 1) for a in (0, 1)),
               f"workers of both attempts did not all start: {sorted(run['envs'])}")


@check(f"{A}.SimpleElasticAgent._monitor_workers", timeout=90)
def monitor_workers(ctx) -> None:
    run = shared_run(ctx)
    states = [value.state for value, _ in _calls(run, "_monitor_workers")]
    ctx.expect(_state(ctx, "FAILED") in states, f"monitor never reported the first attempt FAILED: {states}")
    ctx.expect_equal(states[-1], _state(ctx, "SUCCEEDED"), "last monitor state")
    failed = next(value for value, _ in _calls(run, "_monitor_workers") if value.state == _state(ctx, "FAILED"))
    ctx.expect_failed_ranks(failed.failures, 1, 3, "failed ranks reported by the monitor")


@check(f"{A}.SimpleElasticAgent._rendezvous", timeout=90)
def rendezvous_hook(ctx) -> None:
    run = shared_run(ctx)
    ctx.expect_equal(_order(run).count("_rendezvous"), 2, "rendezvous rounds (first attempt + restart)")
    group = run["agent"].get_worker_group()
    ctx.expect(group.store is not None, "the worker group has no store after rendezvous")
    ctx.expect_equal((group.group_rank, group.group_world_size), (0, 1), "group rank/world size set by rendezvous")


@check(f"{A}.SimpleElasticAgent._restart_workers", timeout=90)
def restart_workers(ctx) -> None:
    run = shared_run(ctx)
    order = _order(run)
    ctx.expect_equal(order.count("_restart_workers"), 1, "restarts with max_restarts=1 and one failure")
    ctx.expect_equal(run["envs"]["rank1-restart1.json"]["TORCHELASTIC_RESTART_COUNT"], "1", "restart count seen by workers")
    failing = failing_run(ctx)
    ctx.expect_equal(_order(failing).count("_restart_workers"), 0, "restarts with max_restarts=0")


@check(f"{A}.SimpleElasticAgent._shutdown", timeout=90)
def shutdown_hook(ctx) -> None:
    run = shared_run(ctx)
    # (LocalElasticAgent's _stop_workers may shut the pcontext down through _shutdown too: only the last counts.)
    ctx.expect_equal(_order(run)[-1], "_shutdown", "the last hook of run()")
    alive = [pid for pid in run["agent"].started_pids if _alive(pid)]
    ctx.expect(not alive, f"worker processes alive after shutdown: {alive}")


@check(f"{A}.SimpleElasticAgent._start_workers", timeout=90)
def start_workers(ctx) -> None:
    run = shared_run(ctx)
    started = [value for value, _ in _calls(run, "_start_workers")]
    ctx.expect_equal(len(started), 2, "start calls (first attempt + restart)")
    for attempt, pids in enumerate(started):
        ctx.expect_equal(sorted(pids), [0, 1], f"_start_workers() keys on attempt {attempt}")
        for local_rank, pid in pids.items():
            env = run["envs"].get(f"rank{local_rank}-restart{attempt}.json", {})
            ctx.expect_equal(env.get("pid"), pid, f"pid returned for local rank {local_rank}, attempt {attempt}")


@check(f"{A}.SimpleElasticAgent._stop_workers", timeout=90)
def stop_workers(ctx) -> None:
    run = shared_run(ctx)
    stops = _calls(run, "_stop_workers")
    ctx.expect(stops, "_stop_workers was not called when restarting a failed group")
    _, alive_after = stops[0]
    first_attempt = [p for p in run["agent"].started_pids[:2]]
    ctx.expect(not any(alive_after.get(p) for p in first_attempt), f"workers alive after _stop_workers: {alive_after}")
    order = _order(run)
    ctx.expect(order.index("_restart_workers") < order.index("_stop_workers"), f"stop not within restart: {order}")


@check(f"{A}.api.RunResult", timeout=90)
def run_result(ctx) -> None:
    rr = ctx.get(f"{A}.api.RunResult")
    ws = ctx.get(f"{A}.WorkerState")
    ok = rr(state=ws.SUCCEEDED)
    ctx.expect_equal((ok.return_values, ok.failures), ({}, {}), "RunResult defaults")
    ctx.expect(not ok.is_failed() and rr(state=ws.FAILED).is_failed(), "is_failed() is True iff state is FAILED")
    ctx.expect(isinstance(shared_run(ctx)["result"], rr), "agent.run() does not return a RunResult")
    ctx.expect(ctx.get(f"{A}.RunResult") is rr, "agent.server.RunResult differs from agent.server.api.RunResult")


