from __future__ import annotations

import os
import subprocess
import time

from conformance import runner
from conformance.adapters import get_adapter
from conformance.device import detect
from conformance.registry import REGISTRY, Check, load_checks
from conformance.table import Row

API = "torch.distributed.elastic.timer.configure"


def _certify_with(monkeypatch, tmp_path, fn, timeout=30.0):
    load_checks()
    monkeypatch.setitem(REGISTRY, API, Check(API, fn, "timer", timeout=timeout))
    return runner.certify([Row(API, True, "-", 1)], get_adapter("torch"), detect("cpu"), workdir=tmp_path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_processes_leaked_by_a_check_are_reaped(monkeypatch, tmp_path):
    leaked = []

    def leaky(ctx):
        leaked.append(subprocess.Popen(["sleep", "60"]))

    (result,) = _certify_with(monkeypatch, tmp_path, leaky)
    assert result.verdict == "CONFORMS"
    leaked[0].wait(5)  # the sweep killed it; reap our own zombie
    assert leaked[0].returncode == -9


def test_a_hanging_check_fails_with_its_timeout(monkeypatch, tmp_path):
    def hangs(ctx):
        time.sleep(60)

    started = time.monotonic()
    (result,) = _certify_with(monkeypatch, tmp_path, hangs, timeout=0.5)
    assert (result.observed, result.verdict, result.error) == ("fail", "VIOLATION", "timed out after 0.5 s")
    assert time.monotonic() - started < 45  # not held up by the hanging check (generous: the machine is shared)


def test_a_timed_out_check_keeps_its_timeout_verdict_when_cleanup_wakes_it(monkeypatch, tmp_path):
    # The context's cleanup (closing workers) wakes the hanging check, which then fails with a consequence of the
    # cleanup; the report must still say "timed out", not the consequence.
    import threading

    def waits_for_workers(ctx):
        closed = threading.Event()

        def close_workers():  # like PContext.close(): signals the workers, then takes a while to reap them
            closed.set()
            time.sleep(0.5)

        ctx.add_cleanup(close_workers)
        closed.wait(10)
        raise RuntimeError("workers were terminated")

    get_adapter("torch").resolve(API)  # imported up front, so the check is waiting when its timeout hits
    (result,) = _certify_with(monkeypatch, tmp_path, waits_for_workers, timeout=1.0)
    assert (result.observed, result.error) == ("fail", "timed out after 1 s")


def test_an_exception_in_a_check_is_a_one_line_failure(monkeypatch, tmp_path):
    def broken(ctx):
        raise KeyError("no\nsuch key")

    (result,) = _certify_with(monkeypatch, tmp_path, broken)
    assert result.verdict == "VIOLATION" and "\n" not in result.error
    assert result.error.startswith("KeyError:") and "Traceback" in result.detail
    assert os.getpid()  # the certifier itself survived


def test_known_differences_are_reported_with_their_reason(monkeypatch, tmp_path):
    from conformance import known_differences

    monkeypatch.setitem(known_differences.KNOWN_DIFFERENCES, ("torch", API), "documented upstream deviation X")

    def fails(ctx):
        ctx.expect(False, "behaves like X")

    (result,) = _certify_with(monkeypatch, tmp_path, fails)
    assert (result.observed, result.verdict) == ("fail", "KNOWN-DIFFERENCE")
    assert "documented upstream deviation X" in result.notes and result.error == "CheckFailed: behaves like X"
    assert runner.exit_code([result]) == 0

    (stale,) = _certify_with(monkeypatch, tmp_path, lambda ctx: None)
    assert stale.verdict == "CONFORMS" and "stale entry" in stale.notes


def test_signature_differences_waive_only_the_signature(monkeypatch, tmp_path):
    from conformance import known_differences, signatures

    monkeypatch.setitem(known_differences.SIGNATURE_DIFFERENCES, ("torch", API), "private parameter list")
    real_load = signatures.load_snapshot

    def wrong_snapshot():
        snap = real_load()
        snap[API] = {"kind": "function", "params": [["other_name", "POSITIONAL_OR_KEYWORD", False]]}
        return snap

    monkeypatch.setattr(runner, "load_snapshot", wrong_snapshot)
    (waived,) = _certify_with(monkeypatch, tmp_path, lambda ctx: None)
    assert waived.verdict == "CONFORMS" and "private parameter list" in waived.notes
    (still_checked,) = _certify_with(monkeypatch, tmp_path, lambda ctx: ctx.expect(False, "bad behaviour"))
    assert still_checked.verdict == "VIOLATION" and still_checked.error == "CheckFailed: bad behaviour"
    monkeypatch.delitem(known_differences.SIGNATURE_DIFFERENCES, ("torch", API))
    (unwaived,) = _certify_with(monkeypatch, tmp_path, lambda ctx: None)
    assert unwaived.verdict == "VIOLATION" and unwaived.error.startswith("CheckFailed: signature:")


def test_failed_ranks_allow_peers_killed_by_the_group_stop_but_not_peers_with_exit_codes():
    from types import SimpleNamespace as Failure

    from conformance.context import CheckContext, CheckFailed

    ctx = CheckContext.__new__(CheckContext)  # needs no suite resources
    ctx.assertions = []
    expect = ctx.expect_failed_ranks
    expect({1: Failure(exitcode=3)}, 1, 3, "ranks")
    expect({0: Failure(exitcode=-15), 1: Failure(exitcode=3)}, 1, 3, "ranks")  # torch books the SIGTERMed peer
    for failures, message in (
        ({0: Failure(exitcode=1), 1: Failure(exitcode=3)}, "exit code of their own: {0: 1}"),
        ({0: Failure(exitcode=-15)}, "do not include rank 1"),
        ({1: Failure(exitcode=2)}, "exit code of rank 1: got 2"),
    ):
        try:
            expect(failures, 1, 3, "ranks")
        except CheckFailed as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{failures} passed")
