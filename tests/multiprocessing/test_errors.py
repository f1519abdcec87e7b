import json
import os
import re
import signal

import pytest

from elastic_impl.multiprocessing import DefaultLogsSpecs, Std, to_map
from elastic_impl.multiprocessing.errors import ChildFailedError, ErrorHandler, ProcessFailure, record


def test_record_writes_upstream_format(tmp_path, monkeypatch):
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))

    @record
    def main():
        raise ZeroDivisionError("nope")

    with pytest.raises(ZeroDivisionError):
        main()
    data = json.loads(err.read_text())
    assert data["message"]["message"] == "ZeroDivisionError: nope"
    assert "ZeroDivisionError" in data["message"]["extraInfo"]["py_callstack"]
    assert data["message"]["extraInfo"]["timestamp"].isdigit()


def test_record_clean_sys_exit_writes_nothing(tmp_path, monkeypatch):
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))

    @record
    def main():
        raise SystemExit(0)

    assert main() is None  # as upstream: sys.exit(0) is a normal return of the decorated function
    assert not err.exists()


def test_dump_error_file_overrides_error_code(tmp_path, monkeypatch):
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"message": {"message": "E", "extraInfo": {"timestamp": "5"}}}))
    mine = tmp_path / "mine.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(mine))
    ErrorHandler().dump_error_file(str(child), error_code=7)
    assert json.loads(mine.read_text())["message"]["errorCode"] == 7


@pytest.mark.parametrize(("sig", "words"), [(signal.SIGSEGV, "native code"), (signal.SIGTERM, "terminated"),
                                             (signal.SIGINT, "interrupted")])
def test_signal_messages_name_cause(sig, words):
    f = ProcessFailure(local_rank=0, pid=42, exitcode=-sig, error_file="")
    assert f.signal_name() == sig.name and f.message == f"Signal {int(sig)} ({sig.name}) received by PID 42"  # upstream's
    report = ChildFailedError("trainer", {0: f}).format_msg()
    assert f"signal    : {sig.name}" in report and words in report, report


def test_child_failed_error_needs_failures():
    with pytest.raises(ValueError, match="empty"):
        ChildFailedError("x", {})


def test_to_map_and_devnull_logs(tmp_path):
    assert to_map(Std.OUT, 2) == {0: Std.OUT, 1: Std.OUT}
    assert to_map({1: Std.ERR}, 2) == {0: Std.NONE, 1: Std.ERR}
    dest = DefaultLogsSpecs(log_dir=str(tmp_path), redirects={0: Std.OUT}, tee={1: Std.ERR},
                            local_ranks_filter={1}).reify({0: {}, 1: {}})
    # every rank is named; "" = not redirected (the console), as upstream
    assert dest.stdouts[0].endswith("/0/stdout.log") and dest.stdouts[1] == "" and set(dest.tee_stderrs) == {1}
    # rank 0 is filtered out: its stderr, not written to a file, goes nowhere (as upstream)
    assert dest.stderrs[0] == os.devnull and dest.stderrs[1].endswith("/1/stderr.log")
    # no TORCHELASTIC_RUN_ID: upstream's default run id names the run folder
    assert re.search(r"/test_run_id_[^/]+/attempt_0/0/error\.json$", dest.error_files[0]), dest.error_files[0]


def test_bad_log_dir_is_one_line_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=f"^log_dir: {re.escape(str(f))} is a file$"):  # upstream's wording
        DefaultLogsSpecs(log_dir=str(f))
