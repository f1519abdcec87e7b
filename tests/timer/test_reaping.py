"""Real worker processes: overrunning an ``expires`` block gets them killed by the timer server."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time

import pytest

from elastic_impl import timer

pytestmark = pytest.mark.timeout(60)

# fork: the worker function lives in this module, and forking is cheap (no torch imported here)
FORK = mp.get_context("fork")


def _local_worker(queue, block_seconds: float, done):
    timer.configure(timer.LocalTimerClient(queue))
    with timer.expires(after=0.5, scope="step"):
        time.sleep(block_seconds)
    done.set()


def _wait_exit(proc, timeout=20.0):
    proc.join(timeout)
    assert not proc.is_alive(), "worker still running"
    return proc.exitcode


def test_local_server_kills_overrunning_worker_and_spares_punctual_one(servers, mp_procs):
    queue = FORK.Queue()
    slow_done, fast_done = FORK.Event(), FORK.Event()
    slow = FORK.Process(target=_local_worker, args=(queue, 30, slow_done))
    fast = FORK.Process(target=_local_worker, args=(queue, 0.0, fast_done))
    mp_procs += [slow, fast]
    slow.start()
    fast.start()
    server = timer.LocalTimerServer(queue, max_interval=0.1)
    servers.append(server)
    server.start()
    assert _wait_exit(fast) == 0 and fast_done.is_set()
    assert _wait_exit(slow) == -signal.SIGKILL and not slow_done.is_set()


def test_local_server_force_expire_reaps_now(servers, mp_procs):
    queue = FORK.Queue()
    done = FORK.Event()
    worker = FORK.Process(target=_local_worker, args=(queue, 30, done))
    mp_procs.append(worker)
    worker.start()
    server = timer.LocalTimerServer(queue, max_interval=0.1)
    # drive it by hand: register the worker's request, then force-expire long before 0.5 s could pass virtually
    deadline = time.monotonic() + 10
    while not server.get_expired_timers(float("inf")) and time.monotonic() < deadline:
        server.run_once(wait=0.1)
    assert server.expire_timer(worker.pid) == 1
    assert server.run_once() == [worker.pid]
    assert _wait_exit(worker) == -signal.SIGKILL


FILE_WORKER = """
import sys, time
from elastic_impl import timer
timer.configure(timer.FileTimerClient(sys.argv[1]))
with timer.expires(after=0.5, scope="step"):
    time.sleep(float(sys.argv[2]))
print("finished", flush=True)
"""


def test_file_server_kills_overrunning_worker_and_spares_punctual_one(tmp_path, servers, spawn):
    fifo = str(tmp_path / "timer.fifo")
    events = []
    server = timer.FileTimerServer(
        fifo, "run1", max_interval=0.1, log_event=lambda name, req: events.append((name, req))
    )
    servers.append(server)
    server.start()
    slow = spawn(FILE_WORKER, fifo, "30")
    fast = spawn(FILE_WORKER, fifo, "0")
    assert fast.wait(timeout=20) == 0 and fast.stdout.read() == b"finished\n"
    assert slow.wait(timeout=20) == -signal.SIGKILL and slow.stdout.read() == b""
    assert [(name, req.worker_pid, req.scope_id) for name, req in events] == [
        ("timer_expired", slow.pid, "step")
    ]


def test_file_server_uses_client_signal_and_stop_removes_fifo(tmp_path, servers, spawn):
    fifo = tmp_path / "timer.fifo"
    server = timer.FileTimerServer(str(fifo), "run2", max_interval=0.1)
    servers.append(server)
    server.start()
    code = FILE_WORKER.replace("FileTimerClient(sys.argv[1])", "FileTimerClient(sys.argv[1], signal=15)")
    worker = spawn(code, str(fifo), "30")
    assert worker.wait(timeout=20) == -signal.SIGTERM
    server.stop()
    assert not fifo.exists()


def test_unstarted_server_never_removes_anothers_fifo(tmp_path, servers):
    fifo = tmp_path / "shared.fifo"
    running = timer.FileTimerServer(str(fifo), "run3", max_interval=0.1)
    servers.append(running)
    running.start()
    idle = timer.FileTimerServer(str(fifo), "run3", max_interval=0.1)
    idle.stop()
    del idle
    assert fifo.exists()
    timer.FileTimerClient(str(fifo)).release("s")  # still reachable
