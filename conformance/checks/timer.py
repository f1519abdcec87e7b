"""torch.distributed.elastic.timer: expires/configure, local and file-based timer servers that reap workers."""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import subprocess
import sys
import threading
import time

from conformance.registry import check

T = "timer"
# The servers' max_interval here: an expired timer's worker should die within about that much after its expiry.
MAX_INTERVAL_S = 0.1
EXPIRE_AFTER_S = 0.5  # the expiring worker's expires(after=...)
REAP_BOUND_S = 8.0  # generous for a loaded machine; a server that waits for some 30 s default still fails it


def _recording_client(ctx):
    """A user-written TimerClient (the documented extension point) recording acquire/release calls."""
    base = ctx.get(f"{T}.TimerClient")

    class RecordingClient(base):
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def acquire(self, scope_id, expiration_time):
            self.calls.append(("acquire", scope_id, expiration_time))

        def release(self, scope_id):
            self.calls.append(("release", scope_id))

    return RecordingClient()


def _expires_round(ctx, client, use_configure: bool):
    expires = ctx.get(f"{T}.expires")
    before = time.time()
    if use_configure:
        ctx.get(f"{T}.configure")(client)
        with expires(after=5, scope="conformance-scope"):
            inside = list(client.calls)
    else:
        with expires(after=5, scope="conformance-scope", client=client):
            inside = list(client.calls)
    after = time.time()
    ctx.expect_equal([c[:2] for c in inside], [("acquire", "conformance-scope")], "calls inside expires()")
    deadline = inside[0][2]
    ctx.expect(before + 5 - 1 <= deadline <= after + 5 + 1, f"expiration_time {deadline} is not now+5 s")
    ctx.expect_equal(client.calls[-1], ("release", "conformance-scope"), "call when the expires() block ends")


@check(f"{T}.configure")
def configure(ctx) -> None:
    _expires_round(ctx, _recording_client(ctx), use_configure=True)
    # configure(None) leaves expires() without a default client: a RuntimeError, not a silent unguarded block.
    ctx.get(f"{T}.configure")(None)

    def unguarded():
        with ctx.get(f"{T}.expires")(after=5, scope="no-client"):
            pass

    ctx.expect_raises(RuntimeError, unguarded, what="expires() after configure(None)")


@check(f"{T}.expires")
def expires(ctx) -> None:
    client = _recording_client(ctx)
    _expires_round(ctx, client, use_configure=False)
    client.calls.clear()

    def failing():
        with ctx.get(f"{T}.expires")(after=5, scope="boom", client=client):
            raise KeyError("inside")

    ctx.expect_raises(KeyError, failing, what="exception inside expires()")
    ctx.expect_equal(client.calls[-1], ("release", "boom"), "release after an exception inside expires()")


def _local_timer_run(ctx):
    return ctx.resources.shared("local_timer", lambda: _local_timer_scenario(ctx))


def _local_timer_scenario(ctx):
    from conformance.workers import local_timer_child

    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    server = ctx.get(f"{T}.LocalTimerServer")(queue, max_interval=MAX_INTERVAL_S)
    server.start()
    stamp = ctx.resources.workdir / "local-timer-expire.stamp"
    procs = {mode: mp.Process(target=local_timer_child,
                              args=(queue, ctx.impl_root, mode, str(stamp) if mode == "expire" else ""), daemon=True)
             for mode in ("expire", "release")}
    died = None
    try:
        for p in procs.values():
            p.start()
        procs["expire"].join(60)  # first: when it returns is when the expiring worker died
        if procs["expire"].exitcode is not None:
            died = time.time()
        procs["release"].join(60)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)
        server.stop()
    return {"codes": {mode: p.exitcode for mode, p in procs.items()}, "reap": _reap_delay(stamp, died)}


def _reap_delay(stamp, died: float | None) -> float | None:
    """Seconds from just before the expiring worker acquired its timer to its death (None: not known)."""
    if died is None or not stamp.exists():
        return None
    return died - float(stamp.read_text())


def _expect_reaped_in_time(ctx, delay: float | None, server: str) -> None:
    """Killed after its timer expired (never before), and within REAP_BOUND_S of that (max_interval 0.1 s)."""
    if delay is None:
        ctx.expect(False, f"{server}: the expiring worker's acquire time or death was not observed")
        return
    ctx.expect(delay >= EXPIRE_AFTER_S - 0.05,
               f"{server} killed a worker {delay:.2f} s after it acquired expires(after={EXPIRE_AFTER_S}): before "
               "its timer expired")
    ctx.expect(delay <= EXPIRE_AFTER_S + REAP_BOUND_S,
               f"{server} (max_interval {MAX_INTERVAL_S} s) killed a worker {delay:.2f} s after it acquired "
               f"expires(after={EXPIRE_AFTER_S}): more than {REAP_BOUND_S} s after its timer expired")


