import json
import os
import signal
import sys
import textwrap
import time

import pytest

from elastic_impl.multiprocessing import (
    ChildFailedError,
    DefaultLogsSpecs,
    ProcessFailure,
    Std,
    start_processes,
)
from tests.multiprocessing import workers
from tests.multiprocessing.conftest import descendants_of_us

pytestmark = pytest.mark.timeout(60)


def _envs(n, run_id="run"):
    return {i: {"TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": "0"} for i in range(n)}


def _start(contexts, *a, **kw):
    pc = start_processes(*a, **kw)
    contexts.append(pc)
    return pc


def test_function_entrypoint_returns_values_and_redirects(tmp_path, contexts):
    specs = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ALL)
    pc = _start(contexts, "fn", workers.echo_double, {0: (1,), 1: (5,)}, _envs(2), specs)
    result = pc.wait()
    assert not result.is_failed()
    assert result.return_values == {0: 2, 1: 10}
    for rank, x in ((0, 1), (1, 5)):
        (run_dir,) = tmp_path.glob("run_*")  # one folder per run: <log_dir>/<run_id>_<unique>
        out = run_dir / "attempt_0" / str(rank) / "stdout.log"
        err = run_dir / "attempt_0" / str(rank) / "stderr.log"
        assert result.stdouts[rank] == str(out) and out.read_text() == f"out-{x}\n"
        assert err.read_text() == f"err-{x}\n"


def test_env_reaches_function_worker(tmp_path, contexts):
    envs = _envs(1)
    envs[0]["MY_VAR"] = "hello"
    pc = _start(contexts, "fn", workers.env_value, {0: ("MY_VAR",)}, envs, DefaultLogsSpecs(log_dir=str(tmp_path)))
    assert pc.wait().return_values == {0: "hello"}


def test_binary_entrypoint_success_and_tee(tmp_path, contexts, capfd):
    specs = DefaultLogsSpecs(log_dir=str(tmp_path), tee=Std.OUT)
    code = "import os; print('bin-' + os.environ['LOCAL_X'])"
    envs = _envs(2)
    envs[0]["LOCAL_X"], envs[1]["LOCAL_X"] = "a", "b"
    pc = _start(contexts, "bin", sys.executable, {0: ("-c", code), 1: ("-c", code)}, envs, specs,
                log_line_prefixes={0: "[zero]:", 1: "[one]:"})
    result = pc.wait()
    assert not result.is_failed()
    assert result.return_values == {0: None, 1: None}
    (run_dir,) = tmp_path.glob("run_*")
    assert (run_dir / "attempt_0" / "0" / "stdout.log").read_text() == "bin-a\n"
    pc.close()  # stops the tailers, which flush what they read
    out = capfd.readouterr().out
    assert "[zero]:bin-a" in out and "[one]:bin-b" in out


def test_default_tee_prefix_names_rank(tmp_path, contexts, capfd):
    specs = DefaultLogsSpecs(log_dir=str(tmp_path), tee=Std.ERR)
    pc = _start(contexts, "trainer", workers.echo_double, {0: (3,)}, _envs(1), specs)
    assert pc.wait().return_values == {0: 6}
    pc.close()
    captured = capfd.readouterr()
    assert "[trainer0]:err-3" in captured.err
    # stdout was not teed: the worker inherits our stdout and writes it unprefixed
    assert "out-3" in captured.out and "[trainer0]:out-3" not in captured.out

def test_raising_worker_writes_error_file_and_stops_others(tmp_path, contexts):
    specs = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ERR)
    pc = _start(contexts, "fn", workers.raise_on, {0: (1, 0), 1: (1, 1)}, _envs(2), specs)
    result = pc.wait()
    assert result.is_failed() and set(result.failures) == {1}
    failure = result.failures[1]
    data = json.loads(open(failure.error_file).read())
    assert data["message"]["message"] == "RuntimeError: worker 1 failed on purpose"
    assert "raise RuntimeError" in data["message"]["extraInfo"]["py_callstack"]
    assert int(data["message"]["extraInfo"]["timestamp"]) == failure.timestamp
    assert failure.exitcode == 1 and failure.pid == pc.pids()[1]
    assert "worker 1 failed on purpose" in failure.message
    assert any("worker 1 failed on purpose" in line for line in failure.stderr_tail)
    assert descendants_of_us() & set(pc.pids().values()) == set()  # the healthy worker was stopped too


