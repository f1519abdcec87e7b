"""torch.distributed.elastic.rendezvous: RendezvousParameters, the handler registry, RendezvousHandler, errors."""

from __future__ import annotations

import time

from conformance.checks._rdzv import c10d_handler, in_threads
from conformance.checks._rdzv import timeout as rdzv_timeout
from conformance.context import free_port
from conformance.registry import check

R = "rendezvous"
H = f"{R}.RendezvousHandler"
E = f"{R}.api"


def _params(ctx, **kwargs):
    return ctx.get(f"{R}.RendezvousParameters")(
        backend="c10d", endpoint="localhost:29400", run_id="r1", min_nodes=1, max_nodes=2, **kwargs
    )


@check(f"{R}.RendezvousParameters")
def rendezvous_parameters(ctx) -> None:
    rp = ctx.get(f"{R}.RendezvousParameters")
    p = rp(backend="c10d", endpoint="h:1", run_id="job", min_nodes=2, max_nodes=4, local_addr="10.0.0.1", extra="x")
    ctx.expect_equal((p.backend, p.endpoint, p.run_id, p.min_nodes, p.max_nodes, p.local_addr),
                     ("c10d", "h:1", "job", 2, 4, "10.0.0.1"), "RendezvousParameters fields")
    ctx.expect_equal(p.config.get("extra"), "x", "extra keyword arguments land in .config")
    base = {"backend": "c10d", "endpoint": "h:1", "run_id": "job", "min_nodes": 1, "max_nodes": 1}
    for bad, what in (({"backend": ""}, "empty backend"), ({"min_nodes": 0}, "min_nodes 0"),
                      ({"min_nodes": 3, "max_nodes": 2}, "max_nodes < min_nodes")):
        ctx.expect_raises(ValueError, rp, **{**base, **bad}, what=f"RendezvousParameters with {what}")


@check(f"{R}.RendezvousParameters.get")
def parameters_get(ctx) -> None:
    p = _params(ctx, timeout="5", flag=None)
    ctx.expect_equal(p.get("timeout"), "5", "get() of a given key")
    ctx.expect_equal(p.get("missing", "dflt"), "dflt", "get() of a missing key with default")
    ctx.expect(p.get("missing") is None, "get() of a missing key without default must be None")


@check(f"{R}.RendezvousParameters.get_as_bool")
def parameters_get_as_bool(ctx) -> None:
    p = _params(ctx, t1="1", t2="True", t3="yes", t4=True, f1="0", f2="false", f3="No", f4=False, bad="maybe")
    for key in ("t1", "t2", "t3", "t4"):
        ctx.expect_equal(p.get_as_bool(key), True, f"get_as_bool({key!r}) of {p.get(key)!r}")
    for key in ("f1", "f2", "f3", "f4"):
        ctx.expect_equal(p.get_as_bool(key), False, f"get_as_bool({key!r}) of {p.get(key)!r}")
    ctx.expect_equal(p.get_as_bool("missing", True), True, "get_as_bool() default")
    ctx.expect(p.get_as_bool("missing") is None, "get_as_bool() of a missing key without default must be None")
    ctx.expect_raises(ValueError, p.get_as_bool, "bad", what="get_as_bool('maybe')")


@check(f"{R}.RendezvousParameters.get_as_int")
def parameters_get_as_int(ctx) -> None:
    p = _params(ctx, n="42", m=7, neg="-3", bad="4x")
    ctx.expect_equal(p.get_as_int("n"), 42, "get_as_int('42')")
    ctx.expect_equal(p.get_as_int("m"), 7, "get_as_int(7)")
    ctx.expect_equal(p.get_as_int("neg"), -3, "get_as_int('-3')")
    ctx.expect_equal(p.get_as_int("missing", 9), 9, "get_as_int() default")
    ctx.expect(p.get_as_int("missing") is None, "get_as_int() of a missing key without default must be None")
    ctx.expect_raises(ValueError, p.get_as_int, "bad", what="get_as_int('4x')")


