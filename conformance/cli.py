"""``elastic-conformance certify --impl X --device Y [--table T [--hardware H]] [--baseline JSON] [--out DIR] ...``.

Exit status: 0 all rows conform or are honestly unsupported, 1 on any VIOLATION (or a row without a check),
2 on bad input (one-line error on stderr), 3 when the requested device is absent (nothing certified), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted or
terminated run still stops the servers and processes its checks started (etcd, agents, workers).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from conformance.adapters import AdapterError, get_adapter, reference_adapter
from conformance.device import DEVICE_CHOICES, DeviceError, detect
from conformance.table import TableError, load_claims, validate_paths

DEVICE_ABSENT = 3  # exit status: the requested device is not on this machine, so nothing was certified


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"elastic-conformance: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elastic-conformance", description="Certify an elastic implementation against the support table.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cert = sub.add_parser("certify", help="run one check per table row and write reports")
    cert.add_argument("--impl", required=True, help="elastic_impl | torch | a package mirroring torch.distributed.elastic")
    cert.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} (default auto)")
    cert.add_argument("--table", default=None,
                      help="the claims certified: a table (.md, .csv, or a per-hardware .md), 'published' (default), "
                           "'ascend-2.13' or 'all-supported' (every documented API claimed supported)")
    cert.add_argument("--hardware", default=None,
                      help="the column of a per-hardware table to certify, e.g. 'Atlas A2'")
    cert.add_argument("--baseline", default=None,
                      help="an earlier report.json: a row that passed there and fails now is a REGRESSION (exit 1)")
    cert.add_argument("--out", default=None, help="directory for report.json, report.md, junit.xml")
    cert.add_argument("-k", dest="pattern", default=None, help="only rows whose api contains one of these comma-separated substrings")
    cert.add_argument("-j", "--jobs", default=None,
                      help="worker processes running check groups side by side (default: the number of CPUs; 1: serial)")
    cert.add_argument("-q", "--quiet", action="store_true", help="no per-check progress lines")
    cert.add_argument("-v", "--verbose", action="store_true", help="let the implementations' own log lines through")
    lst = sub.add_parser("list", help="list the table rows and the module of their check")
    lst.add_argument("--table", default=None)
    lst.add_argument("--hardware", default=None)
    return parser


def _fail(message: str) -> int:
    print(f"elastic-conformance: error: {message}", file=sys.stderr)
    return 2


REPORT_NAMES = ("report.json", "report.md", "junit.xml", "wpt.json", "observed_table.md")


def _out_problem(out: str) -> str | None:
    """Why the reports could not be written to ``--out``, found before any row runs; None if they can. Makes
    nothing (a run stopped before its end leaves no folder behind) and removes nothing: the reports overwrite
    their own names only."""
    path, shown = Path(out), f"--out {out!r}"
    if path.exists() and not path.is_dir():
        return f"{shown} is a file, not a directory; give a directory for the reports ({', '.join(REPORT_NAMES[:4])})"
    for name in REPORT_NAMES:
        if (path / name).exists() and not (path / name).is_file():
            return f"{shown} holds {name} that is not a file, so that report cannot be written; choose another --out"
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:  # the folder the reports' mkdir starts in
        existing = existing.parent
    if not existing.is_dir():
        return f"{shown} cannot be made a directory: {str(existing)!r} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):  # an unnamed file on Linux: nothing visible is made
            pass
    except OSError as exc:
        return f"{shown} is not writable: {exc.strerror or exc}"
    return None


def _quiet_implementation_logs() -> None:
    # The implementations log every worker failure the checks provoke on purpose; the verdicts say what matters.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # Module loggers set their own levels, so the level of a parent logger would not hold them back.
    logging.disable(logging.ERROR)


def _jobs(value: str | None) -> int | None:
    if value is None:
        from conformance.parallel import default_jobs

        return default_jobs()
    try:
        jobs = int(value)
    except ValueError:
        return None
    return jobs if jobs >= 1 else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every ``finally`` runs: servers stopped, workers killed and reaped.

    Without it the default action ends the process on the spot and the etcd servers and agents its checks started
    outlive it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def _import_torch() -> None:
    """Import torch with SIGINT/SIGTERM held back until it is loaded, then acted on.

    torch's C++ start-up imports numpy and swallows any exception raised in it, so a KeyboardInterrupt (or our
    Terminated) delivered then vanished: Ctrl-C in the first fraction of a second was ignored and the whole run went
    on. Only in the main thread with the handlers main() installs (or Python's default for SIGINT)."""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}
    for sig, handler in previous.items():
        if handler is ours[sig]:
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in held:
        raise Terminated(signal.SIGTERM)
    if held:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    previous_disable = logging.root.manager.disable
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Terminated as exc:
        print(f"elastic-conformance: terminated by {exc}; stopped what the checks had started", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("elastic-conformance: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.disable(previous_disable)  # main() may be called in-process (tests, the pytest plugin)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "certify" and not args.verbose:
        _quiet_implementation_logs()  # before the first torch import: the C++ log level is read at load
    _import_torch()
    try:
        claims = load_claims(args.table, args.hardware)
        validate_paths(claims.rows, reference_adapter().exists, claims.name)
    except TableError as exc:
        return _fail(str(exc))
    rows = claims.rows
    if args.command == "list":
        from conformance.registry import REGISTRY, load_checks

        load_checks()
        for row in rows:
            check = REGISTRY.get(row.api)
            print(f"{row.claimed:<4} {check.group if check else 'NO CHECK':<16} {row.api}")
        return 0
    try:
        adapter = get_adapter(args.impl)
        device = detect(args.device)
    except (AdapterError, DeviceError) as exc:
        return _fail(str(exc))
    from conformance.report import progress_line, terminal_table, write_reports
    from conformance.runner import (
        BaselineError,
        apply_baseline,
        certify,
        check_baseline_device,
        exit_code,
        read_baseline,
        select,
        unmatched,
    )

    # Every option is checked before the device's absence ends the run (exit 3): bad input is exit 2 whatever the
    # device, and the user learns of all of it at once rather than after installing the device's toolkit.
    jobs = _jobs(args.jobs)
    if jobs is None:
        return _fail(f"--jobs {args.jobs!r} is not a positive whole number")
    selected = select(rows, args.pattern)
    if not selected:
        return _fail(f"-k {args.pattern!r} matches no api in {claims.name}")
    missed = unmatched(rows, args.pattern)
    if missed:  # a typo in one of several substrings would silently leave its rows uncertified
        return _fail(f"-k {args.pattern!r}: {', '.join(repr(n) for n in missed)} matches no api in {claims.name} "
                     "(each comma-separated substring must match at least one row)")
    baseline_then = baseline = None
    if args.baseline:
        try:
            baseline_then, baseline = read_baseline(args.baseline)
        except BaselineError as exc:
            return _fail(str(exc))
    device_label = args.device if device.requested != "auto" else f"auto->{device.kind}"
    if args.out:
        problem = _out_problem(args.out)
        if problem:
            return _fail(problem)
    if not device.available:
        # Rows that never touch the device would pass and read as a certification of it: run none.
        line = f"{device.reason}; nothing certified"
        if args.out:
            try:
                write_reports([], Path(args.out), impl=adapter.name, device=device_label, backend=device.backend,
                              claims=claims, not_certified=line)
            except OSError as exc:
                return _fail(f"cannot write the reports to --out {args.out!r}: {exc.strerror or exc}")
        print(line, file=sys.stderr)
        return DEVICE_ABSENT
    if baseline_then is not None:
        try:
            check_baseline_device(args.baseline, baseline_then, device.key)
        except BaselineError as exc:
            return _fail(str(exc))
    against = claims.name + (f" [{claims.hardware}]" if claims.hardware else "")
    print(f"certifying {adapter.name} ({adapter.root}) on {device.describe()} against {against}: "
          f"{len(selected)} rows, {jobs} job(s)", flush=True)

    def progress(index: int, total: int, result) -> None:
        if not args.quiet:
            print(progress_line(index, total, result), flush=True)

    started = time.monotonic()
    if jobs > 1:
        from conformance.parallel import certify_parallel

        results = certify_parallel(selected, adapter, device, jobs=jobs, progress=progress,
                                   quiet_logs=not args.verbose)
    else:
        results = certify(selected, adapter, device, progress=progress)
    if baseline is not None:
        apply_baseline(results, baseline, args.baseline)
    print(terminal_table(results))
    print(f"wall time: {time.monotonic() - started:.1f} s with {jobs} job(s)")
    if args.out:
        try:
            paths = write_reports(results, Path(args.out), impl=adapter.name, device=device_label,
                                  backend=device.backend, claims=claims,
                                  run={"jobs": jobs, "wall_s": round(time.monotonic() - started, 1),
                                       **({"baseline": args.baseline} if args.baseline else {})})
        except OSError as exc:  # e.g. the folder was removed or the disk filled during the run
            return _fail(f"cannot write the reports to --out {args.out!r}: {exc.strerror or exc}")
        print("reports: " + ", ".join(str(p) for p in paths))
    code = exit_code(results)
    if code:
        print("certification FAILED: at least one VIOLATION or REGRESSION (or a row without a check)",
              file=sys.stderr)
    return code


def console_main() -> None:
    """``main``, then end the process without the interpreter's teardown: a daemon thread of a store client left
    blocked by a check (in TCPStore's C++ code) that returns during the teardown aborts the process (SIGABRT),
    turning the verdict's exit code into 134. The exit handlers still run and the output is flushed."""
    code = main()
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


if __name__ == "__main__":
    console_main()