def test_record_decorator_in_binary_worker(tmp_path, contexts):
    code = textwrap.dedent("""
        import sys
        from elastic_impl.multiprocessing.errors import record
        @record
        def main():
            raise KeyError("missing-thing")
        main()
    """)
    envs = _envs(1)
    envs[0]["PYTHONPATH"] = os.pathsep.join(sys.path)
    pc = _start(contexts, "bin", sys.executable, {0: ("-c", code)}, envs, DefaultLogsSpecs(log_dir=str(tmp_path)))
    failure = pc.wait().failures[0]
    assert failure.error_file_data["message"]["message"] == "KeyError: 'missing-thing'"
    assert "KeyError" in failure.message


def test_sigkilled_worker_names_signal(tmp_path, contexts):
    pc = _start(contexts, "bin", sys.executable, {0: ("-c", "import time; time.sleep(60)")}, _envs(1),
                DefaultLogsSpecs(log_dir=str(tmp_path)))
    assert pc.wait(timeout=0.3, period=0.1) is None  # still running
    os.kill(pc.pids()[0], signal.SIGKILL)
    failure = pc.wait(period=30).failures[0]  # event-driven: no need to wait out the period
    assert failure.exitcode == -signal.SIGKILL
    assert failure.signal_name() == "SIGKILL"
    assert failure.message == f"Signal 9 (SIGKILL) received by PID {failure.pid}"  # upstream's attribute
    msg = ChildFailedError("bin", {0: failure}).format_msg()
    assert "SIGKILL" in msg and "OOM killer" in msg and "<N/A>" not in msg


def test_stderr_tail_without_record(tmp_path, contexts):
    code = "import sys\nfor i in range(30): print(f'line {i}', file=sys.stderr)\nsys.exit(3)"
    pc = _start(contexts, "bin", sys.executable, {0: ("-c", code)}, _envs(1),
                DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.ERR))
    failure = pc.wait().failures[0]
    assert failure.exitcode == 3
    assert failure.stderr_tail == [f"line {i}" for i in range(10, 30)]
    assert failure.error_file == "<N/A>"  # upstream's attributes; the report below says more
    assert failure.message == "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"
    report = ChildFailedError("bin", {0: failure}).format_msg()
    assert "message   : line 29" in report and "<N/A>" not in report, report


def test_wait_timeout_returns_none_while_running(tmp_path, contexts):
    pc = _start(contexts, "fn", workers.sleep_forever, {0: ()}, _envs(1), DefaultLogsSpecs(log_dir=str(tmp_path)))
    assert pc.wait(timeout=0.5, period=0.1) is None
    assert pc.wait(0) is None
    pid = pc.pids()[0]
    pc.close(timeout=5)
    assert pid not in descendants_of_us()