@check(f"{R}.RendezvousHandlerRegistry")
def handler_registry(ctx) -> None:
    registry = ctx.get(f"{R}.RendezvousHandlerRegistry")()
    seen = []

    class Created:  # create_handler() may check that the handler reports the requested backend
        def get_backend(self):
            return "conformance-backend"

    sentinel = Created()

    def creator(params):
        seen.append(params)
        return sentinel

    registry.register("conformance-backend", creator)
    registry.register("conformance-backend", creator)  # same creator again is allowed
    ctx.expect_raises(ValueError, registry.register, "conformance-backend", lambda p: None,
                      what="registering a different creator for the same backend")
    params = ctx.get(f"{R}.RendezvousParameters")(backend="conformance-backend", endpoint="", run_id="x",
                                                  min_nodes=1, max_nodes=1)
    handler = registry.create_handler(params)
    ctx.expect(handler is sentinel and seen == [params], "create_handler() must call the registered creator with params")
    other = ctx.get(f"{R}.RendezvousParameters")(backend="nope", endpoint="", run_id="x", min_nodes=1, max_nodes=1)
    ctx.expect_raises(ValueError, registry.create_handler, other, what="create_handler() of an unknown backend")


@check(H)
def rendezvous_handler(ctx) -> None:
    handler_cls = ctx.get(H)
    ctx.expect_raises(TypeError, handler_cls, what="instantiating the abstract RendezvousHandler")
    required = {"next_rendezvous", "get_backend", "is_closed", "set_closed", "num_nodes_waiting", "get_run_id", "shutdown"}
    missing = required - set(handler_cls.__abstractmethods__)
    ctx.expect(not missing, f"RendezvousHandler methods not abstract: {sorted(missing)}")
    dynamic = ctx.get("rendezvous.dynamic_rendezvous.DynamicRendezvousHandler")
    ctx.expect(issubclass(dynamic, handler_cls), "DynamicRendezvousHandler is not a RendezvousHandler")


@check(f"{H}.get_backend")
def handler_get_backend(ctx) -> None:
    handler = c10d_handler(ctx, ctx.run_id("backend"))
    ctx.expect_equal(handler.get_backend(), "c10d", "get_backend() of a handler over C10dRendezvousBackend")


@check(f"{H}.get_run_id")
def handler_get_run_id(ctx) -> None:
    run_id = ctx.run_id("runid")
    ctx.expect_equal(c10d_handler(ctx, run_id).get_run_id(), run_id, "get_run_id()")


@check(f"{H}.is_closed")
def handler_is_closed(ctx) -> None:
    run_id = ctx.run_id("closed")
    a, b = c10d_handler(ctx, run_id), c10d_handler(ctx, run_id)
    ctx.expect(not a.is_closed(), "a fresh rendezvous reports is_closed()")
    a.set_closed()
    ctx.expect(a.is_closed(), "is_closed() is False after set_closed()")
    ctx.expect(b.is_closed(), "another node of the same run does not see the closed rendezvous")


@check(f"{H}.next_rendezvous", timeout=60)
def handler_next_rendezvous(ctx) -> None:
    run_id = ctx.run_id("next")
    nodes = [c10d_handler(ctx, run_id, 2, 2) for _ in range(2)]
    infos = in_threads(ctx, [n.next_rendezvous for n in nodes])
    ctx.expect_equal(sorted(i.rank for i in infos), [0, 1], "ranks of a 2-node rendezvous")
    ctx.expect_equal([i.world_size for i in infos], [2, 2], "world_size of a 2-node rendezvous")
    infos[0].store.set("conformance-key", f"from-rank-{infos[0].rank}")
    ctx.expect_equal(infos[1].store.get("conformance-key"), f"from-rank-{infos[0].rank}".encode(),
                     "the rendezvous stores of both nodes must be the same store")
    boot = [i.bootstrap_store_info for i in infos]
    ctx.expect(boot[0].master_addr and boot[0].master_port and boot[0].master_port == boot[1].master_port,
               f"bootstrap_store_info disagrees between nodes: {boot}")


