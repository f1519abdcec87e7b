"""Worker programs the checks start as real processes: ``python -m conformance.workers MODE ARGS``.

Modes that only exercise process management stay free of ``import torch`` (it costs ~1.2 s of CPU); modes that need
the implementation import it from ``$CONFORMANCE_IMPL_ROOT`` (e.g. ``elastic_impl`` or ``torch.distributed.elastic``).
The module-level functions are the entrypoints of function-based (multiprocessing) workers.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

ENV_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE",
)


NO_COLLECTIVE = "none"  # backend argument of the agent-scenario workers: record env only, no process group
COLLECTIVE_TIMEOUT_S = 45


def impl_module(relative: str):
    root = os.environ.get("CONFORMANCE_IMPL_ROOT", "torch.distributed.elastic")
    return importlib.import_module(f"{root}.{relative}")


def square(value: int) -> int:
    """Function entrypoint: its return value must come back through RunProcsResult.return_values."""
    return value * value


def _stamp(path: str) -> None:
    """Write the wall time (time.time(), the timers' clock) to ``path``: when this worker was about to acquire."""
    if path:
        with open(path, "w") as fh:
            fh.write(repr(time.time()))


def local_timer_child(mp_queue, impl_root: str, mode: str, stamp: str = "") -> None:
    """Function entrypoint: hold a LocalTimerClient timer that either expires (and we get killed) or is released.
    ``stamp``: a file the expiring worker writes the time to just before it acquires its 0.5 s timer."""
    timer = importlib.import_module(f"{impl_root}.timer")
    timer.configure(timer.LocalTimerClient(mp_queue))
    if mode == "expire":
        _stamp(stamp)
        with timer.expires(after=0.5, scope="conformance-expire"):
            time.sleep(30)
    else:
        with timer.expires(after=60, scope="conformance-release"):
            time.sleep(0.1)


def _agent_worker(out_dir: str, fail_mode: str, backend: str = NO_COLLECTIVE, device_kind: str = "cpu") -> int:
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    env["pid"] = os.getpid()
    if backend != NO_COLLECTIVE:
        env["collective"] = _collective(backend, device_kind)
    restart = env["TORCHELASTIC_RESTART_COUNT"]
    marker = os.path.join(out_dir, f"rank{env['RANK']}-restart{restart}.json")
    with open(marker + ".tmp", "w") as fh:
        json.dump(env, fh)
    os.replace(marker + ".tmp", marker)  # appears complete or not at all
    if env["RANK"] == "1" and (fail_mode == "always" or (fail_mode == "first" and restart == "0")):
        # Fail only once rank 0 of this attempt has recorded itself: the agent stops the whole group on a failure,
        # and on a loaded machine rank 0 may not have got that far yet (the checks then see a missing worker).
        peer = os.path.join(out_dir, f"rank0-restart{restart}.json")
        deadline = time.monotonic() + 60
        while not os.path.exists(peer) and time.monotonic() < deadline:
            time.sleep(0.02)
        return 3
    return 0


def _node_worker(out_dir: str, late_group_rank: str, late_seconds: str, full_world_size: str,
                 backend: str = NO_COLLECTIVE, device_kind: str = "cpu") -> int:
    """A worker of a multi-node agent scenario: record env + pid, then finish (or hold until the world grows).

    Below ``full_world_size`` the worker stays healthy (sleeps) until its agent stops it for a membership change;
    at full size the workers of node ``late_group_rank`` finish ``late_seconds`` after the others. ``w<pid>.done``
    holds the wall-clock time a worker finished, for exit-barrier timing across nodes. With a ``backend`` the worker
    first joins the job's process group on the device and all-reduces (recorded as ``collective``).
    """
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    env["pid"] = os.getpid()
    if backend != NO_COLLECTIVE:
        env["collective"] = _collective(backend, device_kind)
    record = os.path.join(out_dir, f"w{os.getpid()}.json")
    with open(record + ".tmp", "w") as fh:
        json.dump(env, fh)
    os.replace(record + ".tmp", record)
    if int(env["WORLD_SIZE"]) < int(full_world_size):
        time.sleep(60)  # healthy until stopped; a survivor of a membership change is caught by the check
        return 0
    if env["GROUP_RANK"] == late_group_rank:
        time.sleep(float(late_seconds))
    with open(os.path.join(out_dir, f"w{os.getpid()}.done"), "w") as fh:
        fh.write(repr(time.time()))
    return 0


def _trap_sigterm(marker: str) -> int:
    """Write ``marker`` when SIGTERM arrives (then exit); ``marker.ready`` says the handler is installed."""
    import signal

    def on_term(signum, frame):
        with open(marker, "w") as fh:
            fh.write("SIGTERM")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    open(marker + ".ready", "w").close()
    time.sleep(60)
    return 0


def _ignore_sigterm(marker: str) -> int:
    """Ignore SIGTERM, noting when it came (``marker``: its wall time); ``marker.alive``: the last time this process
    was seen running, rewritten every 20 ms; ``marker.ready`` says the handler is installed."""
    import signal

    def on_term(signum, frame):
        with open(marker, "w") as fh:
            fh.write(repr(time.time()))

    signal.signal(signal.SIGTERM, on_term)
    open(marker + ".ready", "w").close()
    alive, tmp = marker + ".alive", marker + ".alive.tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(tmp, "w") as fh:
            fh.write(repr(time.time()))
        os.replace(tmp, alive)  # never a half-written file
        time.sleep(0.02)
    return 0


def _tee_run(log_dir: str) -> int:
    """start_processes with redirects=ALL, tee=ALL: the worker's lines must reach the log files and this console."""
    mp = impl_module("multiprocessing")
    logs = impl_module("multiprocessing.api").DefaultLogsSpecs(log_dir=log_dir, redirects=mp.Std.ALL,
                                                                  tee=mp.Std.ALL)
    pctx = mp.start_processes(name="tee", entrypoint=sys.executable,
                              args={0: ("-m", "conformance.workers", "echo", "teed-line")},
                              envs={0: {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}, logs_specs=logs)
    try:
        result = None
        while result is None:
            result = pctx.wait(timeout=1)
    finally:
        pctx.close()
    return 1 if result.is_failed() else 0


def _rdzv_node(port: str, run_id: str, keep_alive_interval: str, keep_alive_max_attempt: str) -> int:
    """One node of a c10d rendezvous (min 2, max 2) in its own process, so the check can SIGKILL it mid-run."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    dr = impl_module("rendezvous.dynamic_rendezvous")
    store = TCPStore("127.0.0.1", int(port), is_master=False, timeout=timedelta(seconds=30))
    backend = impl_module("rendezvous.c10d_rendezvous_backend").C10dRendezvousBackend(store, run_id)
    handler = dr.DynamicRendezvousHandler.from_backend(
        run_id=run_id, store=store, backend=backend, min_nodes=2, max_nodes=2,
        timeout=dr.RendezvousTimeout(join=timedelta(seconds=30)), keep_alive_interval=int(keep_alive_interval),
        keep_alive_max_attempt=int(keep_alive_max_attempt))
    print("joining", flush=True)
    info = handler.next_rendezvous()
    print(f"joined rank {info.rank} of {info.world_size}", flush=True)
    time.sleep(60)  # heartbeating until killed
    return 0


def _collective(backend: str, device_kind: str) -> dict:
    """Join the job's process group as the launcher set it up (env://) on ``backend``, all-reduce RANK + 1 in a tensor
    on this worker's device, and leave the group: what a training script does first, after every (re)start.

    Device index: LOCAL_RANK within this worker's node. The certifier runs several nodes on one machine, so node
    GROUP_RANK owns the slice starting at GROUP_RANK * LOCAL_WORLD_SIZE (as if each node saw only its own devices).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    index = int(os.environ.get("GROUP_RANK") or 0) * int(os.environ.get("LOCAL_WORLD_SIZE") or 0) + local_rank
    if device_kind == "cuda":
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    elif device_kind == "npu":
        import torch_npu  # noqa: F401

        torch.npu.set_device(index)
        device = torch.device("npu", index)
    elif device_kind == "hpu":
        import habana_frameworks.torch  # noqa: F401  (registers torch.hpu and its hccl backend)

        device = torch.device("hpu", index)
    else:
        device = torch.device("cpu")
    # Bounded: a group that cannot form (stale rendezvous data after a restart, a wrong MASTER_PORT) fails this
    # worker well within the check's timeout instead of hanging for the default 30 minutes.
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        tensor = torch.tensor([float(dist.get_rank() + 1)], device=device)
        dist.all_reduce(tensor)
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": tensor.item(),
                "device": str(tensor.device), "local_rank": local_rank, "backend": dist.get_backend()}
    finally:
        dist.destroy_process_group()


def _allreduce(out_dir: str, backend: str, device_kind: str) -> int:
    result = _collective(backend, device_kind)
    with open(os.path.join(out_dir, f"allreduce-rank{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)
    return 0


def _file_timer(file_path: str, mode: str, stamp: str = "") -> int:
    timer = impl_module("timer")
    timer.configure(timer.FileTimerClient(file_path))
    if mode == "expire":
        _stamp(stamp)
        with timer.expires(after=0.5, scope="conformance-expire"):
            time.sleep(30)
        return 0
    with timer.expires(after=60, scope="conformance-release"):
        time.sleep(0.1)
    return 0


def _file_timer_server(file_path: str, run_id: str, ready_file: str, seconds: str) -> int:
    # Upstream's FileTimerServer terminates its own process after reaping a worker, so it runs here, apart from the
    # certifier.
    timer = impl_module("timer")
    server = timer.FileTimerServer(file_path=file_path, run_id=run_id, max_interval=0.1)
    server.start()
    with open(ready_file, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(float(seconds))
    server.stop()
    return 0


def _record_event(destination: str, name: str) -> int:
    events = impl_module("events")
    api = impl_module("events.api")
    events.record(api.Event(name=name, source=api.EventSource.WORKER, metadata={"k": 7}), destination)
    return 0


def _record_rdzv_events(run_id: str) -> int:
    """Route the ``dynamic_rendezvous`` event destination to stdout, then record rendezvous events through
    construct_and_record_rdzv_event: one RUNNING with every field, one with defaults, one FAILED while handling an
    exception. Each is one line of the serialized event on stdout."""
    import logging

    events, handlers = impl_module("events"), impl_module("events.handlers")
    console = logging.StreamHandler(sys.stdout)
    # The destination's handler lives in the handlers module's table (upstream: "Available destination could be
    # found in handlers.py"); get_logging_handler() hands it out. A NullHandler there means "nobody listens".
    handlers._log_handlers["dynamic_rendezvous"] = console
    if events.get_logging_handler("dynamic_rendezvous") is not console:
        print("the dynamic_rendezvous destination did not take the handler", file=sys.stderr)
        return 3
    states = events.NodeState
    events.construct_and_record_rdzv_event(run_id=run_id, message="all fields", node_state=states.RUNNING,
                                           name="Handler.next_rendezvous", hostname="conf-host", pid=4321,
                                           master_endpoint="conf-host:29400", local_id=2, rank=1)
    events.construct_and_record_rdzv_event(run_id, "defaults", states.INIT)
    try:
        raise RuntimeError("conformance-rdzv-failure")
    except RuntimeError:
        events.construct_and_record_rdzv_event(run_id, "failed", states.FAILED)
    sys.stdout.flush()
    print(f"pid={os.getpid()}", file=sys.stderr, flush=True)
    return 0


def _unix_http(socket_path: str, method: str, path: str) -> tuple[int, str]:
    """One HTTP/1.1 request over a Unix socket: (status code, body)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def _worker_main(socket_path: str) -> int:
    """Inside ``with worker_main()`` the control-plane server answers on $TORCH_WORKER_SERVER_SOCKET; after, not."""
    worker_main = impl_module("control_plane").worker_main
    report: dict = {}
    with worker_main():
        report["ping"] = _unix_http(socket_path, "POST", "/handler/ping")
        report["handlers"] = _unix_http(socket_path, "GET", "/handler/")
    try:
        _unix_http(socket_path, "POST", "/handler/ping")
        report["after"] = "still serving"
    except OSError as exc:
        report["after"] = type(exc).__name__
    print(json.dumps(report), flush=True)
    return 0


def _debug_info_logging(run_id: str) -> int:
    """Log expired timers at INFO (LOGLEVEL=INFO is set by the check) to stderr; an empty mapping logs nothing."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s|%(levelname)s|%(message)s", stream=sys.stderr)
    log = impl_module("timer.debug_info_logging").log_debug_info_for_expired_timers
    log(run_id, {})
    print("empty-done", file=sys.stderr, flush=True)
    log(run_id, {4242: ["scope-a", "scope-b"]})
    return 0


def _d_state(fifo: str) -> int:
    """Stay in uninterruptible sleep (D state) until killed: posix_spawn's child blocks opening a FIFO nobody writes,
    and the parent waits for it in the kernel (vfork) with every signal but SIGKILL blocked."""
    os.posix_spawn("/bin/true", ["true"], {}, file_actions=[(os.POSIX_SPAWN_OPEN, 3, fifo, os.O_RDONLY, 0)])
    return 0


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "sleep":
        time.sleep(float(args[0]))
        return 0
    if mode == "exit":
        return int(args[0])
    if mode == "echo":
        print(args[0], flush=True)
        print(f"err:{args[0]}", file=sys.stderr, flush=True)
        return 0
    if mode == "agent_worker":
        return _agent_worker(*args)
    if mode == "node_worker":
        return _node_worker(*args)
    if mode == "trap_sigterm":
        return _trap_sigterm(*args)
    if mode == "ignore_sigterm":
        return _ignore_sigterm(*args)
    if mode == "tee_run":
        return _tee_run(*args)
    if mode == "rdzv_node":
        return _rdzv_node(*args)
    if mode == "allreduce":
        return _allreduce(*args)
    if mode == "filetimer":
        return _file_timer(*args)
    if mode == "filetimer_server":
        return _file_timer_server(*args)
    if mode == "record_event":
        return _record_event(*args)
    if mode == "record_rdzv_events":
        return _record_rdzv_events(*args)
    if mode == "worker_main":
        return _worker_main(*args)
    if mode == "debug_info_logging":
        return _debug_info_logging(*args)
    if mode == "d_state":
        return _d_state(*args)
    print(f"conformance.workers: unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