def test_close_kills_grandchildren_and_sigterm_ignorers(tmp_path, contexts):
    code = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # a grandchild that also ignores SIGTERM, and one that leaves our session (setsid)
        g1 = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        g2 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open(sys.argv[1] + ".tmp", "w").write(f"{g1.pid} {g2.pid}")
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    """)
    before = descendants_of_us()
    pidfiles = [tmp_path / "gc0.pid", tmp_path / "gc1.pid"]
    pc = _start(contexts, "bin", sys.executable, {r: ("-c", code, str(pidfiles[r])) for r in (0, 1)},
                _envs(2), DefaultLogsSpecs(log_dir=str(tmp_path)))
    for _ in range(300):
        if all(f.exists() for f in pidfiles):
            break
        assert pc.wait(timeout=0.1, period=0.1) is None
    grandchildren = {int(p) for f in pidfiles for p in f.read_text().split()}
    assert len(descendants_of_us() - before) >= 6  # 2 workers + 4 grandchildren
    pc.close(timeout=1)
    assert descendants_of_us() - before == set()
    for p in grandchildren:
        assert not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split(") ")[1][0] == "Z"


def test_root_cause_is_earliest_failure(tmp_path):
    failures = {}
    for rank, ts in ((0, 300), (1, 100), (2, 200)):
        f = tmp_path / f"err{rank}.json"
        f.write_text(json.dumps({"message": {"message": f"E{rank}", "extraInfo": {
            "py_callstack": f"trace {rank}", "timestamp": str(ts)}}}))
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1, error_file=str(f))
    err = ChildFailedError("job", failures)
    rank, root = err.get_first_failure()
    assert rank == 1 and root.timestamp == 100 and root.message == "trace 1"
    msg = err.format_msg()
    assert msg.index("Root Cause") < msg.index("trace 1")
    assert "job FAILED" in msg


@pytest.mark.parametrize("bad", ["4", "x", "0:1,1", "-1", ""])
def test_bad_std_string_one_line_error(bad):
    with pytest.raises(ValueError) as ei:
        Std.from_str(bad)
    assert repr(bad) in str(ei.value) and "\n" not in str(ei.value)


def test_std_from_str_values():
    assert Std.from_str("3") == Std.ALL
    assert Std.from_str("0:1,1:2") == {0: Std.OUT, 1: Std.ERR}


def test_mismatched_args_envs_one_line_error(tmp_path):
    # RuntimeError with upstream's wording (code written against upstream catches it), and a ValueError as before
    with pytest.raises(RuntimeError, match=r"^envs, local rank mapping mismatch, expected: \{0, 1\}, actual: \{0\}$") as ei:
        start_processes("x", workers.echo_double, {0: (1,), 1: (2,)}, _envs(1), DefaultLogsSpecs(str(tmp_path)))
    assert "\n" not in str(ei.value) and isinstance(ei.value, ValueError)


def test_bad_entrypoint_and_start_method(tmp_path):
    with pytest.raises(ValueError, match="bad entrypoint 42"):
        start_processes("x", 42, {0: ()}, _envs(1), DefaultLogsSpecs(str(tmp_path)))
    with pytest.raises(ValueError, match="bad start_method 'nope'"):
        start_processes("x", workers.echo_double, {0: (1,)}, _envs(1), DefaultLogsSpecs(str(tmp_path)),
                        start_method="nope")
    with pytest.raises(ValueError, match="cannot execute"):
        start_processes("x", "/nonexistent/binary", {0: ()}, _envs(1), DefaultLogsSpecs(str(tmp_path)))


def test_close_kills_grandchild_that_outlived_its_worker(tmp_path, contexts):
    pidfile = tmp_path / "gc.pid"
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open(sys.argv[1] + ".tmp", "w").write(str(g.pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(float(sys.argv[2]))
    """)
    pc = _start(contexts, "bin", sys.executable, {0: ("-c", code, str(pidfile), "0.5"),
                                                  1: ("-c", "import time; time.sleep(600)")},
                _envs(2), DefaultLogsSpecs(log_dir=str(tmp_path)))
    for _ in range(300):
        if pidfile.exists():
            break
        assert pc.wait(timeout=0.1, period=0.1) is None
    grandchild = int(pidfile.read_text())
    assert pc.wait(timeout=0.1, period=0.1) is None  # sees the grandchild while its worker lives
    for _ in range(100):  # worker 0 exits cleanly; its grandchild lives on in its own session
        if pc.subprocess_handlers[0].proc.poll() is not None:
            break
        pc.wait(timeout=0.05, period=0.05)
    assert os.path.exists(f"/proc/{grandchild}")
    pc.close(timeout=2)
    assert not os.path.exists(f"/proc/{grandchild}") or open(f"/proc/{grandchild}/stat").read().split(") ")[1][0] == "Z"


class _NoSleepClock:
    """Real time, but sleeping is an error: wait() must block on exit events, not poll with sleep."""

    def __init__(self):
        from elastic_impl.utils.clock import REAL_CLOCK

        self._real = REAL_CLOCK

    def monotonic(self):
        return self._real.monotonic()

    def time(self):
        return self._real.time()

    def sleep(self, seconds):
        raise AssertionError(f"wait() fell back to polling sleep({seconds})")

    def wait(self, event, timeout):
        return self._real.wait(event, timeout)


@pytest.mark.parametrize("kind", ["function", "binary"])
def test_wait_is_event_driven(tmp_path, contexts, kind):
    if kind == "function":
        pc = _start(contexts, "fn", workers.echo_double, {0: (2,)}, _envs(1), DefaultLogsSpecs(str(tmp_path)))
    else:
        pc = _start(contexts, "bin", sys.executable, {0: ("-c", "import time; time.sleep(0.3)")}, _envs(1),
                    DefaultLogsSpecs(str(tmp_path)))
    pc.clock = _NoSleepClock()
    result = pc.wait(timeout=30, period=30)
    assert result is not None and not result.is_failed()


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["function", "binary"])
def test_wait_wakes_for_an_exit_between_its_poll_and_its_block(tmp_path, contexts, kind):
    """A worker that exits after wait()'s poll saw it running, but before wait() blocks, must wake it at once.

    CI once lost this race: the exited worker was filtered out of the events to wait on, so wait() slept its whole
    30 s period. Here the race is forced: poll, let the worker exit (a zombie, its exit event pending), then block.
    """
    if kind == "function":
        pc = _start(contexts, "fn", workers.sleep_for, {0: (0.5,)}, _envs(1), DefaultLogsSpecs(str(tmp_path)))
    else:
        pc = _start(contexts, "bin", sys.executable, {0: ("-c", "import time; time.sleep(0.5)")}, _envs(1),
                    DefaultLogsSpecs(str(tmp_path)))
    assert pc._poll() is None
    (pid,) = pc.pids().values()
    deadline = time.monotonic() + 30
    while not _is_zombie(pid):
        assert time.monotonic() < deadline, "the worker did not exit"
        time.sleep(0.02)
    pc.clock = _NoSleepClock()
    started = time.monotonic()
    pc._wait_for_exit(30)
    assert time.monotonic() - started < 5
    result = pc.wait(timeout=30, period=30)
    assert result is not None and not result.is_failed()


