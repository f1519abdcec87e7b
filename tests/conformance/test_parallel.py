"""``certify --jobs N``: check groups in worker processes give the serial verdicts, in table order, and survive a
worker that dies."""

from __future__ import annotations

import json
import os
import signal
import time

from conformance.cli import main

from .conftest import run_cli, write_package

# Rows from three check groups (rendezvous, timer, metrics), one of them broken in planted_impl.
ROWS = "RendezvousParameters.get_as_int,timer.TimerRequest,metrics.put_metric"


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_parallel_run_matches_the_serial_verdicts_in_table_order(planted_impl, tmp_path):
    reports = {}
    for jobs in ("1", "3"):
        out = tmp_path / f"jobs{jobs}"
        proc = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "-k", ROWS, "--jobs", jobs, "-q",
                        "--out", str(out)], extra_path=planted_impl)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # the planted get_as_int violation
        assert f"{jobs} job(s)" in proc.stdout
        reports[jobs] = _report(out)
    serial, parallel = ([(r["api"], r["verdict"], r["error"]) for r in reports[j]["results"]] for j in ("1", "3"))
    assert parallel == serial
    # planted_impl breaks get_as_int and has no timer/metrics packages at all.
    assert [(api.rsplit(".", 1)[-1], verdict) for api, verdict, _ in serial] == [
        ("get_as_int", "VIOLATION"), ("TimerRequest", "VIOLATION"), ("put_metric", "VIOLATION")]
    assert "get_as_int('42')" in serial[0][2] and "no submodule or attribute 'metrics'" in serial[2][2]
    assert reports["3"]["meta"]["jobs"] == 3


def test_bad_jobs_value_is_a_one_line_error(capsys):
    for bad in ("0", "two", "-1"):
        assert main(["certify", "--impl", "torch", "--device", "cpu", "--jobs", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"elastic-conformance: error: --jobs {bad!r} is not a positive whole number\n"


def test_a_worker_killed_by_the_implementation_fails_its_rows_and_leaves_no_orphan(tmp_path):
    # The implementation starts a helper process and then kills the worker process running the check outright.
    pid_file = tmp_path / "helper.pid"
    write_package(tmp_path, {
        "dying_impl/__init__.py": "",
        "dying_impl/rendezvous/__init__.py": f"""
            import os
            import subprocess

            from torch.distributed.elastic.rendezvous import *  # noqa: F401,F403
            from torch.distributed.elastic.rendezvous import RendezvousParameters as _Upstream


            class RendezvousParameters(_Upstream):
                def get_as_int(self, key, default=None):
                    helper = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                    with open({str(pid_file)!r}, "w") as fh:
                        fh.write(str(helper.pid))
                    os._exit(7)
        """,
    })
    out = tmp_path / "out"
    proc = run_cli(["certify", "--impl", "dying_impl", "--device", "cpu", "-k", ROWS, "--jobs", "2", "-q",
                    "--out", str(out)], extra_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["api"].split(".", 3)[-1]: r for r in _report(out)["results"]}
    died = rows["rendezvous.RendezvousParameters.get_as_int"]
    assert died["verdict"] == "VIOLATION" and "worker process died" in died["error"], died
    # Rows of the other groups still ran (dying_impl has no timer package: that is what they report).
    assert "no submodule or attribute 'timer'" in rows["timer.TimerRequest"]["error"]
    helper = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(helper):
        time.sleep(0.1)
    try:
        assert not _alive(helper), "the dead worker's helper process was left running"
    finally:
        if _alive(helper):
            os.kill(helper, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
