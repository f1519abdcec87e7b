"""torch.distributed.elastic.agent.server: specs, worker groups and real agent runs.

One instrumented LocalElasticAgent run (2 real workers, rank 1 fails on the first attempt, max_restarts=1) is shared
by the rows of the SimpleElasticAgent hooks: each row asserts the documented effect of its own hook in that run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
import warnings

from conformance.adapters import ApiNotFound
from conformance.checks._rdzv import Concurrent, c10d_handler, in_threads
from conformance.context import kill_pids, run_process_group
from conformance.registry import check
from conformance.workers import NO_COLLECTIVE

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


def _device_args(ctx, workers: int) -> tuple[tuple[str, str], str | None]:
    """Worker arguments (backend, device kind) that make a scenario's workers form their process group and
    all-reduce on the certified device -- or, when this machine has too few devices for the scenario's nodes (they
    share it, one device per worker), no collective and the reason the device part cannot be exercised."""
    device = ctx.device
    if device.kind != "cpu" and device.count < workers:
        return (NO_COLLECTIVE, device.kind), (f"device part not exercised: {workers} workers at once need {workers} "
                                             f"{device.kind} devices on this machine, found {device.count}")
    return (device.backend, device.kind), None


def _spec(ctx, handler, out_dir, fail_mode: str, max_restarts: int, nproc: int = 2, args=None, collective=None):
    entry, default_args = ctx.worker_command("agent_worker", str(out_dir), fail_mode,
                                             *(collective or (NO_COLLECTIVE, "cpu")))
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
    collective, device_skip = _device_args(ctx, 2)
    agent = _instrumented(ctx)(_spec(ctx, handler, out_dir, fail_mode, max_restarts, collective=collective), logs,
                               start_method="spawn", exit_barrier_timeout=30)
    started = time.monotonic()
    try:
        with _unshared_rendezvous_store():
            result = agent.run()
    finally:
        handler.shutdown()
    envs = {p.name: json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    return {"agent": agent, "result": result, "envs": envs, "run_id": run_id, "seconds": time.monotonic() - started,
            "device_skip": device_skip}


def shared_run(ctx):
    """Rank 1 fails once, the agent restarts the group, the second attempt succeeds."""
    return ctx.resources.shared("agent_run", lambda: _run_agent(ctx, "restart", "first", 1))


def failing_run(ctx):
    return ctx.resources.shared("agent_fail", lambda: _run_agent(ctx, "fail", "always", 0))


NPROC = 2  # workers per node in the multi-node scenarios
SHARE_OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
LATE_SECONDS = 1.5  # how much later than the other node's the late node's workers finish


def _node_agent(ctx, handler, out_dir, full_world_size: int, late_group_rank: int = -1,
                late_seconds: float = LATE_SECONDS, exit_barrier_timeout: float = 30, collective=None):
    """An instrumented agent of one node of a multi-node job (``node_worker`` workers)."""
    _, args = ctx.worker_command("node_worker", str(out_dir), str(late_group_rank), str(late_seconds),
                                 str(full_world_size), *(collective or (NO_COLLECTIVE, "cpu")))
    spec = _spec(ctx, handler, out_dir, "never", 0, nproc=NPROC, args=args)
    logs = ctx.get("multiprocessing.api.DefaultLogsSpecs")(log_dir=str(out_dir / f"logs-{ctx.run_id('node')}"))
    return _instrumented(ctx)(spec, logs, start_method="spawn", exit_barrier_timeout=exit_barrier_timeout)


def _run_node(agent, handler):
    """One node: run the agent, note the wall-clock time run() returned (for the exit barrier), shut down."""
    try:
        result = agent.run()
        return result, time.time()
    finally:
        handler.shutdown()


def _node_records(out_dir, full_world_size: int | None = None):
    """Worker records of a multi-node scenario (env + pid, and ``done``: when it finished), by pid."""
    records = {}
    for path in out_dir.glob("w*.json"):
        env = json.loads(path.read_text())
        done = path.with_suffix(".done")
        env["done"] = float(done.read_text()) if done.exists() else None
        records[env["pid"]] = env
    if full_world_size is not None:
        records = {pid: env for pid, env in records.items() if env["WORLD_SIZE"] == str(full_world_size)}
    return records


def _multinode_run(ctx, tag: str = "multinode", late_seconds: float = LATE_SECONDS, exit_barrier_timeout: float = 30):
    """2 agents x 2 workers over one c10d rendezvous; group rank 1's workers finish late_seconds after group 0's."""
    out_dir = ctx.resources.workdir / f"agent-{tag}"
    out_dir.mkdir(exist_ok=True)
    run_id = ctx.run_id(tag)
    handlers = [c10d_handler(ctx, run_id, 2, 2) for _ in range(2)]
    collective, device_skip = _device_args(ctx, 2 * NPROC)
    agents = [_node_agent(ctx, h, out_dir, 2 * NPROC, 1, late_seconds, exit_barrier_timeout, collective)
              for h in handlers]
    with _unshared_rendezvous_store():
        outcomes = in_threads(ctx, [functools.partial(_run_node, a, h) for a, h in zip(agents, handlers, strict=True)],
                              60)
    workers = _node_records(out_dir)
    ctx.add_cleanup(lambda: kill_pids(list(workers)))
    return {"agents": agents, "results": [r for r, _ in outcomes], "returned_at": [t for _, t in outcomes],
            "workers": workers, "run_id": run_id, "device_skip": device_skip}


def multinode_run(ctx):
    return ctx.resources.shared("agent_multinode", lambda: _multinode_run(ctx))


BARRIER_TIMEOUT_S = 1.0  # exit_barrier_timeout of the scenario where the other node is 3 s late


def barrier_timeout_run(ctx):
    """As multinode_run, but group rank 1's workers finish 3 s late and the exit barrier times out after 1 s."""
    return ctx.resources.shared("agent_barrier_timeout", lambda: _multinode_run(
        ctx, "barrier-timeout", late_seconds=3 * BARRIER_TIMEOUT_S, exit_barrier_timeout=BARRIER_TIMEOUT_S))


