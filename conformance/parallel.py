"""Run a certification in several worker processes (``elastic-conformance certify --jobs N``).

Most of a certification is waiting on real processes (workers importing torch, agents restarting, timers
expiring), so a few workers finish it much sooner even on 2 cores. Rows are handed out by check group (the check
module: agent, timer, ...) because the rows of a group share expensive real scenarios (one agent run, one timer
run) that must run once, not once per worker. Each worker has its own TCPStore/etcd, runs each row exactly as the
serial runner does (same checks, same timeouts) and reaps what its checks leave behind; results come back in
table order.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from conformance.adapters import Adapter
from conformance.device import Device
from conformance.registry import REGISTRY, load_checks
from conformance.table import Row

# Groups that run real multi-process scenarios go first, so the long ones do not end up last on one worker.
_LONGEST_FIRST = ("agent", "multiprocessing", "timer", "rendezvous", "etcd", "dynamic", "events", "errors")
_PR_SET_CHILD_SUBREAPER = 36


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def _set_subreaper(on: bool) -> None:
    # While the workers run, processes orphaned by a worker that died re-parent to us instead of init, so the
    # final sweep still finds (and reaps) them.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _sweep(began: int, exclude: set[int]) -> None:
    from conformance.context import descendants, kill_pids

    leftovers = [pid for pid in descendants(os.getpid(), began) if pid not in exclude]
    if not leftovers:
        return
    print(f"conformance: killing {len(leftovers)} process(es) left behind by checks: {leftovers}", file=sys.stderr)
    kill_pids(leftovers)
    deadline = time.monotonic() + 5
    pending = set(leftovers)
    while pending and time.monotonic() < deadline:  # adopted orphans are our children now: reap them
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except ChildProcessError:
                pass
            pending.discard(pid)
        time.sleep(0.05)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # quiet in a multiprocessing child, and every finally runs


def _worker(adapter: Adapter, device: Device, workdir: str | None, quiet_logs: bool,
            tasks: multiprocessing.Queue, results: multiprocessing.Queue) -> None:
    from conformance import runner
    from conformance.context import SuiteResources
    from conformance.signatures import load_snapshot

    # A SIGTERM (the parent's, or one sent to the whole group) unwinds through the finally below, which stops this
    # worker's etcd/TCPStore and reaps what its checks started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if quiet_logs:
        logging.disable(logging.ERROR)
    load_checks()
    snapshot = load_snapshot()
    began = runner._now_ticks()
    with tempfile.TemporaryDirectory(prefix="conformance-", dir=workdir) as tmp:
        resources = SuiteResources(adapter, device, Path(tmp))
        try:
            while True:
                batch = tasks.get()
                if batch is None:
                    break
                for index, row in batch:
                    results.put((index, runner.run_row(row, resources, snapshot)))
        finally:
            resources.close()
            if began is not None:
                runner._reap_leftovers(max(began, runner.process_start_ticks(os.getpid())))


def _batches(indexed_rows: list[tuple[int, Row]]) -> list[list[tuple[int, Row]]]:
    groups: dict[str, list[tuple[int, Row]]] = {}
    for index, row in indexed_rows:
        groups.setdefault(REGISTRY[row.api].group, []).append((index, row))

    def rank(group: str) -> tuple[int, int]:
        position = _LONGEST_FIRST.index(group) if group in _LONGEST_FIRST else len(_LONGEST_FIRST)
        return position, -len(groups[group])

    return [groups[g] for g in sorted(groups, key=rank)]


def certify_parallel(
    rows: Iterable[Row],
    adapter: Adapter,
    device: Device,
    *,
    jobs: int,
    progress: Callable[[int, int, object], None] | None = None,
    workdir: Path | None = None,
    quiet_logs: bool = False,
) -> list:
    """Like :func:`conformance.runner.certify`, with the check groups spread over ``jobs`` worker processes."""
    from conformance import runner

    load_checks()
    rows = list(rows)
    results: list = [None] * len(rows)
    done = 0

    def record(index: int, result) -> None:
        nonlocal done
        results[index] = result
        done += 1
        if progress is not None:
            progress(done, len(rows), result)

    checked = []
    for index, row in enumerate(rows):
        if row.api in REGISTRY:
            checked.append((index, row))
        else:  # the serial runner's verdict for a row without a check, without a worker
            record(index, runner.Result(row.api, "-", row.claimed, "fail", 0.0, runner.NO_CHECK,
                                        f"no check registered for {row.api}"))
    batches = _batches(checked)
    if not batches:
        return results
    _set_subreaper(True)
    began = runner._now_ticks()
    mp = multiprocessing.get_context("spawn")  # no inherited threads/locks from this process
    tasks, replies = mp.Queue(), mp.Queue()
    for batch in batches:
        tasks.put(batch)
    workers = [
        mp.Process(target=_worker, args=(adapter, device, str(workdir) if workdir else None, quiet_logs, tasks,
                                         replies), name=f"conformance-worker-{n}")
        for n in range(min(jobs, len(batches)))
    ]
    for _ in workers:
        tasks.put(None)
    try:
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers) or not replies.empty():
            try:
                index, result = replies.get(timeout=0.2)
            except queue.Empty:
                continue
            record(index, result)
        # A result put just before its worker exited may still be in flight through the queue's pipe.
        deadline = time.monotonic() + 5
        while done < len(rows) and time.monotonic() < deadline:
            try:
                record(*replies.get(timeout=0.2))
            except queue.Empty:
                pass
    finally:
        for worker in workers:  # a SIGTERM first, so each worker stops its own servers (SIGKILL if it hangs)
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(10)
        if began is not None:
            _sweep(began, {worker.pid for worker in workers if worker.is_alive()})
        _set_subreaper(False)
    codes = {worker.name: worker.exitcode for worker in workers}
    for index, row in enumerate(rows):
        if results[index] is None:  # its worker died (killed, crashed) before reporting it
            record(index, runner.Result(row.api, REGISTRY[row.api].group, row.claimed, "fail", 0.0,
                                        runner.verdict_for(row.supported, "fail"),
                                        f"conformance worker process died before running this row (exit codes {codes})"))
    return results