@check(f"{T}.LocalTimerServer", timeout=150)
def local_timer_server(ctx) -> None:
    run = _local_timer_run(ctx)
    ctx.expect_equal(run["codes"]["expire"], -9,
                     "exit code of a worker whose LocalTimerClient timer expired (SIGKILL)")
    _expect_reaped_in_time(ctx, run["reap"], "LocalTimerServer")
    ctx.expect(issubclass(ctx.get(f"{T}.LocalTimerServer"), ctx.get(f"{T}.TimerServer")), "not a TimerServer")


@check(f"{T}.LocalTimerClient", timeout=150)
def local_timer_client(ctx) -> None:
    codes = _local_timer_run(ctx)["codes"]
    ctx.expect_equal(codes["release"], 0, "exit code of a worker that released its timer in time")
    ctx.expect_equal(codes["expire"], -9, "exit code of a worker whose timer expired")
    ctx.expect(issubclass(ctx.get(f"{T}.LocalTimerClient"), ctx.get(f"{T}.TimerClient")), "not a TimerClient")


def _file_timer_run(ctx):
    return ctx.resources.shared("file_timer", lambda: _file_timer_scenario(ctx))


def _file_timer_scenario(ctx):
    """A FileTimerServer process and two real workers: one releases its timer in time, one lets it expire."""
    path = str(ctx.resources.workdir / "file-timer.pipe")
    ready = ctx.resources.workdir / "file-timer.ready"
    env = dict(os.environ)
    env.update(ctx.worker_env())

    def spawn(*args):
        return subprocess.Popen([sys.executable, "-m", "conformance.workers", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # It lives long enough for both workers even on a loaded machine; it is killed as soon as they are done.
    server = spawn("filetimer_server", path, ctx.run_id("ft"), str(ready), "140")
    stamp = ctx.resources.workdir / "file-timer-expire.stamp"
    procs = {}
    died = None
    try:
        deadline = time.monotonic() + 60  # the server process imports the implementation (torch: slow under load)
        while not ready.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ctx.expect(ready.exists(), f"FileTimerServer process did not start: {server.poll()} {_tail(server)}")
        codes = {}
        for mode in ("release", "expire"):  # release first: the server may end itself after a reap
            procs[mode] = spawn("filetimer", path, mode, *([str(stamp)] if mode == "expire" else []))
            codes[mode] = procs[mode].wait(60)
        died = time.time()
        errs = {mode: _tail(p) for mode, p in procs.items()}
    finally:
        for p in [*procs.values(), server]:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    return {"codes": codes, "stderr": errs, "reap": _reap_delay(stamp, died)}


def _tail(proc) -> str:
    if proc.poll() is None:
        return ""
    lines = (proc.stderr.read() or "").strip().splitlines()
    return lines[-1] if lines else ""


@check(f"{T}.FileTimerServer", timeout=150)
def file_timer_server(ctx) -> None:
    run = _file_timer_run(ctx)
    ctx.expect_equal(run["codes"]["expire"], -9, f"exit code of a worker whose file timer expired ({run['stderr']})")
    _expect_reaped_in_time(ctx, run["reap"], "FileTimerServer")


@check(f"{T}.FileTimerClient", timeout=150)
def file_timer_client(ctx) -> None:
    run = _file_timer_run(ctx)
    ctx.expect_equal(run["codes"]["release"], 0, f"worker that released its file timer in time ({run['stderr']})")
    ctx.expect_equal(run["codes"]["expire"], -9, "worker whose file timer expired")
    client_cls = ctx.get(f"{T}.FileTimerClient")
    # A worker may acquire before its server has created the FIFO: the client retries for about a second.
    path = str(ctx.tmpdir / "late-server.pipe")
    server = ctx.get(f"{T}.FileTimerServer")(path, ctx.run_id("late"), max_interval=0.05)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        client_cls(path).acquire("late-scope", time.time() + 3600)
        client_cls(path).release("late-scope")
        ctx.expect(True, "acquire() while the FileTimerServer was still starting")
    except BrokenPipeError as e:
        ctx.expect(False, f"acquire() 0.3 s before the FileTimerServer started: {e}")
    finally:
        starter.join()
        server.stop()
    # Documented: "Using a negative or zero signal will not kill the process". The request is written to the FIFO
    # as FileTimerClient(path, signal=0) in that process writes it.
    path = str(ctx.tmpdir / "signal-zero.pipe")
    sleeper = subprocess.Popen(["sleep", "30"])
    server = ctx.get(f"{T}.FileTimerServer")(path, ctx.run_id("sig0"), max_interval=0.01)
    server.start()
    try:
        deadline = time.monotonic() + 10  # upstream's server opens its FIFO in the watchdog thread
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        request = {"version": 1, "pid": sleeper.pid, "scope_id": "s", "expiration_time": 1.0, "signal": 0}
        try:
            os.write(fd, (json.dumps(request) + "\n").encode())
        finally:
            os.close(fd)
        time.sleep(0.5)  # many watchdog passes
        ctx.expect_equal(sleeper.poll(), None, "exit code of a worker whose expired timer has signal 0 (not killed)")
    finally:
        server.stop()
        sleeper.kill()
        sleeper.wait()
    # Nobody listening: BrokenPipeError. A request longer than PIPE_BUF (not atomic on a pipe): RuntimeError.
    ctx.expect_raises(BrokenPipeError, client_cls(str(ctx.tmpdir / "nobody.pipe")).acquire, "s", time.time() + 60,
                      what="acquire() with no FileTimerServer")
    plain = ctx.tmpdir / "plain-file"
    plain.write_text("")
    ctx.expect_raises(RuntimeError, client_cls(str(plain)).acquire, "x" * select.PIPE_BUF, time.time() + 60,
                      what="acquire() of a request longer than PIPE_BUF")


@check(f"{T}.TimerRequest")
def timer_request(ctx) -> None:
    tr = ctx.get(f"{T}.TimerRequest")
    req = tr(worker_id=7, scope_id="s", expiration_time=12.5)
    ctx.expect_equal((req.worker_id, req.scope_id, req.expiration_time), (7, "s", 12.5), "TimerRequest fields")
    ctx.expect(req == tr(7, "s", 12.5) and req != tr(7, "s", 13.0), "TimerRequest equality by value")


def _server(ctx):
    return ctx.get(f"{T}.LocalTimerServer")(multiprocessing.get_context("spawn").Queue(), max_interval=0.1)


@check(f"{T}.TimerServer")
def timer_server(ctx) -> None:
    base = ctx.get(f"{T}.TimerServer")
    ctx.expect_raises(TypeError, base, None, 1.0, what="instantiating the abstract TimerServer")
    ctx.expect({"register_timers", "clear_timers", "get_expired_timers"} <= set(base.__abstractmethods__),
               f"abstract methods {sorted(base.__abstractmethods__)}")


@check(f"{T}.TimerServer.register_timers")
def register_timers(ctx) -> None:
    tr = ctx.get(f"{T}.TimerRequest")
    server = _server(ctx)
    now = time.time()
    server.register_timers([tr(1, "a", now + 1), tr(1, "b", now + 100), tr(2, "a", now + 1)])
    expired = server.get_expired_timers(now + 2)
    ctx.expect_equal(sorted(expired), [1, 2], "workers with expired timers")
    server.register_timers([tr(1, "a", -1)])  # a negative expiration releases the scope
    expired = server.get_expired_timers(now + 2)
    ctx.expect_equal(sorted(expired), [2], "expired workers after worker 1 released scope 'a'")


@check(f"{T}.TimerServer.clear_timers")
def clear_timers(ctx) -> None:
    tr = ctx.get(f"{T}.TimerRequest")
    server = _server(ctx)
    now = time.time()
    server.register_timers([tr(1, "a", now + 1), tr(2, "a", now + 1)])
    server.clear_timers({1})
    ctx.expect_equal(sorted(server.get_expired_timers(now + 10)), [2], "expired workers after clear_timers({1})")


@check(f"{T}.TimerServer.get_expired_timers")
def get_expired_timers(ctx) -> None:
    tr = ctx.get(f"{T}.TimerRequest")
    server = _server(ctx)
    now = time.time()
    early, late = tr(1, "early", now + 1), tr(1, "late", now + 100)
    server.register_timers([early, late])
    ctx.expect_equal(server.get_expired_timers(now), {}, "nothing expired before any deadline")
    got = server.get_expired_timers(now + 2)
    ctx.expect_equal([r.scope_id for r in got.get(1, [])], ["early"], "timers expired by now+2")


@check(f"{T}.TimerClient")
def timer_client(ctx) -> None:
    base = ctx.get(f"{T}.TimerClient")
    ctx.expect_raises(TypeError, base, what="instantiating the abstract TimerClient")
    ctx.expect({"acquire", "release"} <= set(base.__abstractmethods__), "acquire/release not abstract")


@check(f"{T}.TimerClient.acquire")
def client_acquire(ctx) -> None:
    client = _recording_client(ctx)
    with ctx.get(f"{T}.expires")(after=3, scope="acq", client=client):
        ctx.expect_equal(len(client.calls), 1, "acquire calls on entering expires()")
    ctx.expect_equal(client.calls[0][:2], ("acquire", "acq"), "acquire(scope_id, expiration_time)")


@check(f"{T}.TimerClient.release")
def client_release(ctx) -> None:
    client = _recording_client(ctx)
    with ctx.get(f"{T}.expires")(after=3, scope="rel", client=client):
        pass
    ctx.expect_equal(client.calls[-1], ("release", "rel"), "release(scope_id) on leaving expires()")