def _membership_run(ctx):
    """2 agents (min 2, max 3 nodes) run healthy workers; a third agent joins; all restart at 3 nodes."""
    out_dir = ctx.resources.workdir / "agent-membership"
    out_dir.mkdir(exist_ok=True)
    run_id = ctx.run_id("membership")
    handlers = [c10d_handler(ctx, run_id, 2, 3) for _ in range(3)]
    collective, device_skip = _device_args(ctx, 3 * NPROC)
    agents = [_node_agent(ctx, h, out_dir, 3 * NPROC, collective=collective) for h in handlers]
    nodes = [functools.partial(_run_node, a, h) for a, h in zip(agents, handlers, strict=True)]
    with _unshared_rendezvous_store():
        return {**_join_third_node(ctx, out_dir, agents, nodes), "device_skip": device_skip}


@contextlib.contextmanager
def _unshared_rendezvous_store():
    """Upstream's documented opt-out TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for an agent scenario's duration.

    Upstream 2.13 shares the c10d rendezvous TCPStore with the workers (its default) without a per-attempt prefix
    (pytorch/pytorch#135712): a restarted group's init_process_group can read the previous attempt's addresses (gloo:
    connectFullMesh "Connection refused", seen here on every restart) or NCCL id, and a node joining a running job
    that is not rank 0 of the new round blocks on MASTER_ADDR under a prefix nobody writes. With the switch (read at
    each next_rendezvous) the scenarios certify the agent and the device's backend, not that known launcher
    setting; the reports say so (``conformance.report.SCENARIO_SETTINGS``).
    """
    saved = os.environ.get(SHARE_OPT_OUT)
    os.environ[SHARE_OPT_OUT] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SHARE_OPT_OUT, None)
        else:
            os.environ[SHARE_OPT_OUT] = saved


def _join_third_node(ctx, out_dir, agents, nodes):
    first = Concurrent(nodes[:2])
    deadline = time.monotonic() + 30
    while len(_node_records(out_dir)) < 2 * NPROC and time.monotonic() < deadline:
        time.sleep(0.05)
    before = _node_records(out_dir)
    ctx.add_cleanup(lambda: kill_pids(list(_node_records(out_dir))))
    ctx.expect_equal(len(before), 2 * NPROC, "workers recorded by the first two nodes before the third joined")
    joiner = Concurrent(nodes[2:])
    outcomes = first.results_within(ctx, 30) + joiner.results_within(ctx, 15)
    return {"agents": agents, "results": [r for r, _ in outcomes], "before": before,
            "after": _node_records(out_dir, 3 * NPROC)}


