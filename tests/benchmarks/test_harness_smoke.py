"""Smoke test: the benchmark harness runs end to end at minimal size and writes its results."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import main, table
from benchmarks._harness import Unavailable, kill_pids, summarize, timed_command
from elastic_impl.utils.proc_tree import is_alive

REPO = Path(__file__).resolve().parents[2]


def test_summarize_median_and_spread():
    s = summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 5)
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


def test_unknown_benchmark_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nosuch"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "'nosuch'" in proc.stderr and "recovery" in proc.stderr


@pytest.mark.timeout(120)
def test_quick_cold_start_writes_results(tmp_path, capsys):
    assert main(["--quick", "--only", "cold_start", "--results-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cold_start.json").read_text())
    assert res["machine"]["cores"] == os.cpu_count() and len(res["loadavg_after"]) == 3
    case = res["cases"]["standalone 2 workers"]
    for side in ("ours", "upstream"):
        # Each side is either measured (a positive time) or says why it could not be.
        assert case[side].get("median", 0) > 0 or case[side]["unavailable"]
    assert "standalone 2 workers" in (tmp_path / "latest.md").read_text()
    assert "| cold_start |" in capsys.readouterr().out
    # --table-only rebuilds the table from the JSON without running anything.
    (tmp_path / "latest.md").unlink()
    assert main(["--table-only", "--results-dir", str(tmp_path)]) == 0
    rebuilt = (tmp_path / "latest.md").read_text()
    assert "| cold_start | standalone 2 workers |" in rebuilt and res["started_utc"] in rebuilt


def test_table_only_without_results_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--table-only", "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"python -m benchmarks: error: no results JSON in {tmp_path} to build a table from\n"


def test_table_marks_unavailable_sides():
    results = {"x": {"unit": "s", "cases": {"c": {"ours": {"unavailable": "no module"},
                                                   "upstream": summarize([1.0, 2.0, 3.0]), "ratio": None}}}}
    text = table(results)
    assert "| x | c | unavailable | 2 s [1-3] | - |" in text
    assert "x / c / ours: unavailable: no module" in text


def test_timed_command_kills_the_whole_group_on_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The parent starts a child in its own session (outside the group) and both hang: the timeout takes down both.
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    with pytest.raises(Unavailable, match="did not finish within 2s"):
        timed_command([sys.executable, "-c", script], 2.0, tmp_path)
    child = int(pid_file.read_text())
    # SIGKILL to the group is asynchronous: on a loaded machine the child may need a moment to be scheduled and die.
    deadline = time.monotonic() + 10
    while is_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kill_pids([child]) == []  # already gone: nothing left to kill


def test_timed_command_reports_exit_code_and_last_line(tmp_path):
    wall, rc, last = timed_command([sys.executable, "-c", "print('a'); print('last one'); raise SystemExit(3)"],
                                   30.0, tmp_path)
    assert (rc, last) == (3, "last one") and wall > 0


@pytest.mark.timeout(240)
def test_conformance_benchmark_times_a_real_certification():
    from benchmarks.conformance_bench import certify

    side = certify("upstream", 200.0, rows="RendezvousParameters.get")  # get, get_as_bool, get_as_int
    assert side["n"] == 1 and side["median"] > 0 and side["exit_code"] == 0
    assert side["verdicts"] == {"CONFORMS": 3}
    assert side["jobs"] == os.cpu_count() and side["certify_wall_s"] <= side["median"]


def test_quick_run_without_results_dir_leaves_the_committed_results_alone():
    # Before: --quick wrote into benchmarks/results/ (the committed results) unless --results-dir was given.
    from benchmarks.__main__ import QUICK_RESULTS_DIR, RESULTS_DIR

    committed = {p: p.read_bytes() for p in RESULTS_DIR.glob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--table-only"], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode == 0:
        assert (QUICK_RESULTS_DIR / "latest.md").exists()
    else:
        assert f"no results JSON in {QUICK_RESULTS_DIR} " in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in RESULTS_DIR.glob("*") if p.is_file()} == committed
    assert QUICK_RESULTS_DIR.is_relative_to(RESULTS_DIR / "tmp")  # git-ignored (see .gitignore)
