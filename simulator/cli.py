"""``elastic-sim``: run a scenario (virtual or live), fuzz random fault schedules, replay a shrunk finding.

Exit codes: 0 all invariants hold; 1 an invariant was violated (or fuzzing found a failing schedule); 2 bad input
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .checker import CheckResult, check
from .history import History
from .scenario import Scenario, ScenarioError, load_scenario

# Seconds between progress lines of a live run when stderr is not a terminal.
LIVE_PROGRESS_EVERY = 5.0


class CliError(Exception):
    """Bad input or an unavailable feature: printed as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP during a live run: raised in the main thread so the cluster is stopped (agents,
    workers, store, namespaces) and its history written before the exit, as for Ctrl-C."""

    def __init__(self, signum: int, logs: Path | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.logs = logs


# Signals that stop a live run cleanly (instead of the default SIGTERM/SIGHUP death, which left the store, the
# agents and the network namespaces behind). One that is ignored when elastic-sim starts (nohup, a background job)
# stays ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_cleanly_on_signals() -> Iterator[None]:
    """The first stop signal raises :class:`Interrupted`; later ones while the cluster is being stopped (bounded by
    the agents' shutdown grace) are reported and otherwise ignored, so a second Ctrl-C cannot cut the cleanup short
    and leave processes behind."""
    stopping: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if stopping:
            os.write(2, b"elastic-sim: stopping the cluster first (agents, workers, store); please wait\n")
            return
        stopping.append(signum)
        raise Interrupted(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _prepare_out(value: str | None, what: str = "--out") -> Path | None:
    """The output directory, made now (before a run of minutes); bad ones are a one-line error."""
    if not value:
        return None
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise CliError(f"{what} {value!r} is an existing file, not a directory (give a directory to write into)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"{what} {value!r}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"{what} {value!r}: the directory is not writable")
    return out


@contextlib.contextmanager
def _runtime_logs(shown: bool) -> Iterator[None]:
    """Unless ``shown``, drop the simulated nodes' runtime log lines (thousands over a fuzz run; each node's story is
    in its history): they would bury the progress line and the summary."""
    if shown:
        yield
        return
    target = logging.getLogger("elastic_impl")
    quiet = logging.NullHandler()
    target.addHandler(quiet)
    propagate, target.propagate = target.propagate, False
    try:
        yield
    finally:
        target.removeHandler(quiet)
        target.propagate = propagate


class Progress:
    """One stderr line, rewritten in place (only on a terminal, or when forced), at most 5 times a second. With
    ``line_every`` (seconds), where it is not enabled (not a terminal: a log, CI) it writes a plain line that often."""

    def __init__(self, enabled: bool | None = None, line_every: float | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.line_every = None if self.enabled else line_every
        self._last = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if self.line_every is not None:
            now = time.monotonic()
            if force or now - self._last >= self.line_every:
                self._last = now
                sys.stderr.write(text.rstrip() + "\n")
                sys.stderr.flush()
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        sys.stderr.write("\r" + text[:110].ljust(110))
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()
            self._shown = False


def _bar(fraction: float, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:5.1f}%"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _summary(scenario: Scenario, history: History, result: CheckResult, wall: float, extra: list[tuple[str, str]]) -> str:
    st = result.stats
    rows = [
        ("scenario", f"{scenario.name} ({scenario.mode}, backend {scenario.backend})"),
        ("nodes", f"{scenario.nodes} x {scenario.workers_per_node} workers, elastic {scenario.min_nodes}..{scenario.max_nodes}"),
        ("faults", str(len(scenario.faults))),
        ("outcome", f"{st['outcome'] or 'none'} (expected {scenario.expect.outcome or 'any'})"),
        ("rounds", str(st["rounds"])),
        ("restarts", _restarts(scenario, st)),
        ("history", f"{st['events']} events over {st['end_t']:.3f} s of scenario time"),
        ("wall time", f"{wall:.3f} s"),
        *extra,
    ]
    lines = ["", "summary", _table(rows), "", "invariants"]
    violated = set(result.violated)
    lines.append(_table([(name, "FAIL" if name in violated else "pass") for name in result.invariants]))
    for v in result.violations[:20]:
        lines.append(f"  ! {v}")
    if len(result.violations) > 20:
        lines.append(f"  ! ... {len(result.violations) - 20} more")
    return "\n".join(lines)


def _restarts(scenario: Scenario, st: dict) -> str:
    """Failure restarts (what max_restarts limits: once per failure round, job-wide) apart from membership
    re-forms (free), so "restarts 5" never stands beside "max_restarts: 3" unexplained."""
    spent = st["failure_rounds"] if st["failure_rounds"] is not None else st["restart_count"]
    return (f"failures: {spent} of max_restarts {scenario.max_restarts} ({st['failure_restarts']} node restarts, "
            f"{st['worker_failures']} worker failures); membership re-forms: {st['membership_restarts']} node "
            f"restarts (not counted)")


def _write_outputs(out: Path | None, history: History, result: CheckResult, scenario: Scenario, plot: bool) -> list[str]:
    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        written.append(str(history.to_jsonl(out / "history.jsonl")))
        (out / "check.json").write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
        written.append(str(out / "check.json"))
    if plot:
        from .plot import PlotUnavailable, plot_timeline

        target = (out or Path(".")) / "timeline.png"
        try:
            written.append(str(plot_timeline(history, target, title=scenario.name)))
        except PlotUnavailable as e:
            print(f"elastic-sim: {e}", file=sys.stderr)
    return written


def _run_scenario(scenario: Scenario, out: Path | None, progress: Progress) -> tuple[History, list[tuple[str, str]]]:
    if scenario.mode == "virtual":
        from .virtual import run_virtual

        def report(now: float, limit: float) -> None:
            progress.update(f"virtual t={now:8.2f} s {_bar(now / limit)}")

        result = run_virtual(scenario, progress=report)
        progress.done()
        store = result.store
        extra = [
            ("sim events", f"{result.events_processed} ({result.stopped_by})"),
            ("store", f"{store['get_calls']} reads, {store['set_calls']} writes ({store['failed_cas']} lost CAS), "
                      f"{store['bytes_read'] + store['bytes_written']} bytes"),
        ]
        return result.history, extra
    try:
        from fault_injection import FaultError

        from .live import LiveError
        from .live import run_scenario as run_live
    except ImportError as e:
        raise CliError(f"live mode is not available ({e}); run a scenario with mode: virtual") from None
    # Without --out the agents' logs and the history still go somewhere the user is told about.
    logs = out if out is not None else Path(tempfile.mkdtemp(prefix="elastic-sim-live-"))
    progress.update(f"live scenario {scenario.name!r} starting (logs in {logs})...", force=True)
    try:
        with _stop_cleanly_on_signals():
            history = run_live(scenario, logs, progress=lambda status: progress.update(status.line()))
    except Interrupted as e:
        e.logs = logs
        raise
    except (LiveError, FaultError) as e:
        # The cluster is already stopped (run_scenario cleans up whatever it started).
        raise CliError(f"live run of {scenario.name!r} failed: {e} (logs in {logs})") from None
    finally:
        progress.done()
    network = next((e.detail for e in history if e.event == "op" and e.detail.get("op") == "network"), None)
    extra = [("network", f"{network['mode']} ({network['why']})")] if network else []
    return history, [*extra, ("logs", str(logs))]


def as_virtual(scenario: Scenario) -> Scenario:
    """The same cluster, job and faults in virtual time (on the simulated store; the live-only store and job options
    -- an agent-hosted store, an etcd cluster, worker daemons -- have no virtual counterpart and are dropped). A fault
    kind with no virtual side is refused, naming it and why."""
    from dataclasses import replace

    from .faults import kind_of

    for fault in scenario.faults:
        kind = kind_of(fault.fault)
        if kind.virtual is None:
            raise CliError(f"scenario {scenario.name!r} cannot run in virtual time: fault {fault.fault} is live only "
                           f"({kind.virtual_missing})")
    store = replace(scenario.store, hosted_by_node=None, members=1)
    return replace(scenario, mode="virtual", backend="sim", store=store, job=replace(scenario.job, daemon=False, collective=False),
                   network="auto").validate()


def cmd_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if getattr(args, "virtual", False) and scenario.mode != "virtual":
        scenario = as_virtual(scenario)
    out = _prepare_out(args.out)
    wall0 = time.perf_counter()
    # A live run takes minutes (a large virtual one too): off a terminal it still says where it is, a line every
    # few seconds.
    history, extra = _run_scenario(scenario, out, Progress(args.progress, line_every=LIVE_PROGRESS_EVERY))
    wall = time.perf_counter() - wall0
    result = check(history, scenario)
    written = _write_outputs(out, history, result, scenario, args.plot)
    expected = scenario.expect.violations
    print(_summary(scenario, history, result, wall, extra))
    for path in written:
        print(f"  wrote {path}")
    if expected:
        reproduced = all(v in result.violated for v in expected)
        print(f"\nexpected violations {', '.join(expected)}: {'reproduced' if reproduced else 'NOT reproduced'}")
    return 0 if result.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    args.out = args.out
    args.plot = args.plot
    return cmd_run(args)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from .fuzz import fuzz

    if args.runs < 1:
        raise CliError(f"--runs must be >= 1, got {args.runs}")
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    out = _prepare_out(args.out)
    progress = Progress(args.progress, line_every=LIVE_PROGRESS_EVERY)

    def report(count: int, runs: int, phase: str) -> None:
        progress.update(f"fuzz {phase}: schedule {count} {_bar(count / runs) if phase == 'searching' else ''}")

    try:
        with _runtime_logs(args.verbose):
            result = fuzz(args.seed, args.runs, broken_cas=args.broken_cas, out_dir=out, progress=report,
                          vary_cluster=args.vary_cluster, twice=not args.once)
    finally:
        progress.done()
    rows = [
        ("seed", str(args.seed)),
        ("store", "BROKEN compare-and-set (test only)" if args.broken_cas else "correct compare-and-set"),
        ("schedules run", f"{result.runs} (of up to {args.runs}, incl. shrinking)"
                          f"{'' if args.once else ', each twice: same history digest required'}"),
        ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(result.outcomes.items())) or "-"),
        ("wall time", f"{result.wall_seconds:.2f} s"),
        ("result", "no invariant violated" if result.ok else f"VIOLATION: {', '.join(result.check.violated)}"),
    ]
    print("\nsummary\n" + _table(rows))
    if not result.ok:
        _print_finding(f"minimal failing schedule ({len(result.failing.faults)} fault(s), sim seed "
                       f"{result.failing.seed}):", result)
        return 1
    return 0


def _print_finding(heading: str, result) -> None:
    """A shrunk fuzz / explore finding: its faults, first violations, and where it was written (or its YAML)."""
    print(f"\n{heading}")
    for f in result.failing.faults:
        print(f"  {f.describe()}")
    for v in result.check.violations[:5]:
        print(f"  ! {v}")
    if result.written:
        print(f"  wrote {result.written} (replay: elastic-sim replay {result.written})")
    else:
        print(result.failing.to_yaml())


def cmd_explore(args: argparse.Namespace) -> int:
    from .stateful import explore

    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    out = _prepare_out(args.out)
    with _runtime_logs(args.verbose):
        result = explore(args.seed, args.examples, out_dir=out, steps=args.steps)
    rows = [
        ("seed", str(args.seed)),
        ("runs", f"up to {args.examples} of up to {args.steps} steps"),
        ("wall time", f"{result.wall_seconds:.2f} s"),
        ("result", "no invariant violated" if result.ok else f"VIOLATION: {', '.join(result.check.violated)}"),
    ]
    print("\nsummary\n" + _table(rows))
    if result.ok:
        return 0
    _print_finding(f"minimal failing run ({len(result.failing.faults)} fault(s), sim seed {result.failing.seed}); its "
                   f"replay {'has the same' if result.replay_digest == result.digest else 'DIFFERS in its'} history "
                   "digest:", result)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-sim", description="Cluster simulator for elastic_impl: scripted and "
                                     "randomized failure scenarios with checked invariants.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario file (YAML/TOML; mode live or virtual)")
    run.add_argument("scenario", help="scenario file")
    run.add_argument("--out", help="directory for history.jsonl, check.json (and timeline.png)")
    run.add_argument("--plot", action="store_true", help="write a timeline PNG (needs the 'plot' extra)")
    run.add_argument("--virtual", action="store_true", help="run a live scenario in virtual time instead")
    run.add_argument("--progress", action="store_true", default=None, help="show progress even when stderr is not a terminal")
    run.set_defaults(func=cmd_run)
    fz = sub.add_parser("fuzz", help="random fault schedules in virtual time, shrunk on failure")
    fz.add_argument("--seed", type=int, default=0)
    fz.add_argument("--runs", type=int, default=100)
    fz.add_argument("--broken-cas", action="store_true", help="TEST ONLY: a store that skips compare-and-set")
    fz.add_argument("--vary-cluster", action="store_true",
                    help="also draw the cluster shape (nodes, min/max nodes, store latency and loss)")
    fz.add_argument("--once", action="store_true",
                    help="run each schedule once (default: twice, failing on any difference in the history digest)")
    fz.add_argument("--out", help="directory for the shrunk failing scenario")
    fz.add_argument("--progress", action="store_true", default=None)
    fz.add_argument("--verbose", action="store_true", help="also print the simulated nodes' runtime log lines")
    fz.set_defaults(func=cmd_fuzz)
    ex = sub.add_parser("explore", help="stateful fuzzing: a hypothesis state machine acting on a running virtual "
                        "simulation step by step, shrunk on failure")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--examples", type=int, default=100, help="runs of the state machine")
    ex.add_argument("--steps", type=int, default=30, help="steps per run at most")
    ex.add_argument("--out", help="directory for the shrunk failing scenario")
    ex.add_argument("--verbose", action="store_true", help="also print the simulated nodes' runtime log lines")
    ex.set_defaults(func=cmd_explore)
    rp = sub.add_parser("replay", help="re-run a scenario (e.g. a shrunk fuzz finding) and check it")
    rp.add_argument("scenario", help="scenario file written by fuzz (or any scenario)")
    rp.add_argument("--out")
    rp.add_argument("--plot", action="store_true")
    rp.add_argument("--progress", action="store_true", default=None)
    rp.set_defaults(func=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, CliError, ValueError, FileNotFoundError) as e:
        print(f"elastic-sim: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        where = f"; cluster stopped, its history and logs are in {e.logs}" if e.logs is not None else ""
        print(f"elastic-sim: interrupted by {name}{where}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("elastic-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