def membership_run(ctx):
    return ctx.resources.shared("agent_membership", lambda: _membership_run(ctx))


def _expect_node_layout(ctx, workers: dict, nodes: int, what: str) -> None:
    """Node-contiguous global ranks: the worker with LOCAL_RANK l on the node of GROUP_RANK g has RANK g*NPROC+l."""
    layout = sorted((int(w["GROUP_RANK"]), int(w["LOCAL_RANK"]), int(w["RANK"])) for w in workers.values())
    ctx.expect_equal(layout, [(g, lr, g * NPROC + lr) for g in range(nodes) for lr in range(NPROC)],
                     f"{what}: (GROUP_RANK, LOCAL_RANK, RANK) of every worker")


def _expect_collectives(ctx, scenario: dict, workers, world_size: int, what: str) -> None:
    """Every worker formed its job's process group on the certified device's backend (re-formed after a restart or a
    membership change: a fresh group each start), its tensor on its own device, and the all-reduce summed every rank.

    Where the machine has too few devices for the scenario, nothing about the device is claimed: the row ends
    SKIPPED with the reason -- but only after its other expectations held.
    """
    if scenario.get("device_skip"):
        scenario.setdefault("device_unchecked", []).append(what)
        return
    device = ctx.device
    want_sum = float(world_size * (world_size + 1) // 2)
    for env in workers:
        got = env.get("collective")
        ctx.expect(got is not None, f"{what}: the worker of RANK {env.get('RANK')} recorded no collective")
        ctx.expect_equal((got["rank"], got["world_size"], got["backend"], got["sum"]),
                         (int(env["RANK"]), world_size, device.backend, want_sum),
                         f"{what}: (rank, world size, backend, all-reduce sum) of the worker of RANK {env['RANK']}")
        if device.kind != "cpu":
            index = int(env["GROUP_RANK"]) * int(env["LOCAL_WORLD_SIZE"]) + int(env["LOCAL_RANK"])
            ctx.expect_equal(got["device"], f"{device.kind}:{index}",
                             f"{what}: device of the worker of RANK {env['RANK']} (LOCAL_RANK -> its node's device)")


def _device_part_done(ctx, *scenarios: dict) -> None:
    """End a device row: SKIPPED (not CONFORMS) when a scenario it relies on could not run on the device."""
    reasons = sorted({s["device_skip"] for s in scenarios if s.get("device_skip")})
    if reasons:
        ctx.skip("; ".join(reasons))


def _hook_returns(agent, name, phase="exit"):
    return [payload for ph, n, payload in agent.calls if n == name and ph == phase]


def _hook_order(agent):
    return [n for ph, n, _ in agent.calls if ph == "enter"]


def _calls(run, name, phase="exit"):
    return _hook_returns(run["agent"], name, phase)


def _order(run):
    return _hook_order(run["agent"])


def _by_group_rank(run):
    """(group rank, agent, run result) of each node of a multi-node scenario, by group rank."""
    nodes = [(a.get_worker_group().group_rank, a, r) for a, r in zip(run["agents"], run["results"], strict=True)]
    return sorted(nodes, key=lambda node: node[0])


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
    groups = [a.get_worker_group() for a in multinode_run(ctx)["agents"]]
    ctx.expect_equal(sorted((g.group_rank, g.group_world_size) for g in groups), [(0, 2), (1, 2)],
                     "(group rank, group world size) of the two nodes of a 2-node job")
    for g in groups:
        ctx.expect_equal(sorted(w.global_rank for w in g.workers), [g.group_rank * NPROC + lr for lr in range(NPROC)],
                         f"global ranks of the workers of group rank {g.group_rank}")


@check(f"{A}.ElasticAgent.run", device=True, timeout=90)
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
    multinode = multinode_run(ctx)
    for group_rank, _, node_result in _by_group_rank(multinode):
        ctx.expect_equal(node_result.state, _state(ctx, "SUCCEEDED"), f"run() state on the node of group rank {group_rank}")
        ctx.expect_equal(sorted(node_result.return_values), [group_rank * NPROC + lr for lr in range(NPROC)],
                         f"run() return_values keys on the node of group rank {group_rank} (its global ranks)")
    _expect_collectives(ctx, multinode, multinode["workers"].values(), 2 * NPROC, "2 nodes x 2 workers")
    _device_part_done(ctx, multinode)


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

    def train():
        return 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_fn = ws(role="r", local_world_size=1, rdzv_handler=handler, fn=train)
    ctx.expect(by_fn.entrypoint is train, f"WorkerSpec(fn=f) (deprecated) sets entrypoint to f, got {by_fn.entrypoint!r}")
    ctx.expect(any(issubclass(w.category, DeprecationWarning) for w in caught),
               f"WorkerSpec(fn=...) warns DeprecationWarning, got {[w.category.__name__ for w in caught]}")


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
    text = "local_rank=1,global_rank=5,role_rank=3,world_size=8,role_world_size=4"
    ctx.expect_equal((str(full), repr(full)), (text, text), "str() and repr() of a Worker")


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
                "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": "2",
                "ROLE_NAME": "trainer", "TORCHELASTIC_RESTART_COUNT": "1",
                "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RUN_ID": run["run_id"]}
        got = {k: env.get(k) for k in want}
        ctx.expect_equal(got, want, f"worker env of rank {rank}")
        ctx.expect(env.get("MASTER_ADDR") and env.get("MASTER_PORT"), f"MASTER_ADDR/PORT missing for rank {rank}")
    for attempt in (0, 1):
        _expect_collectives(ctx, run, [envs[f"rank{r}-restart{attempt}.json"] for r in (0, 1)], 2,
                            f"attempt {attempt} of a 1-node job")
    # A restart must not point the new workers at the files of the failed attempt (its error.json is the evidence).
    _expect_error_files(ctx, [envs[f"rank{r}-restart{a}.json"] for r in (0, 1) for a in (0, 1)],
                        "2 workers x 2 attempts")
    _expect_multinode_env(ctx)
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
    _device_part_done(ctx, run, multinode_run(ctx))