@check(f"{H}.num_nodes_waiting", timeout=60)
def handler_num_nodes_waiting(ctx) -> None:
    run_id = ctx.run_id("waiting")
    first = c10d_handler(ctx, run_id, 1, 2, last_call=0.2)
    first.next_rendezvous()
    ctx.expect_equal(first.num_nodes_waiting(), 0, "num_nodes_waiting() with nobody waiting")
    late = c10d_handler(ctx, run_id, 1, 2, join=30)
    outcome = {}

    def join_late():
        try:
            late.next_rendezvous()
            outcome["joined"] = True
        except Exception as exc:
            outcome["error"] = exc

    import threading

    thread = threading.Thread(target=join_late, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    waiting = 0
    while time.monotonic() < deadline and (waiting := first.num_nodes_waiting()) == 0:
        time.sleep(0.1)
    first.set_closed()  # releases the late node
    thread.join(20)
    ctx.expect_equal(waiting, 1, "num_nodes_waiting() after a late node joined a complete rendezvous")
    closed = ctx.get(f"{E}.RendezvousClosedError")
    ctx.expect(isinstance(outcome.get("error"), closed), f"late node after set_closed(): {outcome}")


@check(f"{H}.set_closed")
def handler_set_closed(ctx) -> None:
    handler = c10d_handler(ctx, ctx.run_id("setclosed"))
    handler.set_closed()
    ctx.expect(handler.is_closed(), "is_closed() after set_closed()")
    ctx.expect_raises(ctx.get(f"{E}.RendezvousClosedError"), handler.next_rendezvous,
                      what="next_rendezvous() on a closed rendezvous")


@check(f"{H}.shutdown")
def handler_shutdown(ctx) -> None:
    run_id = ctx.run_id("shutdown")
    handler = c10d_handler(ctx, run_id)
    handler.next_rendezvous()
    ctx.expect(handler.shutdown() is True, "shutdown() of a live rendezvous returns True")
    ctx.expect(c10d_handler(ctx, run_id).is_closed(),
               "shutdown() did not close the rendezvous for the run (upstream DynamicRendezvousHandler.shutdown() "
               "closes it, so the other nodes see is_closed() and stop re-rendezvousing)")


def _error_hierarchy(ctx, name: str) -> None:
    base = ctx.get(f"{E}.RendezvousError")
    exc_cls = ctx.get(f"{E}.{name}")
    ctx.expect(issubclass(exc_cls, base), f"{name} is not a RendezvousError")
    try:
        raise exc_cls("conformance message")
    except base as caught:
        ctx.expect_equal(str(caught), "conformance message", f"{name} message")


@check(f"{E}.RendezvousError")
def rendezvous_error(ctx) -> None:
    base = ctx.get(f"{E}.RendezvousError")
    ctx.expect(issubclass(base, Exception), "RendezvousError is not an Exception")
    ctx.expect(ctx.get(f"{R}.RendezvousError") is base, "rendezvous.RendezvousError differs from rendezvous.api's")


@check(f"{E}.RendezvousClosedError")
def rendezvous_closed_error(ctx) -> None:
    _error_hierarchy(ctx, "RendezvousClosedError")
    handler = c10d_handler(ctx, ctx.run_id("closederr"))
    handler.set_closed()
    ctx.expect_raises(ctx.get(f"{E}.RendezvousClosedError"), handler.next_rendezvous,
                      what="next_rendezvous() after set_closed()")


@check(f"{E}.RendezvousTimeoutError", timeout=30)
def rendezvous_timeout_error(ctx) -> None:
    _error_hierarchy(ctx, "RendezvousTimeoutError")
    handler = c10d_handler(ctx, ctx.run_id("timeout"), 2, 2, join=1.5)
    started = time.monotonic()
    ctx.expect_raises(ctx.get(f"{E}.RendezvousTimeoutError"), handler.next_rendezvous,
                      what="next_rendezvous() alone when min_nodes=2 and join timeout 1.5 s")
    ctx.expect(time.monotonic() - started < 15, "the join timeout was not honoured")


@check(f"{E}.RendezvousConnectionError", timeout=60)
def rendezvous_connection_error(ctx) -> None:
    _error_hierarchy(ctx, "RendezvousConnectionError")
    params = ctx.get(f"{R}.RendezvousParameters")(
        backend="c10d", endpoint=f"127.0.0.1:{free_port()}", run_id="conn", min_nodes=1, max_nodes=1,
        is_host=False, read_timeout=2,
    )
    ctx.expect_raises(ctx.get(f"{E}.RendezvousConnectionError"),
                      ctx.get("rendezvous.c10d_rendezvous_backend.create_backend"), params,
                      what="c10d create_backend() against a port nobody listens on")


def _corruptible_backend(ctx):
    """A user-written RendezvousBackend (the documented extension point) over one stored blob whose bytes the check
    can replace, as another writer (or a bad disk) could."""

    class CorruptibleBackend(ctx.get("rendezvous.dynamic_rendezvous.RendezvousBackend")):
        def __init__(self) -> None:
            self.state: bytes | None = None
            self.token = 0

        @property
        def name(self) -> str:
            return "conformance-corruptible"

        def get_state(self):
            return None if self.state is None else (self.state, self.token)

        def set_state(self, state, token=None):
            if (self.state is None and token is None) or token == self.token:
                self.state, self.token = state, self.token + 1
                return self.state, self.token, True
            return None if self.state is None else (self.state, self.token, False)

    return CorruptibleBackend()


@check(f"{E}.RendezvousStateError", timeout=60)
def rendezvous_state_error(ctx) -> None:
    _error_hierarchy(ctx, "RendezvousStateError")
    # Documented: "Raised when the state of a rendezvous is corrupt." A round completes over a user backend, then the
    # stored state is overwritten with bytes that are no rendezvous state (of either implementation's format);
    # every handler operation that reads it must say so with RendezvousStateError, not another error, a hang until
    # the join timeout, or a silent fresh rendezvous.
    dynamic = ctx.get("rendezvous.dynamic_rendezvous.DynamicRendezvousHandler")
    state_error = ctx.get(f"{E}.RendezvousStateError")
    run_id = ctx.run_id("corrupt")
    backend = _corruptible_backend(ctx)

    def handler():
        made = dynamic.from_backend(run_id=run_id, store=ctx.resources.tcp_store_client(), backend=backend,
                                    min_nodes=1, max_nodes=1, timeout=rdzv_timeout(ctx, join=10))
        ctx.add_cleanup(made.shutdown)
        return made

    ctx.expect_equal(handler().next_rendezvous().world_size, 1, "a 1-node round over the user backend")
    ctx.expect(backend.state is not None, "the round left no state in the backend")
    for garbage in (b"not a rendezvous state", b"\x00\x01\x02\x03 corrupt"):
        backend.state, backend.token = garbage, backend.token + 1
        node = handler()  # a node that starts after the corruption: nothing cached
        for op in ("next_rendezvous", "num_nodes_waiting", "is_closed", "set_closed"):
            started = time.monotonic()
            ctx.expect_raises(state_error, getattr(node, op), what=f"{op}() on a stored state of {garbage!r}")
            took = time.monotonic() - started
            ctx.expect(took < 8, f"{op}() on a corrupt state took {took:.1f} s to raise (join timeout 10 s)")


def _stub_rendezvous_handler(ctx, error):
    """A user-written RendezvousHandler (the documented extension point) whose next_rendezvous() raises ``error``."""

    class Raising(ctx.get(H)):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def get_backend(self):
            return "conformance-stub"

        def next_rendezvous(self):
            self.calls.append("next_rendezvous")
            raise error

        def is_closed(self):
            return False

        def set_closed(self):
            self.calls.append("set_closed")

        def num_nodes_waiting(self):
            return 0

        def get_run_id(self):
            return "conformance-graceful"

        def shutdown(self):
            self.calls.append("shutdown")
            return True

    return Raising()


def _stub_agent(ctx, handler):
    """A user-written SimpleElasticAgent (the documented extension point) logging its hooks; no real workers."""

    class StubAgent(ctx.get("agent.server.SimpleElasticAgent")):
        def __init__(self, spec) -> None:
            super().__init__(spec)
            self.log: list[str] = []

        def _start_workers(self, worker_group):
            self.log.append("_start_workers")
            return {w.local_rank: 4_000_000 + w.local_rank for w in worker_group.workers}

        def _stop_workers(self, worker_group, *args, **kwargs):
            self.log.append("_stop_workers")

        def _monitor_workers(self, worker_group):
            self.log.append("_monitor_workers")
            return ctx.get("agent.server.RunResult")(state=ctx.get("agent.server.WorkerState").SUCCEEDED)

        def _shutdown(self, *args, **kwargs):
            self.log.append("_shutdown")

    spec = ctx.get("agent.server.WorkerSpec")(role="trainer", local_world_size=1, rdzv_handler=handler,
                                               entrypoint="/bin/true", max_restarts=3, monitor_interval=0.01)
    return StubAgent(spec)


@check(f"{E}.RendezvousGracefulExitError")
def rendezvous_graceful_exit_error(ctx) -> None:
    _error_hierarchy(ctx, "RendezvousGracefulExitError")
    ctx.expect(ctx.get(f"{R}.RendezvousGracefulExitError") is ctx.get(f"{E}.RendezvousGracefulExitError"),
               "rendezvous.RendezvousGracefulExitError differs from rendezvous.api's")
    # Documented: raised when a node "wasn't included in rendezvous and gracefully exits ... does not mean a
    # failure". What both implementations' agents do with it: run() stops at once -- no retried rendezvous, no
    # workers started, no restart -- shuts the agent down (_shutdown, which stops any workers of this node) and
    # ends without a failure: upstream returns (None), ours re-raises that same error for its launcher (a
    # recorded difference, known_differences.API_BEHAVIOUR_DIFFERENCES["agent_run_rendezvous_graceful_exit"]).
    # Not comparable: which error a surplus node's next_rendezvous() raises when the run closes (upstream this one,
    # ours RendezvousClosedError; case rdzv_surplus_node_when_the_run_closes, also recorded there).
    error = ctx.get(f"{E}.RendezvousGracefulExitError")("conformance: this node is not needed")
    handler = _stub_rendezvous_handler(ctx, error)
    agent = _stub_agent(ctx, handler)
    try:
        result = agent.run()
        outcome = f"returned {result!r}"
        graceful = result is None
    except BaseException as e:  # noqa: BLE001 - any other exception is what the check reports
        outcome = f"raised {type(e).__name__}: {e}"
        graceful = e is error
    ctx.expect(graceful, f"agent.run() after next_rendezvous() raised RendezvousGracefulExitError: {outcome} "
                         "(documented: not a failure; neither a result nor a different error)")
    ctx.expect_equal(handler.calls.count("next_rendezvous"), 1, "next_rendezvous() calls (the exit is not retried)")
    ctx.expect("_start_workers" not in agent.log, f"workers started after a graceful exit: {agent.log}")
    ctx.expect_equal(agent.log.count("_shutdown"), 1, f"_shutdown() calls after a graceful exit ({agent.log})")


@check(f"{H}.use_agent_store")
def handler_use_agent_store(ctx) -> None:
    import os

    handler = c10d_handler(ctx, ctx.run_id("agentstore"))
    ctx.expect(handler.use_agent_store is True, "DynamicRendezvousHandler.use_agent_store is not True by default")
    previous = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        ctx.expect(handler.use_agent_store is False, "use_agent_store with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    finally:
        if previous is None:
            del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = previous
    base = ctx.get(H)

    class Minimal(base):  # the base class's default: the store is not shared with the application
        def get_backend(self):
            return "minimal"

        def next_rendezvous(self):
            raise NotImplementedError

        def is_closed(self):
            return False

        def set_closed(self):
            pass

        def num_nodes_waiting(self):
            return 0

        def get_run_id(self):
            return "minimal"

        def shutdown(self):
            return True

    ctx.expect(Minimal().use_agent_store is False, "RendezvousHandler.use_agent_store default is not False")


@check(f"{R}.RendezvousInfo", timeout=60)
def rendezvous_info(ctx) -> None:
    info_cls = ctx.get(f"{R}.RendezvousInfo")
    store = ctx.resources.tcp_store_client()
    boot = ctx.get(f"{E}.RendezvousStoreInfo")("10.1.2.3", 4567)
    info = info_cls(store, 3, 8, boot)
    ctx.expect_equal((info.store is store, info.rank, info.world_size, info.bootstrap_store_info),
                     (True, 3, 8, boot), "RendezvousInfo(store, rank, world_size, bootstrap_store_info) fields")
    got = c10d_handler(ctx, ctx.run_id("info")).next_rendezvous()
    ctx.expect(isinstance(got, info_cls), f"next_rendezvous() returned {type(got).__name__}, documented RendezvousInfo")
    ctx.expect_equal((got.rank, got.world_size), (0, 1), "a 1-node rendezvous's RendezvousInfo")


@check(f"{E}.RendezvousStoreInfo")
def rendezvous_store_info(ctx) -> None:
    rsi = ctx.get(f"{E}.RendezvousStoreInfo")
    info = rsi("10.1.2.3", 4567)
    ctx.expect_equal((info.master_addr, info.master_port), ("10.1.2.3", 4567), "RendezvousStoreInfo fields")
    ctx.expect_equal(info, rsi(master_addr="10.1.2.3", master_port=4567), "RendezvousStoreInfo equality")
    ctx.expect_equal((rsi.MASTER_ADDR_KEY, rsi.MASTER_PORT_KEY), ("MASTER_ADDR", "MASTER_PORT"), "store keys")


@check(f"{E}.RendezvousStoreInfo.build", timeout=60)
def rendezvous_store_info_build(ctx) -> None:
    from torch.distributed import PrefixStore

    build = ctx.get(f"{E}.RendezvousStoreInfo").build
    prefix = ctx.run_id("storeinfo")
    ranks = [PrefixStore(prefix, ctx.resources.tcp_store_client()) for _ in range(2)]
    first = build(0, ranks[0], "127.0.0.1", 4321)
    ctx.expect_equal((first.master_addr, first.master_port), ("127.0.0.1", 4321), "build() on rank 0")
    second = build(1, ranks[1], None)
    ctx.expect_equal(second, first, "build() on rank 1 reads what rank 0 published")
    ctx.expect_equal(ranks[1].get("MASTER_PORT"), b"4321", "MASTER_PORT in the store")
    other = [PrefixStore(prefix + "-free", ctx.resources.tcp_store_client()) for _ in range(2)]
    picked = build(0, other[0], "127.0.0.1")
    ctx.expect(isinstance(picked.master_port, int) and 0 < picked.master_port < 65536,
               f"rank 0 without server_port picked {picked.master_port!r}, documented a free port")
    ctx.expect_equal(build(1, other[1], None), picked, "rank 1 sees the port rank 0 picked")
