"""Measure the certifier: plant known bugs (mutants) in a copy of elastic_impl and see whether certification fails.

``python -m conformance.mutation [--only NAME,...] [--jobs N] [--json out.json]``

Each mutant is one small, realistic bug in a public behaviour of ``elastic_impl``: an exact snippet of a source file
and its replacement. For each mutant the runner copies ``elastic_impl`` and ``conformance`` into a fresh temporary
directory (the working tree is never edited: other people work in it), applies the replacement there, and runs
``python -m conformance.cli certify --impl elastic_impl --table all-supported -k ROWS`` from that directory, so the
certifier, its worker processes and the launcher all import the mutated copy. ``ROWS`` are the rows of the module
the mutant lives in (the rows a vendor's bug there would be certified by); a mutant is

- KILLED when the certification fails (exit status 1: a VIOLATION), or runs past its time limit;
- SURVIVED when it passes (exit status 0): the certifier cannot tell this bug from the real thing;
- STALE when its snippet no longer occurs exactly once in the source (the code moved on: update the mutant);
- ERROR when the certifier itself could not run (any other exit status).

``--table all-supported`` claims every row supported, so no row (the etcd rows included) can hide a bug behind a
"no" claim. The run first certifies the unmutated copy over the union of all rows used: if that fails, no mutant
result would mean anything and the run stops.

The score is killed / (killed + survived); mutants marked ``equivalent`` (no observable change; listed for the
record) are not run. Results of the last full run are recorded in conformance/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from conformance.context import REPO_ROOT

AGENT_ROWS = "agent.server"
MP_ROWS = "multiprocessing.api,multiprocessing.start_processes"
ERROR_ROWS = "multiprocessing.errors"
RDZV_ROWS = "rendezvous.dynamic_rendezvous,rendezvous.c10d_rendezvous_backend,rendezvous.Rendezvous,rendezvous.api"
ETCD_ROWS = "etcd"
TIMER_ROWS = "elastic.timer"
METRIC_ROWS = "elastic.metrics"
EVENT_ROWS = "elastic.events"
MUTANT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to elastic_impl/
    old: str  # must occur exactly once
    new: str
    rows: str  # -k pattern: the rows certifying this module
    bug: str  # what a user would see
    equivalent: str = ""  # non-empty: why no caller can observe it (not run)
    also: tuple[tuple[str, str, str], ...] = ()  # further (path, old, new) edits of the same bug, each exactly once

    def edits(self) -> tuple[tuple[str, str, str], ...]:
        return ((self.path, self.old, self.new), *self.also)


MUTANTS: tuple[Mutant, ...] = (
    # -- agent -------------------------------------------------------------------------------------------------
    Mutant("interleaved-ranks", "agent/server/api.py", "global_rank=global_base + lr,",
           "global_rank=lr * group_world_size + group_rank,", AGENT_ROWS,
           "global ranks interleaved across nodes instead of node-contiguous"),
    Mutant("role-rank-local", "agent/server/api.py", "role_rank=role_base + lr,", "role_rank=lr,", AGENT_ROWS,
           "ROLE_RANK restarts at 0 on every node"),
    Mutant("role-world-local", "agent/server/api.py", "role_world_size=role_world_size,",
           "role_world_size=spec.local_world_size,", AGENT_ROWS, "ROLE_WORLD_SIZE is the node's worker count"),
    Mutant("local-world-is-world", "agent/server/local_elastic_agent.py",
           '"LOCAL_WORLD_SIZE": str(spec.local_world_size),', '"LOCAL_WORLD_SIZE": str(worker.world_size),',
           AGENT_ROWS, "LOCAL_WORLD_SIZE equal to WORLD_SIZE"),
    Mutant("group-world-size-env", "agent/server/local_elastic_agent.py",
           '"GROUP_WORLD_SIZE": str(worker_group.group_world_size),', '"GROUP_WORLD_SIZE": "1",', AGENT_ROWS,
           "GROUP_WORLD_SIZE always 1"),
    Mutant("workers-share-rendezvous-store", "agent/server/api.py",
           "        if group_rank == 0:\n            addr = spec.master_addr or spec.local_addr",
           "        if bootstrap is not None:\n            return bootstrap.master_addr, bootstrap.master_port\n"
           "        if group_rank == 0:\n            addr = spec.master_addr or spec.local_addr", AGENT_ROWS,
           "workers are handed the agent's rendezvous store (upstream's default, pytorch/pytorch#135712): a restarted "
           "group's init_process_group reads the previous attempt's addresses and fails",
           also=(("agent/server/local_elastic_agent.py", '"TORCHELASTIC_USE_AGENT_STORE": "False",',
                  '"TORCHELASTIC_USE_AGENT_STORE": "True",'),)),
    Mutant("exit-barrier-no-wait", "agent/server/api.py", "if arrived >= group_world_size:", "if arrived >= 1:",
           AGENT_ROWS, "the exit barrier lets a node leave before the others' workers finished"),
    Mutant("stop-workers-noop", "agent/server/local_elastic_agent.py",
           "    def _stop_workers(self, worker_group: WorkerGroup) -> None:\n"
           "        self._close_pcontext(signal.SIGTERM, self._shutdown_timeout)",
           "    def _stop_workers(self, worker_group: WorkerGroup) -> None:\n        self._pcontext = None",
           AGENT_ROWS, "_stop_workers forgets the workers instead of stopping them (healthy workers keep running)"),
    # -- metrics -------------------------------------------------------------------------------------------------
    Mutant("put-metric-default-group", "metrics/api.py",
           'def put_metric(metric_name: str, metric_value: int, metric_group: str = "torchelastic"):',
           'def put_metric(metric_name: str, metric_value: int, metric_group: str = "default"):', METRIC_ROWS,
           "put_metric without a group lands in a group nobody configured (the documented default is torchelastic)"),
    Mutant("bare-prof-untimed", "metrics/api.py", "    if fn:\n        return wrap(fn)\n    return wrap",
           "    if fn:\n        return fn\n    return wrap", METRIC_ROWS,
           "a bare @prof returns the function undecorated: no success/failure/duration metrics"),
    Mutant("prof-seconds", "metrics/api.py", "return int((time.time() - start_time_in_seconds) * 1000)",
           "return int(time.time() - start_time_in_seconds)", METRIC_ROWS, "prof durations in seconds, not ms"),
    Mutant("configure-default-ignored", "metrics/api.py", "        _default_metrics_handler = handler\n",
           "        _metrics_map['None'] = handler\n", METRIC_ROWS,
           "configure(handler) without a group does not set the default handler"),
    # -- multiprocessing -----------------------------------------------------------------------------------------
    Mutant("wait-timeout-ignored", "multiprocessing/api.py", "        expiry = self.clock.monotonic() + timeout\n",
           "        expiry = self.clock.monotonic()\n", MP_ROWS,
           "PContext.wait(timeout) returns at once instead of waiting up to timeout"),
    Mutant("partial-std-map-defaults-to-all", "multiprocessing/api.py",
           "return {r: Std(val_or_map.get(r, Std.NONE)) for r in range(local_world_size)}",
           "return {r: Std(val_or_map.get(r, Std.ALL)) for r in range(local_world_size)}", MP_ROWS,
           "redirects/tee given for some ranks redirect every other rank's output too (documented: NONE)"),
    Mutant("local-ranks-filter-ignored", "multiprocessing/api.py",
           "if not self._local_ranks_filter or local_rank in self._local_ranks_filter:", "if True:", MP_ROWS,
           "--local-ranks-filter is ignored: every rank's output is teed to the console"),
    Mutant("default-log-dir-shared", "multiprocessing/api.py", 'log_dir = tempfile.mkdtemp(prefix="torchelastic_")',
           'log_dir = os.path.join(tempfile.gettempdir(), "torchelastic_logs"); os.makedirs(log_dir, exist_ok=True)',
           MP_ROWS, "DefaultLogsSpecs() without a log_dir writes every run into one shared temp folder"),
    Mutant("tee-ignored", "multiprocessing/api.py", "                if tee_std & Std.OUT == Std.OUT:",
           "                if False:", MP_ROWS, "tee of stdout ignored (nothing reaches the console)"),
    # -- etcd ----------------------------------------------------------------------------------------------------
    Mutant("etcd-add-not-atomic", "rendezvous/etcd_store.py", "prevIndex=node.modifiedIndex)", ")", ETCD_ROWS,
           "EtcdStore.add is a read-modify-write without compare-and-swap (concurrent adds are lost)"),
    Mutant("etcd-wait-timeout-ignored", "rendezvous/etcd_store.py",
           "timeout = self.timeout if override_timeout is None else override_timeout",
           "timeout = self.timeout", ETCD_ROWS, "EtcdStore.wait ignores its override_timeout"),
    # -- rendezvous ----------------------------------------------------------------------------------------------
    Mutant("dead-node-never-evicted", "rendezvous/dynamic_rendezvous/state.py",
           "return self.keep_alive_seconds * self.keep_alive_max_attempt",
           "return self.keep_alive_seconds * self.keep_alive_max_attempt * 1000", RDZV_ROWS,
           "a participant whose heartbeats stopped is never evicted"),
    Mutant("c10d-set-state-no-cas", "rendezvous/c10d_rendezvous_backend.py",
           'current = self._compare_set(token if token is not None else b"", state)',
           'self._store.set(self._key, state)\n        current = state', RDZV_ROWS,
           "C10dRendezvousBackend.set_state overwrites instead of compare-and-set"),
    Mutant("join-timeout-ignored", "rendezvous/dynamic_rendezvous/stepper.py",
           "self._join_deadline = self.clock.time() + self.settings.timeout.join.total_seconds()",
           "self._join_deadline = self.clock.time() + 3600 * self.settings.timeout.join.total_seconds()", RDZV_ROWS,
           "a node waits far beyond the join timeout for missing nodes"),
    Mutant("get-as-bool-yes", "rendezvous/api.py", 'if text in ("1", "true", "t", "yes", "y"):',
           'if text in ("1", "true", "t"):', RDZV_ROWS, "RendezvousParameters.get_as_bool rejects 'yes'/'y'"),
    # -- more agent --------------------------------------------------------------------------------------------
    Mutant("restart-count-env-zero", "agent/server/local_elastic_agent.py",
           '"TORCHELASTIC_RESTART_COUNT": str(self._restart_count),', '"TORCHELASTIC_RESTART_COUNT": "0",', AGENT_ROWS,
           "TORCHELASTIC_RESTART_COUNT stays 0 after a restart"),
    Mutant("is-running-unhealthy", "agent/server/api.py",
           "return state in {WorkerState.HEALTHY, WorkerState.UNHEALTHY}", "return state in {WorkerState.HEALTHY}",
           AGENT_ROWS, "WorkerState.is_running(UNHEALTHY) is False"),
    Mutant("entrypoint-name-full-path", "agent/server/api.py", "return os.path.basename(self.entrypoint)",
           "return self.entrypoint", AGENT_ROWS, "WorkerSpec.get_entrypoint_name() returns the whole path"),
    # -- errors --------------------------------------------------------------------------------------------------
    Mutant("first-failure-is-last", "multiprocessing/errors/__init__.py",
           "rank = min(self.failures, key=lambda r: (self.failures[r].timestamp, r))",
           "rank = max(self.failures, key=lambda r: (self.failures[r].timestamp, r))", ERROR_ROWS,
           "ChildFailedError blames the last failure, not the first (root cause)"),
    Mutant("record-no-error-file", "multiprocessing/errors/__init__.py",
           "            handler.record_exception(e)\n            raise", "            raise", ERROR_ROWS,
           "@record re-raises without writing the error file"),
    # -- timer ---------------------------------------------------------------------------------------------------
    Mutant("local-timer-never-expires", "timer/local_timer.py", "if request.expiration_time <= deadline:",
           "if request.expiration_time <= deadline - 3600:", TIMER_ROWS, "LocalTimerServer never sees a timer expire"),
    Mutant("file-timer-never-expires", "timer/file_based_local_timer.py", "if request.expiration_time <= deadline:",
           "if request.expiration_time <= deadline - 3600:", TIMER_ROWS, "FileTimerServer never sees a timer expire"),
    Mutant("local-timer-reap-noop", "timer/local_timer.py", "os.kill(worker_id, signal.SIGKILL)",
           "os.kill(worker_id, 0)", TIMER_ROWS, "LocalTimerServer 'reaps' a worker without killing it"),
    Mutant("local-timer-release-ignored", "timer/local_timer.py", "                    self._timers.pop(key, None)",
           "                    pass", TIMER_ROWS, "releasing a LocalTimerClient timer does not cancel it"),
    Mutant("local-timer-clear-noop", "timer/local_timer.py",
           "            for key in [k for k in self._timers if k[0] in worker_ids]:\n                del self._timers[key]",
           "            pass", TIMER_ROWS, "TimerServer.clear_timers leaves the timers"),
    # -- metrics / events ------------------------------------------------------------------------------------------
    Mutant("put-metric-drops-value", "metrics/api.py",
           "self.handler.emit(MetricData(time.time(), self.group_name, metric_name, metric_value))",
           "self.handler.emit(MetricData(time.time(), self.group_name, metric_name, 0))", METRIC_ROWS,
           "put_metric emits 0 instead of the value"),
    # -- expected blind spots (behaviour the certifier does not exercise in real time yet) -------------------------
    Mutant("close-death-sig-ignored", "multiprocessing/api.py",
           "        if not death_sig:\n            death_sig = signal.SIGTERM\n",
           "        death_sig = signal.SIGKILL\n", MP_ROWS,
           "PContext.close() SIGKILLs at once: workers never get death_sig (no chance to clean up)"),
    Mutant("exit-barrier-timeout-ignored", "agent/server/api.py",
           "if self._clock.monotonic() - start > self._exit_barrier_timeout:",
           "if self._clock.monotonic() - start > self._exit_barrier_timeout * 1000:", AGENT_ROWS,
           "the exit barrier waits ~1000x exit_barrier_timeout for a node that never arrives"),
    Mutant("close-timeout-ignored", "rendezvous/dynamic_rendezvous/handler.py",
           '    def set_closed(self) -> None:\n        self._run("close", self._settings.timeout.close.total_seconds())',
           '    def set_closed(self) -> None:\n        self._run("close", 3600.0)', RDZV_ROWS,
           "set_closed() retries lost compare-and-sets for an hour instead of giving up after timeout.close"),
    Mutant("event-record-dropped", "events/__init__.py",
           "        _get_or_create_logger(destination).info(event.serialize())", "        pass", EVENT_ROWS,
           "events.record never reaches the destination's logger"),
    Mutant("last-call-ignored", "rendezvous/dynamic_rendezvous/keyed.py",
           "proposed = repr(now + settings.timeout.last_call.total_seconds()).encode()", "proposed = repr(now).encode()",
           RDZV_ROWS, "a round completes at min_nodes without waiting for the last call (c10d/store path)"),
    Mutant("num-nodes-waiting-zero", "rendezvous/dynamic_rendezvous/handler.py",
           "        return num_nodes_waiting_in(state, self._settings, self._stepper.completed_round)",
           "        return 0", RDZV_ROWS + "," + AGENT_ROWS,
           "num_nodes_waiting() always 0: a joining node never makes running nodes re-rendezvous"),
    # Issue 17 (behaviour matched this session; each row's check was seen failing on the code before the fix).
    Mutant("d-state-ignored", "agent/server/local_elastic_agent.py",
           "stuck = self._stuck_workers(worker_group) if self._stuck_timeout > 0 else None", "stuck = None",
           AGENT_ROWS, "a worker stuck in uninterruptible sleep is never noticed: the agent waits for it forever"),
    Mutant("timer-signal-zero-kills", "timer/file_based_local_timer.py",
           'sig = next((r.signal for r in expired or requests if getattr(r, "signal", 0) > 0), None)',
           'sig = next((r.signal or 9 for r in expired or requests), None)', TIMER_ROWS,
           "a FileTimerClient(signal=0) worker, documented as never killed, is SIGKILLed when its timer expires"),
    Mutant("token-without-state-is-state", "rendezvous/c10d_rendezvous_backend.py",
           "absent = current == _ABSENT or current == b\"\" or (token is not None and current == token and current != state)",
           "absent = current == _ABSENT or current == b\"\"", RDZV_ROWS,
           "set_state with a token when no state is stored hands the token back as if it were the state"),
    # Issue 12 item 1 follow-ups: timed upper/lower bounds and behaviour of rows that only checked shapes.
    Mutant("last-call-is-heartbeat-expiry", "rendezvous/dynamic_rendezvous/keyed.py",
           "proposed = repr(now + settings.timeout.last_call.total_seconds()).encode()",
           "proposed = repr(now + settings.heartbeat_expiry_seconds).encode()", RDZV_ROWS,
           "the last call (c10d/store path) lasts one heartbeat expiry (keep-alive interval x attempts, 15 s by "
           "default) instead of timeout.last_call"),
    Mutant("evict-after-one-interval", "rendezvous/dynamic_rendezvous/state.py",
           "return self.keep_alive_seconds * self.keep_alive_max_attempt", "return self.keep_alive_seconds",
           RDZV_ROWS, "a node is declared dead after one missed heartbeat interval, not keep_alive_max_attempt"),
    Mutant("timer-watchdog-default-wait", "timer/api.py", "self.run_once(self._max_interval)", "self.run_once(10.0)",
           TIMER_ROWS, "the timer watchdog waits FileTimerServer's default 10 s for requests between passes, not the "
           "max_interval given: a worker whose timer expired is killed up to 10 s late"),
    Mutant("close-grace-ignored", "multiprocessing/api.py", "self._close(death_sig=death_sig, timeout=timeout)",
           "self._close(death_sig=death_sig)", MP_ROWS,
           "PContext.close(timeout=...) ignores its timeout: a worker ignoring death_sig is killed after 30 s"),
    Mutant("corrupt-state-escapes", "rendezvous/dynamic_rendezvous/state.py",
           "except (ValueError, KeyError, TypeError, AttributeError) as e:",
           "except (KeyError, TypeError, AttributeError) as e:", RDZV_ROWS,
           "a stored rendezvous state that is not JSON escapes as JSONDecodeError/UnicodeDecodeError, not "
           "RendezvousStateError"),
    Mutant("graceful-exit-skips-shutdown", "agent/server/api.py",
           '            sigval = getattr(e, "sigval", None)  # ours or elastic_impl.multiprocessing\'s SignalException',
           "            if _is_rendezvous_error_of(e, RendezvousGracefulExitError):\n"
           "                shutdown_called = True  # never part of the round: nothing to shut down\n"
           '            sigval = getattr(e, "sigval", None)  # ours or elastic_impl.multiprocessing\'s SignalException',
           AGENT_ROWS + ",rendezvous.api.RendezvousGracefulExitError",
           "an agent whose rendezvous ends with RendezvousGracefulExitError skips _shutdown (its workers and health "
           "server stay up)"),
    Mutant("rdzv-events-to-null", "events/__init__.py", 'record(event, "dynamic_rendezvous")',
           'record(event, "null")', EVENT_ROWS,
           "rendezvous events go to the 'null' destination: a handler at 'dynamic_rendezvous' never sees them"),
)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "reports")
    for package in ("elastic_impl", "conformance"):
        shutil.copytree(REPO_ROOT / package, dest / package, ignore=ignore)


def apply(mutant: Mutant, root: Path) -> bool:
    """Apply ``mutant`` to the copy under ``root``; False if a snippet does not occur exactly once (stale)."""
    changed = {}
    for path, old, new in mutant.edits():
        target = root / "elastic_impl" / path
        source = changed.get(target, None) or target.read_text()
        if source.count(old) != 1:
            return False
        changed[target] = source.replace(old, new)
    for target, source in changed.items():
        target.write_text(source)
    return True


def certify(root: Path, rows: str, timeout_s: float) -> tuple[str, float, str]:
    """(outcome, seconds, last lines) of certifying the copy under ``root`` over ``rows``."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "conformance.cli", "certify", "--impl", "elastic_impl", "--device", "cpu",
           "--table", "all-supported", "-k", rows, "--jobs", "1", "-q", "--out", str(root / "out")]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return "timeout", time.monotonic() - started, ""
    outcome = {0: "pass", 1: "fail"}.get(proc.returncode, f"error (exit {proc.returncode})")
    failing = [line.strip() for line in out.splitlines() if line.strip().startswith(("VIOLATION:", "REGRESSION:"))]
    tail = failing[0] if failing else (out.strip().splitlines() or [""])[-1]
    return outcome, time.monotonic() - started, tail[:300]