def _expect_multinode_env(ctx) -> None:
    """Every launcher env var of every worker of a 2-node x 2-worker job."""
    run = multinode_run(ctx)
    workers = run["workers"]
    ctx.expect_equal(len(workers), 2 * NPROC, "workers recorded in a 2-node x 2-worker job")
    _expect_collectives(ctx, run, workers.values(), 2 * NPROC, "2 nodes x 2 workers (MASTER_ADDR/PORT as given)")
    _expect_node_layout(ctx, workers, 2, "2 nodes x 2 workers")
    for w in workers.values():
        want = {"WORLD_SIZE": str(2 * NPROC), "LOCAL_WORLD_SIZE": str(NPROC), "GROUP_WORLD_SIZE": "2",
                "ROLE_RANK": w["RANK"], "ROLE_WORLD_SIZE": str(2 * NPROC), "ROLE_NAME": "trainer",
                "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": run["run_id"]}
        ctx.expect_equal({k: w.get(k) for k in want}, want, f"env of the worker of RANK {w['RANK']} (2 nodes)")
    _expect_error_files(ctx, list(workers.values()), "2 nodes x 2 workers")
    masters = {(w["MASTER_ADDR"], w["MASTER_PORT"]) for w in workers.values()}
    ctx.expect_equal(len(masters), 1, f"(MASTER_ADDR, MASTER_PORT) pairs among one job's workers {sorted(masters)}")
    addr, port = masters.pop()
    ctx.expect(addr and port and port.isdigit() and 0 < int(port) < 65536, f"MASTER_ADDR={addr!r} MASTER_PORT={port!r}")
    try:
        socket.getaddrinfo(addr, int(port))
    except OSError as exc:
        ctx.expect(False, f"MASTER_ADDR={addr!r} does not resolve: {exc}")


