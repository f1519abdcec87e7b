"""``certify --jobs N``: check groups in worker processes give the serial verdicts, in table order, and survive a
worker that dies."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conformance.cli import main

from .conftest import REPO_ROOT, run_cli, write_package

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


def _etcd_descendants(root: int) -> list[int]:
    from fault_injection.processes import descendants

    found = []
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "etcd":
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.timeout(150)
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_stops_the_etcd_its_checks_started(tmp_path, jobs):
    """`kill <certify pid>` (a CI timeout, a scheduler) used to end certify on the spot and leave its etcd running;
    now the run unwinds, stops the servers its checks started, and says so."""
    import subprocess
    import sys

    from elastic_impl.rendezvous.etcd_server import find_etcd_binary
    from fault_injection.processes import is_alive

    try:
        find_etcd_binary()
    except FileNotFoundError as e:
        pytest.skip(f"needs the etcd binary: {e}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "conformance.cli", "certify", "--impl", "elastic_impl", "--device", "cpu",
         "-k", "etcd", "--jobs", jobs, "-q", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT),
        start_new_session=True)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not servers and proc.poll() is None and time.monotonic() < deadline:
            servers = _etcd_descendants(proc.pid)
            time.sleep(0.1)
        assert servers, f"certify started no etcd (rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, as `kill PID` does
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert "terminated by SIGTERM" in err
        gone_by = time.monotonic() + 10
        while any(is_alive(p) for p in servers) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not [p for p in servers if is_alive(p)], "etcd outlived the terminated certify"
    finally:
        for pid in [proc.pid, *servers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