def run_mutant(mutant: Mutant, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        if not apply(mutant, root):
            return {"mutant": mutant.name, "status": "STALE", "seconds": 0.0,
                    "detail": f"snippet not found exactly once in elastic_impl/{mutant.path}"}
        outcome, seconds, detail = certify(root, mutant.rows, timeout_s)
    status = {"fail": "KILLED", "timeout": "KILLED", "pass": "SURVIVED"}.get(outcome, "ERROR")
    return {"mutant": mutant.name, "status": status, "seconds": round(seconds, 1), "detail": detail,
            "outcome": outcome}


def certify_copy(rows: str, timeout_s: float) -> tuple[str, float, str]:
    """Certify an unmutated copy over ``rows`` (what every mutant's result is measured against)."""
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        return certify(root, rows, timeout_s)


def baseline(mutants: list[Mutant], timeout_s: float) -> tuple[str, float, str]:
    return certify_copy(",".join(dict.fromkeys(p for m in mutants for p in m.rows.split(","))), timeout_s)


def select_mutants(only: str | None) -> list[Mutant]:
    runnable = [m for m in MUTANTS if not m.equivalent]
    if not only:
        return runnable
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {m.name: m for m in runnable}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"conformance.mutation: unknown mutant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _timeout(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _json_problem(path: str) -> str | None:
    target = Path(path)
    if target.is_dir():
        return f"--json {path!r} is a directory; give a file name for the results"
    parent = target.parent
    if not parent.is_dir():
        return f"--json {path!r}: {str(parent)!r} is not an existing directory"
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"--json {path!r} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m conformance.mutation", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants certified side by side (default 1)")
    parser.add_argument("--timeout", default=str(MUTANT_TIMEOUT_S),
                        help=f"seconds per certification (default {MUTANT_TIMEOUT_S}); a mutant still running then "
                             "counts as KILLED")
    parser.add_argument("--skip-baseline", action="store_true", help="do not certify the unmutated copy first")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    timeout = _timeout(args.timeout)
    if timeout is None:  # 0 or less would count every mutant KILLED (by its time limit) in no time
        parser.error(f"--timeout {args.timeout!r} is not a positive number of seconds")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.path:40} {m.bug}{' (equivalent: ' + m.equivalent + ')' if m.equivalent else ''}")
        return 0
    try:
        mutants = select_mutants(args.only)
    except SystemExit as exc:  # an unknown name: select_mutants' one-line message
        parser.error(str(exc).removeprefix("conformance.mutation: "))
    if not mutants:
        parser.error(f"--only {args.only!r} names no mutant")
    if args.json and (problem := _json_problem(args.json)):
        parser.error(problem)
    args.timeout = timeout
    started = time.monotonic()
    if not args.skip_baseline:
        outcome, seconds, detail = baseline(mutants, args.timeout)
        print(f"baseline (unmutated copy): {outcome} in {seconds:.1f} s", flush=True)
        if outcome != "pass":
            print(f"conformance.mutation: the unmutated copy does not certify ({detail}); no mutant result would "
                  "mean anything", file=sys.stderr)
            return 2
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_mutant, m, args.timeout) for m in mutants]
        results = []
        for future in futures:
            result = future.result()
            results.append(result)
            print(f"{result['status']:9} {result['mutant']:28} {result['seconds']:6.1f} s  {result['detail']}",
                  flush=True)
    killed = sum(r["status"] == "KILLED" for r in results)
    survived = [r["mutant"] for r in results if r["status"] == "SURVIVED"]
    other = [f"{r['mutant']} ({r['status']})" for r in results if r["status"] not in ("KILLED", "SURVIVED")]
    scored = killed + len(survived)
    score = 100.0 * killed / scored if scored else 0.0
    print(f"score: {killed}/{scored} killed ({score:.1f}%); survived: {', '.join(survived) or 'none'}; "
          f"not scored: {', '.join(other) or 'none'}; equivalent (not run): "
          f"{', '.join(m.name for m in MUTANTS if m.equivalent) or 'none'}; wall {time.monotonic() - started:.0f} s")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({"score_percent": round(score, 1), "killed": killed,
                                                   "survived": survived, "results": results}, indent=2) + "\n")
        except OSError as exc:
            print(f"{parser.prog}: error: cannot write --json {args.json!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0 if not survived and not other else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