def _expect_error_files(ctx, workers: list[dict], what: str) -> None:
    """TORCHELASTIC_ERROR_FILE: set for every worker, absolute, in an existing folder, and one per worker and attempt
    (two workers, or a restarted worker, sharing one would overwrite the other's root cause)."""
    files = [w.get("TORCHELASTIC_ERROR_FILE") for w in workers]
    ctx.expect(all(f and os.path.isabs(f) and os.path.isdir(os.path.dirname(f)) for f in files),
               f"{what}: TORCHELASTIC_ERROR_FILE not an absolute path in an existing folder: {files}")
    ctx.expect_equal(len(set(files)), len(files), f"{what}: distinct TORCHELASTIC_ERROR_FILE paths")


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
    world = 2 * NPROC
    for group_rank, agent, _ in _by_group_rank(multinode_run(ctx)):
        workers = _hook_returns(agent, "_assign_worker_ranks")[-1][0]
        ranks = [(lr, group_rank * NPROC + lr, group_rank * NPROC + lr, world, world) for lr in range(NPROC)]
        ctx.expect_equal(sorted((w.local_rank, w.global_rank, w.role_rank, w.world_size, w.role_world_size)
                                for w in workers), ranks,
                         f"(local, global, role rank, world, role world) assigned on the node of group rank {group_rank}")
    _expect_identical_workers_fast_path(ctx)


def _expect_identical_workers_fast_path(ctx) -> None:
    """Documented: with TORCH_ELASTIC_WORKER_IDENTICAL=1 the ranks follow from the group rank, without the store."""

    class RanksOnly(ctx.get(f"{A}.SimpleElasticAgent")):
        def _start_workers(self, worker_group):
            return {}

        def _stop_workers(self, worker_group):
            return None

        def _monitor_workers(self, worker_group):
            raise RuntimeError("not used")

        def _shutdown(self, death_sig=None, timeout=30):
            return None

    spec = ctx.get(f"{A}.WorkerSpec")(role="r", local_world_size=2, rdzv_handler=_handler_for_spec(ctx),
                                      entrypoint="/bin/true")
    old = os.environ.get("TORCH_ELASTIC_WORKER_IDENTICAL")
    os.environ["TORCH_ELASTIC_WORKER_IDENTICAL"] = "1"
    try:
        workers = RanksOnly(spec)._assign_worker_ranks(None, 2, 4, spec)  # no store: the fast path must not use one
    finally:
        if old is None:
            os.environ.pop("TORCH_ELASTIC_WORKER_IDENTICAL", None)
        else:
            os.environ["TORCH_ELASTIC_WORKER_IDENTICAL"] = old
    ctx.expect_equal([(w.local_rank, w.global_rank, w.role_rank, w.world_size, w.role_world_size) for w in workers],
                     [(0, 4, 4, 8, 8), (1, 5, 5, 8, 8)],
                     "ranks of group rank 2 of 4 with TORCH_ELASTIC_WORKER_IDENTICAL=1 (no store)")


@check(f"{A}.SimpleElasticAgent._exit_barrier", timeout=90)
def exit_barrier(ctx) -> None:
    run = shared_run(ctx)
    order = _order(run)
    ctx.expect_equal(order.count("_exit_barrier"), 1, "exit barrier calls in a successful run")
    last_monitor = _calls(run, "_monitor_workers")[-1][0]
    ctx.expect_equal(last_monitor.state, _state(ctx, "SUCCEEDED"), "monitor state right before the exit barrier")
    ctx.expect(len(order) - 1 - order[::-1].index("_monitor_workers") < order.index("_exit_barrier"),
               f"exit barrier before the final monitor: {order}")
    # Blocking: the node whose workers finish early stays in run() until the other node's workers are done.
    multi = multinode_run(ctx)
    finished = {g: [w["done"] for w in multi["workers"].values() if w["GROUP_RANK"] == str(g)] for g in (0, 1)}
    ctx.expect(all(t is not None for ts in finished.values() for t in ts), f"workers that never finished: {finished}")
    early_done, late_done = max(finished[0]), max(finished[1])
    ctx.expect(late_done - early_done > LATE_SECONDS / 2,
               f"scenario: group rank 1's workers finished only {late_done - early_done:.2f} s after group rank 0's")
    returned = {a.get_worker_group().group_rank: t for a, t in zip(multi["agents"], multi["returned_at"], strict=True)}
    ctx.expect(returned[0] >= late_done,
               f"the node of group rank 0 left run() {late_done - returned[0]:.2f} s before the other node's workers "
               "finished: the exit barrier did not wait for the other agent")
    # ... but for no longer than exit_barrier_timeout (1 s here, the other node being 3 s late); the run still succeeds.
    bounded = barrier_timeout_run(ctx)
    done = {g: max(w["done"] for w in bounded["workers"].values() if w["GROUP_RANK"] == str(g)) for g in (0, 1)}
    left = {a.get_worker_group().group_rank: t for a, t in zip(bounded["agents"], bounded["returned_at"], strict=True)}
    waited = left[0] - done[0]
    ctx.expect(waited < 2.5 * BARRIER_TIMEOUT_S and left[0] < done[1],
               f"exit_barrier_timeout={BARRIER_TIMEOUT_S} s: the early node left run() {waited:.2f} s after its "
               f"workers finished ({done[1] - left[0]:.2f} s before the late node's workers)")
    ctx.expect(waited >= 0.9 * BARRIER_TIMEOUT_S, f"the early node left the exit barrier after {waited:.2f} s, "
                                                   f"before exit_barrier_timeout={BARRIER_TIMEOUT_S} s")
    ctx.expect(all(r.state == _state(ctx, "SUCCEEDED") for r in bounded["results"]),
               f"run() states when the exit barrier timed out: {[r.state for r in bounded['results']]}")