def test_close_keeps_the_exit_status_of_binary_workers(tmp_path, contexts):
    """close() must not reap the workers behind their Popen's back: Popen then reports exit code 0 for a worker that
    was killed, and wait() after close() called a stopped group a success."""
    pc = _start(contexts, "bin", "/bin/sh", {0: ("-c", "exec sleep 30"), 1: ("-c", "trap '' TERM; exec sleep 30")},
                _envs(2), DefaultLogsSpecs(log_dir=str(tmp_path)))
    time.sleep(0.2)  # let rank 1's shell install its trap before the exec
    pc.close(timeout=0.5)
    result = pc.wait(0)
    assert result is not None and result.is_failed(), result
    assert {r: f.exitcode for r, f in result.failures.items()} == {0: -signal.SIGTERM, 1: -signal.SIGKILL}


def test_close_keeps_the_exit_status_of_function_workers(tmp_path, contexts):
    """Reaped behind its back, a multiprocessing Process never learns its exit code and stays "alive" forever:
    wait() after close() returned None, and wait(-1) would have hung."""
    pc = _start(contexts, "fn", workers.sleep_forever, {0: ()}, _envs(1), DefaultLogsSpecs(log_dir=str(tmp_path)),
                start_method="fork")
    pc.close(death_sig=signal.SIGKILL, timeout=1)
    result = pc.wait(timeout=5, period=0.05)
    assert result is not None and {r: f.exitcode for r, f in result.failures.items()} == {0: -signal.SIGKILL}


def test_function_workers_name_may_hold_a_slash(tmp_path, contexts):
    """The name is free text (upstream uses it only in log prefixes); it made the return-value folder's path."""
    pc = _start(contexts, "role/trainer", workers.echo_double, {0: (3,)}, _envs(1), DefaultLogsSpecs(str(tmp_path)),
                start_method="fork")
    assert pc.wait(timeout=30, period=0.05).return_values == {0: 6}


def test_a_stop_gives_up_on_a_process_sigkill_cannot_end(tmp_path, contexts, monkeypatch, caplog):
    """A process in uninterruptible kernel sleep (hung driver, NFS hard mount) outlives SIGKILL until the kernel lets
    go; stopping its group must still return (review finding: the SIGKILL loop had no deadline, so an agent stopping
    a truly stuck worker hung forever and never reported the failure). Such a process cannot be made here, so the
    kernel's answer is the test double: the worker's pid keeps looking alive after it was killed."""
    from elastic_impl.multiprocessing import api

    pc = _start(contexts, "sleeper", "/bin/sleep", {0: ("60",)}, _envs(1), DefaultLogsSpecs(log_dir=str(tmp_path)))
    (pid,) = pc.pids().values()
    real_is_alive = api.is_alive
    monkeypatch.setattr(api, "is_alive", lambda p: True if p == pid else real_is_alive(p))
    monkeypatch.setattr(api, "SIGKILL_WAIT", 0.5)
    started = time.monotonic()
    pc.close(timeout=0.2)
    assert time.monotonic() - started < 10
    assert any("survived SIGKILL" in r.message and str(pid) in r.message for r in caplog.records), caplog.text


def test_a_poll_after_close_reports_without_stopping_the_group_again(tmp_path, contexts, caplog):
    """The agent reads a stopped group's exit statuses with wait(0) after close(): that poll must only report (it used
    to close the group a second time and log 'failed local ranks ...; stopping the others' after the stop)."""
    pc = _start(contexts, "sleeper", "/bin/sleep", {0: ("60",), 1: ("60",)}, _envs(2),
                DefaultLogsSpecs(log_dir=str(tmp_path)))
    pc.close(timeout=5)
    caplog.clear()
    result = pc.wait(0)
    assert result is not None and sorted(result.failures) == [0, 1]
    assert {f.exitcode for f in result.failures.values()} == {-signal.SIGTERM}
    assert not any("stopping the others" in r.message for r in caplog.records), caplog.text
