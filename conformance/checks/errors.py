"""torch.distributed.elastic.multiprocessing.errors: record, ChildFailedError, ErrorHandler, ProcessFailure."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager

from conformance.registry import check

M = "multiprocessing.errors"


@contextmanager
def _error_file_env(path: str):
    old = os.environ.get("TORCHELASTIC_ERROR_FILE")
    os.environ["TORCHELASTIC_ERROR_FILE"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHELASTIC_ERROR_FILE", None)
        else:
            os.environ["TORCHELASTIC_ERROR_FILE"] = old


def _write_error_file(path, message: str, timestamp: int) -> None:
    # The documented error-file layout written by @record in a worker.
    with open(path, "w") as fh:
        json.dump({"message": {"message": message, "extraInfo": {"py_callstack": "tb", "timestamp": str(timestamp)}}}, fh)


@check(f"{M}.record")
def record(ctx) -> None:
    rec = ctx.get(f"{M}.record")

    @rec
    def ok(x):
        return x + 1

    ctx.expect_equal(ok(41), 42, "@record-wrapped function's return value")
    error_file = ctx.tmpdir / "error.json"

    @rec
    def boom():
        raise ValueError("conformance-marker-7731")

    with _error_file_env(str(error_file)):
        ctx.expect_raises(ValueError, boom, what="@record re-raises the function's exception")
    ctx.expect(error_file.exists(), "@record did not write TORCHELASTIC_ERROR_FILE on an uncaught exception")
    data = json.loads(error_file.read_text())
    ctx.expect("conformance-marker-7731" in json.dumps(data), f"error file lacks the exception message: {data}")
    ctx.expect("message" in data, f"error file lacks the documented 'message' key: {list(data)}")
    _record_exits_and_child_failures(ctx, rec)


def _record_exits_and_child_failures(ctx, rec) -> None:
    """Documented equivalence of @record: sys.exit(0) is a normal end; other exits and a ChildFailedError are not
    recorded as errors of this process (the child's error file is copied instead)."""
    for code, what in ((0, "sys.exit(0)"), (3, "sys.exit(3)")):
        error_file = ctx.tmpdir / f"exit{code}.json"

        @rec
        def leave(code=code):
            raise SystemExit(code)

        with _error_file_env(str(error_file)):
            try:
                result = ("returned", leave())
            except SystemExit as e:
                result = ("raised SystemExit", e.code)
        ctx.expect_equal(result, ("returned", None) if code == 0 else ("raised SystemExit", 3), f"@record on {what}")
        ctx.expect(not error_file.exists(), f"@record wrote an error file for {what}")
    child = ctx.tmpdir / "child-of-record.json"
    _write_error_file(child, "record-child-marker-4410", 5)
    failure = ctx.get(f"{M}.ProcessFailure")(local_rank=0, pid=1, exitcode=7, error_file=str(child))
    child_failed = ctx.get(f"{M}.ChildFailedError")("trainer", {0: failure})
    own = ctx.tmpdir / "parent-of-record.json"

    @rec
    def nanny():
        raise child_failed

    with _error_file_env(str(own)):
        ctx.expect_raises(type(child_failed), nanny, what="@record re-raises a ChildFailedError")
    copied = json.loads(own.read_text()) if own.exists() else None
    ctx.expect(copied is not None and "record-child-marker-4410" in json.dumps(copied) and "FAILED" not in json.dumps(copied),
               f"@record on a ChildFailedError should copy the child's error file, got {copied!r}")


def _handler_error_file(ctx, path, marker: str) -> None:
    """An error file written the documented way: by the implementation's ErrorHandler for a real exception."""
    handler = ctx.get(f"{M}.ErrorHandler")()
    with _error_file_env(str(path)):
        try:
            raise RuntimeError(marker)
        except RuntimeError as exc:
            handler.record_exception(exc)


@check(f"{M}.ChildFailedError")
def child_failed_error(ctx) -> None:
    cfe = ctx.get(f"{M}.ChildFailedError")
    pf = ctx.get(f"{M}.ProcessFailure")
    ctx.expect(issubclass(cfe, Exception), "ChildFailedError is not an Exception")
    early = ctx.tmpdir / "rank3.json"
    _handler_error_file(ctx, early, "root-cause-from-rank-3")
    time.sleep(1.1)  # error-file timestamps are whole seconds: rank 0's failure must be observed later
    failures = {
        0: pf(local_rank=0, pid=1000, exitcode=-signal.SIGKILL, error_file=str(ctx.tmpdir / "absent.json")),
        3: pf(local_rank=1, pid=1003, exitcode=1, error_file=str(early)),
    }
    err = cfe(name="trainer.py", failures=failures)
    ctx.expect_equal(err.name, "trainer.py", "ChildFailedError.name")
    ctx.expect_equal(set(err.failures), {0, 3}, "ChildFailedError.failures ranks")
    rank, first = err.get_first_failure()
    ctx.expect_equal(rank, 3, "root cause rank (earliest timestamp) from get_first_failure()")
    ctx.expect("root-cause-from-rank-3" in str(first.message), f"root-cause message: {first.message!r}")
    text = str(err)
    ctx.expect("trainer.py" in text, f"str(ChildFailedError) does not name the entrypoint: {text[:200]!r}")
    _, marker, root_section = text.partition("Root Cause")
    ctx.expect(marker, f"str(ChildFailedError) has no 'Root Cause' section: {text[:300]!r}")
    ctx.expect(str(early) in root_section and "SIGKILL" not in root_section,
               f"the Root Cause section does not name rank 3's failure: {root_section[:300]!r}")


@check(f"{M}.ErrorHandler")
def error_handler(ctx) -> None:
    handler = ctx.get(f"{M}.ErrorHandler")()
    own = ctx.tmpdir / "own.json"
    with _error_file_env(str(own)):
        handler.initialize()
        try:
            raise RuntimeError("handler-marker-5521")
        except RuntimeError as exc:
            handler.record_exception(exc)
    ctx.expect(own.exists(), "ErrorHandler.record_exception did not write TORCHELASTIC_ERROR_FILE")
    ctx.expect("handler-marker-5521" in own.read_text(), "recorded error file lacks the exception message")
    # dump_error_file copies a child's error file to ours, stamping the error code.
    child = ctx.tmpdir / "child.json"
    _write_error_file(child, "child-marker-9", int(time.time()))
    parent = ctx.tmpdir / "parent.json"
    with _error_file_env(str(parent)):
        handler.dump_error_file(str(child), error_code=17)
    ctx.expect(parent.exists(), "ErrorHandler.dump_error_file did not write TORCHELASTIC_ERROR_FILE")
    dumped = json.loads(parent.read_text())
    ctx.expect("child-marker-9" in json.dumps(dumped), "dump_error_file lost the child's message")
    ctx.expect_equal(dumped["message"].get("errorCode"), 17, "errorCode stamped by dump_error_file")


@check(f"{M}.ProcessFailure")
def process_failure(ctx) -> None:
    pf = ctx.get(f"{M}.ProcessFailure")
    killed = pf(local_rank=1, pid=4242, exitcode=-signal.SIGKILL, error_file=str(ctx.tmpdir / "absent.json"))
    ctx.expect_equal((killed.local_rank, killed.pid, killed.exitcode), (1, 4242, -9), "ProcessFailure fields")
    ctx.expect_equal(killed.signal_name(), "SIGKILL", "signal_name() of exitcode -9")
    ctx.expect(isinstance(killed.timestamp, int) and abs(killed.timestamp - time.time()) < 60,
               f"timestamp without an error file should be 'now', got {killed.timestamp!r}")
    with_file = ctx.tmpdir / "err.json"
    _write_error_file(with_file, "pf-marker-31", 1_600_000_000)
    failed = pf(local_rank=0, pid=1, exitcode=1, error_file=str(with_file))
    ctx.expect_equal(failed.timestamp, 1_600_000_000, "timestamp read from the error file")
    recorded = ctx.tmpdir / "recorded.json"
    _handler_error_file(ctx, recorded, "pf-marker-32")
    from_handler = pf(local_rank=0, pid=1, exitcode=1, error_file=str(recorded))
    ctx.expect("pf-marker-32" in str(from_handler.message),
               f"message from an ErrorHandler-written error file lacks the exception text: {from_handler.message!r}")
    ctx.expect_equal(failed.signal_name(), "<N/A>", "signal_name() of a non-signal exit")
    # The flat record layout ({"message": str, "timestamp": int}) keeps its timestamp too.
    flat = ctx.tmpdir / "flat.json"
    flat.write_text(json.dumps({"message": "pf-flat", "timestamp": 10}))
    flat_failure = pf(local_rank=0, pid=1, exitcode=1, error_file=str(flat))
    ctx.expect_equal((flat_failure.message, flat_failure.timestamp), ("pf-flat", 10), "flat error record")
    # No error file: error_file is "<N/A>" (the documented placeholder), the timestamp is now.
    absent = pf(local_rank=0, pid=1, exitcode=3, error_file=str(ctx.tmpdir / "never.json"))
    ctx.expect_equal((absent.error_file, absent.signal_name()), ("<N/A>", "<N/A>"), "failure without an error file")