@check(f"{A}.SimpleElasticAgent._initialize_workers", timeout=90)
def initialize_workers(ctx) -> None:
    run = shared_run(ctx)
    ctx.expect_equal(_order(run).count("_initialize_workers"), 2, "initialize calls (first attempt + one restart)")
    ctx.expect(all(f"rank{r}-restart{a}.json" in run["envs"] for r in (0, 1) for a in (0, 1)),
               f"workers of both attempts did not all start: {sorted(run['envs'])}")


@check(f"{A}.SimpleElasticAgent._monitor_workers", timeout=150)
def monitor_workers(ctx) -> None:
    run = shared_run(ctx)
    states = [value.state for value, _ in _calls(run, "_monitor_workers")]
    ctx.expect(_state(ctx, "FAILED") in states, f"monitor never reported the first attempt FAILED: {states}")
    ctx.expect_equal(states[-1], _state(ctx, "SUCCEEDED"), "last monitor state")
    failed = next(value for value, _ in _calls(run, "_monitor_workers") if value.state == _state(ctx, "FAILED"))
    ctx.expect_failed_ranks(failed.failures, 1, 3, "failed ranks reported by the monitor")
    if sys.platform.startswith("linux"):
        _expect_stuck_worker_is_unhealthy(ctx)


def _expect_stuck_worker_is_unhealthy(ctx) -> None:
    """LocalElasticAgent(uninterruptible_state_timeout=S): a worker in D state for S seconds makes the monitor report
    UNHEALTHY and the agent stop without using its restarts (a new worker would contend for what it holds)."""
    out_dir = ctx.tmpdir / "d-state"
    out_dir.mkdir()
    fifo = out_dir / "nobody-writes"
    os.mkfifo(fifo)
    handler = c10d_handler(ctx, ctx.run_id("d-state"), 1, 1)
    entry, args = ctx.worker_command("d_state", str(fifo))
    spec = _spec(ctx, handler, out_dir, "never", 2, nproc=1, args=args)
    logs = ctx.get("multiprocessing.api.DefaultLogsSpecs")(log_dir=str(out_dir / "logs"))
    agent = _instrumented(ctx)(spec, logs, start_method="spawn", shutdown_timeout=1, uninterruptible_state_timeout=1)
    started = time.monotonic()
    try:
        result = agent.run()
    finally:
        handler.shutdown()
    took = time.monotonic() - started
    states = [value.state for value, _ in _calls({"agent": agent}, "_monitor_workers")]
    ctx.expect(_state(ctx, "UNHEALTHY") in states, f"a worker in D state for the timeout never made the group "
               f"UNHEALTHY: monitor states {states}")
    ctx.expect_equal(result.state, _state(ctx, "UNHEALTHY"), "run result of a group with a worker stuck in D state")
    ctx.expect_equal(len(_calls({"agent": agent}, "_start_workers")), 1, "worker starts (restarts must be disabled)")
    ctx.expect(took < 60, f"the agent took {took:.1f}s to give up on a worker stuck in D state")
    ctx.expect(not any(_alive(pid) for pid in agent.started_pids), "the stuck worker outlived its agent")


