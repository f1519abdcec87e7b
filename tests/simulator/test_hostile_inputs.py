"""Hostile-user inputs to ``elastic-sim``: every bad one is a single line naming the value and what is allowed, exit 2,
and is refused before anything runs; nothing here starts agents."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simulator.cli import main

BASE = """
name: hostile
mode: virtual
nodes: 2
workers_per_node: 1
timeouts: {join: 20, last_call: 0.5, heartbeat: 0.5, close: 5, monitor: 0.1}
job: {steps: 4, step_seconds: 0.5}
"""


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


def one_line_exit_2(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("elastic-sim: error: "), err
    for needle in needles:
        assert needle in last, last
    return last


@pytest.mark.parametrize(
    "extra, needles",
    [
        # a list where the kind's name goes: was "TypeError: unhashable type: 'list'" with a traceback
        ("faults:\n  - {at: 1, fault: [kill_worker]}", ["faults[0].fault=['kill_worker']", "allowed: kill_worker"]),
        # no kind takes a signal: was accepted and silently ignored (kill_worker SIGKILLs whatever it says)
        ("faults:\n  - {at: 1, fault: kill_worker, node: 0, rank: 0, signal: SIGTERM}", ["faults[0].signal='SIGTERM'"]),
        # at or after time_limit the fault never happens: was accepted (virtual: never injected; live: the nemesis
        # slept until then, past the limit, and time.sleep(1e300) raised OverflowError)
        ("faults:\n  - {at: 1.0e+300, fault: kill_worker, node: 0, rank: 0}", ["faults[0].at=1e+300", "time_limit (600 s)"]),
        ("time_limit: 30\nfaults:\n  - {at: 30, fault: kill_worker, node: 0, rank: 0}", ["faults[0].at=30", "time_limit (30 s)"]),
        # an invariant name that does not exist: was accepted and reported "NOT reproduced" with exit 0
        ("expect: {violations: [no_such_invariant]}", ["expect.violations='no_such_invariant'", "allowed: ranks_unique"]),
        # a value the checker compares: was a whole run and an 'expected x' FAIL, exit 1
        ("expect: {restarts: x}", ["expect.restarts='x'", "integer >= 0"]),
        ("expect: {final_world_size: 0}", ["expect.final_world_size=0", "integer >= 1"]),
        # 100,000 virtual nodes: grew past 3.8 GB within a minute with no progress off a terminal
        ("nodes: 100000\nmin_nodes: 1", ["nodes=100000", "too many for virtual mode", "at most 1000"]),
        ("nodes: 1000\nmin_nodes: 1\nfaults:\n  - {at: 1, fault: add_node}", ["nodes=1001 with add_node faults"]),
        ("mode: live\nnodes: 100\nmin_nodes: 1", ["nodes=100", "too many for live mode", "at most 16"]),
        ("mode: live\nworkers_per_node: 1000", ["workers_per_node=1000 x 2 nodes", "at most 64"]),
    ],
)
def test_bad_scenario_fields_are_one_line_exit_2(tmp_path, capsys, extra, needles):
    one_line_exit_2(capsys, ["run", write(tmp_path, BASE + extra)], *needles)


def test_the_node_limit_leaves_the_largest_allowed_scenario_loadable(tmp_path):
    from simulator.scenario import MAX_VIRTUAL_NODES, load_scenario

    text = BASE.replace("nodes: 2", f"nodes: {MAX_VIRTUAL_NODES}\nmin_nodes: 1")
    assert load_scenario(write(tmp_path, text)).nodes == MAX_VIRTUAL_NODES


def test_a_directory_or_binary_file_as_the_scenario(tmp_path, capsys):
    # a directory was reported as "does not exist"; a non-UTF-8 file did not name the file
    one_line_exit_2(capsys, ["run", str(tmp_path)], "is a directory")
    one_line_exit_2(capsys, ["run", write(tmp_path, b"\xff\xfe\x00bad")], "s.yaml", "is not UTF-8 text")


@pytest.mark.parametrize("command", [["run", "SCENARIO"], ["fuzz", "--runs", "1"], ["explore", "--examples", "1"]])
def test_out_that_is_a_file_or_cannot_be_made_is_refused_before_the_run(tmp_path, capsys, command):
    # was: the whole run, then "FileExistsError" with a traceback (exit 1), or an unnamed "[Errno 2] ..." after it
    scenario = write(tmp_path, BASE)
    argv = [scenario if a == "SCENARIO" else a for a in command]
    one_line_exit_2(capsys, [*argv, "--out", scenario], f"--out {scenario!r} is an existing file")
    one_line_exit_2(capsys, [*argv, "--out", "/proc/no/such"], "--out '/proc/no/such': cannot create the directory")
    assert capsys.readouterr().out == ""  # nothing ran


def test_etcd_missing_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # was: a FaultError traceback, exit 1 (fails before any agent starts)
    monkeypatch.setenv("ETCD_BINARY", str(tmp_path / "no-etcd"))
    scenario = write(tmp_path, BASE.replace("mode: virtual", "mode: live\nbackend: etcd-v3"))
    out = tmp_path / "out"
    one_line_exit_2(capsys, ["run", scenario, "--out", str(out)], "failed: etcd store:", "no-etcd",
                    "is not an executable etcd", f"(logs in {out})")


def test_fuzz_keeps_the_simulated_nodes_log_lines_off_stderr():
    # fuzz --runs 1000 printed ~4,600 "rendezvous sim-N: ..." lines of the simulated runtime around its progress
    # (a real process: under pytest the log records would go to its capture handler, not to stderr)
    def fuzz(*extra):
        proc = subprocess.run([sys.executable, "-m", "simulator", "fuzz", "--seed", "0", "--runs", "20", *extra],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stderr[-500:]
        return proc.stderr

    quiet = fuzz()
    assert "rendezvous sim-" not in quiet and len(quiet.splitlines()) <= 5, quiet[:500]
    assert "rendezvous sim-" in fuzz("--verbose")


def test_a_virtual_run_off_a_terminal_writes_progress_lines(tmp_path, capsys):
    # A virtual run wrote no progress at all off a terminal (1,000 nodes: minutes of silence); now a plain line
    # every few seconds, the first at once, as live runs do. 100 nodes: enough events for a progress report.
    assert main(["run", write(tmp_path, BASE.replace("nodes: 2", "nodes: 100\nmin_nodes: 1"))]) == 0
    err = capsys.readouterr().err
    assert "virtual t=" in err and "\r" not in err, err[:300]


class _FakeCluster:
    """What the live nemesis loop touches, with no processes."""

    def __init__(self):
        self.records = []
        self.healed = 0

    def start(self, nodes, spares=0):
        pass

    def record(self, node, event, detail=None, **kw):
        self.records.append(detail)

    def heal(self):
        self.healed += 1

    def wait(self, timeout):
        return "succeeded"

    def node_counts(self):
        return 0, 0

    network_mode = None


def test_live_schedule_never_sleeps_past_the_time_limit(monkeypatch):
    # A fault lasting far past time_limit (valid: duration is not bounded by it) made the nemesis sleep until its
    # heal -- here 1000 s -- before it looked at the limit; now it stops at the limit and heals everything.
    from simulator.live import runner
    from simulator.scenario import scenario_from_dict

    scenario = scenario_from_dict({
        "name": "long pause", "mode": "live", "nodes": 2, "time_limit": 1,
        "faults": [{"at": 0, "fault": "pause_agent", "node": 0, "duration": 1000, "args": {"from": "launch"}}],
    })
    healable = type("Healable", (), {"heal": lambda self: None})()
    monkeypatch.setattr(runner, "inject_live", lambda cluster, fault, budget: healable)
    monkeypatch.setattr(runner, "_MIN_WAIT", 0.0)
    cluster = _FakeCluster()
    reporter = runner._Reporter(None, cluster, 1)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (runner._run_schedule(cluster, scenario, 1.0, reporter), done.set()),
                              daemon=True)
    t0 = time.monotonic()
    thread.start()
    assert done.wait(15), "the schedule slept past time_limit (1 s)"
    assert time.monotonic() - t0 < 15
    assert {"op": "schedule_abandoned", "reason": "time_limit"} in cluster.records and cluster.healed == 1