@check(f"{A}.SimpleElasticAgent._rendezvous", timeout=90)
def rendezvous_hook(ctx) -> None:
    run = shared_run(ctx)
    ctx.expect_equal(_order(run).count("_rendezvous"), 2, "rendezvous rounds (first attempt + restart)")
    group = run["agent"].get_worker_group()
    ctx.expect(group.store is not None, "the worker group has no store after rendezvous")
    ctx.expect_equal((group.group_rank, group.group_world_size), (0, 1), "group rank/world size set by rendezvous")
    nodes = _by_group_rank(multinode_run(ctx))
    ctx.expect_equal([(g, a.get_worker_group().group_world_size) for g, a, _ in nodes], [(0, 2), (1, 2)],
                     "(group rank, group world size) set by the rendezvous of a 2-node job")
    ctx.expect_equal([_hook_order(a).count("_rendezvous") for _, a, _ in nodes], [1, 1],
                     "rendezvous rounds per node of a 2-node job without failures")


@check(f"{A}.SimpleElasticAgent._restart_workers", device=True, timeout=90)
def restart_workers(ctx) -> None:
    run = shared_run(ctx)
    order = _order(run)
    ctx.expect_equal(order.count("_restart_workers"), 1, "restarts with max_restarts=1 and one failure")
    ctx.expect_equal(run["envs"]["rank1-restart1.json"]["TORCHELASTIC_RESTART_COUNT"], "1", "restart count seen by workers")
    _expect_collectives(ctx, run, [run["envs"][f"rank{r}-restart1.json"] for r in (0, 1)], 2,
                        "the process group re-formed after a restart")
    failing = failing_run(ctx)
    ctx.expect_equal(_order(failing).count("_restart_workers"), 0, "restarts with max_restarts=0")
    # A membership change restarts the running nodes' groups (no worker failed) at the new size.
    membership = membership_run(ctx)
    ctx.expect_equal([_hook_order(a).count("_restart_workers") for a in membership["agents"]], [1, 1, 0],
                     "restarts per node (two running nodes, then the joining one) when a third node joined")
    after = membership["after"]
    ctx.expect_equal(len(after), 3 * NPROC, "workers started at WORLD_SIZE 6 after the third node joined")
    _expect_node_layout(ctx, after, 3, "after a third node joined")
    ctx.expect_equal({(w["GROUP_WORLD_SIZE"], w["TORCHELASTIC_RESTART_COUNT"]) for w in after.values()}, {("3", "0")},
                     "(GROUP_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT) after a membership change (not a restart)")
    ctx.expect(all(r.state == _state(ctx, "SUCCEEDED") for r in membership["results"]),
               f"run() states after the membership change: {[r.state for r in membership['results']]}")
    _expect_collectives(ctx, membership, membership["before"].values(), 2 * NPROC, "2 nodes before the third joined")
    _expect_collectives(ctx, membership, after.values(), 3 * NPROC, "the process group re-formed after a third node joined")
    _device_part_done(ctx, run, membership)


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
    # A third node joining stops the HEALTHY workers of the two running nodes (nothing else stops them).
    membership = membership_run(ctx)
    tracked = {}
    for node, agent in enumerate(membership["agents"][:2]):
        stops = _hook_returns(agent, "_stop_workers")
        ctx.expect(stops, f"_stop_workers was not called on running node {node} when a third node joined")
        tracked.update(stops[0][1])
    ctx.expect(set(membership["before"]) <= set(tracked),
               f"pids of the healthy workers {sorted(membership['before'])} not among those started {sorted(tracked)}")
    survivors = sorted(pid for pid in membership["before"] if tracked[pid])
    ctx.expect(not survivors, f"healthy workers still running after _stop_workers on a membership change: {survivors}")


@check(f"{A}.api.RunResult", timeout=90)
def run_result(ctx) -> None:
    rr = ctx.get(f"{A}.api.RunResult")
    ws = ctx.get(f"{A}.WorkerState")
    ok = rr(state=ws.SUCCEEDED)
    ctx.expect_equal((ok.return_values, ok.failures), ({}, {}), "RunResult defaults")
    ctx.expect(not ok.is_failed() and rr(state=ws.FAILED).is_failed(), "is_failed() is True iff state is FAILED")
    ctx.expect(isinstance(shared_run(ctx)["result"], rr), "agent.run() does not return a RunResult")
    ctx.expect(ctx.get(f"{A}.RunResult") is rr, "agent.server.RunResult differs from agent.server.api.RunResult")


