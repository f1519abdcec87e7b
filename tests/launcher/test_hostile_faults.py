"""Faults a hostile run found (issue 13): each is a live test with real agents, workers and TCPStore.

- a worker's error file that is valid JSON but not a torchelastic record must not crash the agent, and the job's
  failure must reach every node (no node may exit 0 for a failed job);
- an unexpected error inside one node's agent is a job failure every node reports, never a peer's success;
- nothing a worker wrote is deleted by the agent: not by a membership restart, not by a rerun with the same
  ``--rdzv-id`` and ``--log-dir``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import textwrap

import pytest

from fault_injection.processes import is_alive
from tests.launcher.conftest import REPO, free_port, needs_runtime

pytestmark = [pytest.mark.slow, needs_runtime]

# A worker: ranks listed in FAIL_RANKS write ERROR_FILE_CONTENT (raw text) to their error file and exit 1 after
# FAIL_DELAY seconds; the others write a marker and exit 0 (on attempt 0 after OK_SLEEP seconds, so the first failure
# restarts both nodes; on later attempts at once, so their node waits at the exit barrier when the job fails).
_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    rank = int(os.environ["RANK"])
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    marker_dir = os.environ["MARKER_DIR"]
    with open(os.path.join(marker_dir, f"attempt{attempt}_rank{rank}_pid{os.getpid()}.json"), "w") as f:
        json.dump({"rank": rank, "attempt": attempt, "world": os.environ["WORLD_SIZE"]}, f)
    print(f"worker rank {rank} attempt {attempt} says hello", flush=True)
    print(f"worker rank {rank} attempt {attempt} stderr line", file=sys.stderr, flush=True)
    if str(rank) in os.environ.get("FAIL_RANKS", "").split(","):
        time.sleep(float(os.environ.get("FAIL_DELAY", "0")))
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            f.write(os.environ["ERROR_FILE_CONTENT"])
        sys.exit(1)
    if attempt == "0":  # still running when attempt 0's failure restarts both groups; later, done at once
        time.sleep(float(os.environ.get("OK_SLEEP", "0")))
    """
)


def _write_worker(tmp_path) -> str:
    path = tmp_path / "worker.py"
    path.write_text(_WORKER)
    return str(path)


def _two_node_args(port: int, max_restarts: int, log_dir, run_id: str = "hostile") -> list[str]:
    return [
        "--nnodes", "2:2",
        "--nproc-per-node", "2",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", run_id,
        "--rdzv-conf", "join_timeout=60,last_call_timeout=1,close_timeout=10,heartbeat=2,missed_heartbeats=5",
        "--max-restarts", str(max_restarts),
        "--monitor-interval", "0.1",
        "--shutdown-grace", "3",
        "--log-dir", str(log_dir),
        "--redirects", "3",
    ]


@pytest.mark.parametrize(
    "content", ["[1]", '"s"', "null", '{"message": {"extraInfo": "x"}}'], ids=["list", "string", "null", "bad-extra"]
)
def test_error_file_that_is_not_a_record_fails_the_job_on_every_node(launcher, tmp_path, content):
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = _write_worker(tmp_path)
    port = free_port()
    env = dict(MARKER_DIR=markers, FAIL_RANKS="2", FAIL_DELAY="2", OK_SLEEP="8", ERROR_FILE_CONTENT=content)
    agents = [
        launcher.start([*_two_node_args(port, 1, tmp_path / f"logs{i}"), worker], name=f"a{i}", **env)
        for i in range(2)
    ]
    codes = [launcher.wait(agent, 180) for agent in agents]
    errs = [launcher.output(agent)[1] for agent in agents]
    assert all(code != 0 for code in codes), (codes, [e[-3000:] for e in errs])
    for err in errs:
        assert "Traceback" not in err, err[-4000:]
        assert "AttributeError" not in err, err[-4000:]
    # the restart budget was used: the failing rank ran a second attempt
    attempts = {json.load(open(p))["attempt"] for p in glob.glob(str(markers / "attempt*_rank2_*.json"))}
    assert attempts == {"0", "1"}, attempts
    # every node's report names the unreadable error file
    for err in errs:
        report = err[err.rfind("Root Cause"):]
        assert "error.json" in report, err[-4000:]


_CRASHING_NODE = textwrap.dedent(
    """
    import sys
    from elastic_impl.launcher.api import LaunchConfig, launch_agent
    from elastic_impl.multiprocessing import DefaultLogsSpecs
    from elastic_impl.multiprocessing.errors import ChildFailedError

    class LogsSpecsBrokenOnRestart(DefaultLogsSpecs):
        # A user's LogsSpecs plugin with a bug that shows only on the first restart: an unexpected error inside
        # the agent, in the middle of a job.
        def reify(self, envs):
            if envs[min(envs)]["TORCHELASTIC_RESTART_COUNT"] != "0":
                raise KeyError("plugin bug")
            return super().reify(envs)

    port, worker, log_dir, crash = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    specs = (LogsSpecsBrokenOnRestart if crash else DefaultLogsSpecs)(log_dir=log_dir)
    config = LaunchConfig(
        min_nodes=2, max_nodes=2, nproc_per_node=2, logs_specs=specs, run_id="crash", rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=2, monitor_interval=0.1, shutdown_timeout=3,
        rdzv_configs={"join_timeout": 60, "last_call_timeout": 1, "close_timeout": 10,
                      "keep_alive_interval": 2, "keep_alive_max_attempt": 5},
    )
    try:
        launch_agent(config, sys.executable, [worker])
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr)
        sys.exit(1)
    print("NODE SUCCEEDED", flush=True)
    """
)


def test_agent_error_on_one_node_is_a_job_failure_on_every_node(launcher, tmp_path):
    """Node 1's agent breaks while restarting its workers; node 0, whose workers succeeded, must not exit 0."""
    import subprocess

    markers = tmp_path / "markers"
    markers.mkdir()
    worker = _write_worker(tmp_path)
    script = tmp_path / "node.py"
    script.write_text(_CRASHING_NODE)
    port = free_port()
    env = launcher.env(MARKER_DIR=str(markers), FAIL_RANKS="2", FAIL_DELAY="2", OK_SLEEP="8", ERROR_FILE_CONTENT="{}")
    procs = []
    for i in range(2):
        out = open(tmp_path / f"node{i}.out", "w+")
        err = open(tmp_path / f"node{i}.err", "w+")
        cmd = [sys.executable, str(script), str(port), worker, str(tmp_path / f"logs{i}"), "1" if i == 1 else "0"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        proc.out_file, proc.err_file = out, err
        launcher.procs.append(proc)
        procs.append(proc)
    codes = [launcher.wait(p, 180) for p in procs]
    outs = [launcher.output(p) for p in procs]
    assert all(code != 0 for code in codes), (codes, [o[1][-3000:] for o in outs])
    assert not any("NODE SUCCEEDED" in o[0] for o in outs), outs
    # the healthy node's report names the broken agent as the root cause
    healthy_err = outs[0][1]
    report = healthy_err[healthy_err.rfind("Root Cause"):]
    assert "plugin bug" in report, healthy_err[-4000:]


def test_a_rerun_with_the_same_run_id_and_log_dir_keeps_every_log(launcher, tmp_path):
    """A standalone job run twice with the same ``--rdzv-id`` and ``--log-dir``: the second run's workers must not
    delete (or reuse the folders of) the first run's logs. (A membership restart within one run is the next test.)"""
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = _write_worker(tmp_path)
    log_dir = tmp_path / "logs"
    args = [
        "--standalone", "--nproc-per-node", "2", "--rdzv-id", "same", "--log-dir", str(log_dir),
        "--redirects", "3", "--monitor-interval", "0.1", worker,
    ]
    for _ in range(2):
        agent = launcher.start(args, MARKER_DIR=markers)
        assert launcher.wait(agent, 120) == 0, launcher.output(agent)[1][-3000:]
    stdouts = sorted(glob.glob(str(log_dir / "**" / "stdout.log"), recursive=True))
    assert len(stdouts) == 4, stdouts  # 2 runs x 2 workers, each in its own folder
    texts = sorted(open(p).read() for p in stdouts)
    assert texts == sorted(f"worker rank {r} attempt 0 says hello\n" for r in (0, 1) for _ in range(2)), texts


# A worker that leaves a trace of everything a worker may write in its log folder (its stdout and stderr lines, a file of
# its own next to its error file, the error file itself), records where (a marker in MARKER_DIR), and runs until the
# test creates RELEASE_FILE.
_TRACING_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    env = os.environ
    tag = f"pid {os.getpid()} rank {env['RANK']} world {env['WORLD_SIZE']} restart {env['TORCHELASTIC_RESTART_COUNT']}"
    print(f"stdout of {tag}", flush=True)
    print(f"stderr of {tag}", file=sys.stderr, flush=True)
    folder = os.path.dirname(env["TORCHELASTIC_ERROR_FILE"])
    with open(os.path.join(folder, "own.txt"), "w") as f:
        f.write(tag)
    with open(env["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": f"error file of {tag}"}, f)
    marker = {"pid": os.getpid(), "WORLD_SIZE": env["WORLD_SIZE"], "tag": tag, "folder": folder}
    path = os.path.join(env["MARKER_DIR"], f"attempt_pid{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(marker, f)
    os.rename(path + ".tmp", path)
    while not os.path.exists(env["RELEASE_FILE"]):
        time.sleep(0.1)
    """
)


def test_membership_restarts_keep_every_earlier_start_s_logs(launcher, tmp_path):
    """Two agents, ``--nnodes 1:2``, c10d: the first runs alone, a second joins (the first restarts its workers at
    the new world size without using a restart: TORCHELASTIC_RESTART_COUNT stays 0), then the second is SIGTERMed
    and leaves (the survivor restarts its workers again). Every start's stdout, stderr, error file and the file a
    worker wrote itself must still be there, with what that start wrote, when the job is over."""
    import signal

    from tests.launcher.conftest import new_markers, read_markers, wait_for

    markers = tmp_path / "markers"
    markers.mkdir()
    release = tmp_path / "release"
    worker = tmp_path / "tracing_worker.py"
    worker.write_text(_TRACING_WORKER)
    port = free_port()
    env = dict(MARKER_DIR=markers, RELEASE_FILE=release)

    def args(log_dir):
        return [
            "--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "membership",
            "--rdzv-conf", "join_timeout=60,last_call_timeout=1,close_timeout=10,heartbeat=2,missed_heartbeats=5",
            "--monitor-interval", "0.1", "--shutdown-grace", "3", "--log-dir", str(log_dir), "--redirects", "3",
            str(worker),
        ]

    host = launcher.start(args(tmp_path / "logs_host"), name="host", **env)
    wait_for(lambda: len(new_markers(markers, set(), 2)) == 2, 120, "the first node's workers, alone (WORLD_SIZE 2)")
    seen = {m["pid"] for m in read_markers(markers)}
    joiner = launcher.start(args(tmp_path / "logs_joiner"), name="joiner", **env)
    wait_for(lambda: len(new_markers(markers, seen, 4)) == 4, 120, "both nodes' workers (WORLD_SIZE 4)")
    seen = {m["pid"] for m in read_markers(markers)}
    os.kill(joiner.pid, signal.SIGTERM)
    assert launcher.wait(joiner, 60) == 128 + signal.SIGTERM, launcher.output(joiner)[1][-3000:]
    wait_for(lambda: len(new_markers(markers, seen, 2)) == 2, 60, "the survivor's workers re-formed (WORLD_SIZE 2)")
    release.touch()
    assert launcher.wait(host, 60) == 0, launcher.output(host)[1][-3000:]

    starts = read_markers(markers)
    host_starts = [m for m in starts if m["folder"].startswith(str(tmp_path / "logs_host"))]
    # 3 starts of the host's 2 workers (alone, with the joiner, alone again), none of them a restart, in 3 folders
    assert sorted(m["WORLD_SIZE"] for m in host_starts) == ["2", "2", "2", "2", "4", "4"], starts
    assert all(m["tag"].endswith("restart 0") for m in host_starts), starts
    assert len({os.path.dirname(m["folder"]) for m in host_starts}) == 3, starts
    assert len(starts) == len(host_starts) + 2  # and the joiner's 2 workers, once
    for m in starts:
        folder = m["folder"]
        assert open(os.path.join(folder, "stdout.log")).read() == f"stdout of {m['tag']}\n", folder
        assert f"stderr of {m['tag']}\n" in open(os.path.join(folder, "stderr.log")).read(), folder
        assert open(os.path.join(folder, "own.txt")).read() == m["tag"], folder
        assert json.load(open(os.path.join(folder, "error.json"))) == {"message": f"error file of {m['tag']}"}, folder


# A worker that double-forks a daemon into a session of its own (the classic way to escape a process group), writes
# the daemon's pid to DAEMON_PID_FILE, and then either finishes or sleeps (WORKER_SLEEP).
_DAEMONIZING_WORKER = textwrap.dedent(
    """
    import os, sys, time
    if os.environ["LOCAL_RANK"] == "0":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                with open(os.environ["DAEMON_PID_FILE"] + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(os.environ["DAEMON_PID_FILE"] + ".tmp", os.environ["DAEMON_PID_FILE"])
                time.sleep(600)
            os._exit(0)
        os.wait()
    with open(os.path.join(os.environ["PID_DIR"], f"worker{os.environ['LOCAL_RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(float(os.environ.get("WORKER_SLEEP", "0")))
    """
)


def _kill_quietly(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_double_forked_daemon_does_not_survive_the_job(launcher, tmp_path):
    script = tmp_path / "daemonize.py"
    script.write_text(_DAEMONIZING_WORKER)
    daemon_pid_file = tmp_path / "daemon.pid"
    agent = launcher.start(
        ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)],
        DAEMON_PID_FILE=daemon_pid_file, PID_DIR=tmp_path,
    )
    try:
        assert launcher.wait(agent, 120) == 0, launcher.output(agent)[1][-3000:]
        daemon = int(daemon_pid_file.read_text())
        assert not is_alive(daemon), f"daemon {daemon} outlived the job"
    finally:
        if daemon_pid_file.exists():
            _kill_quietly(int(daemon_pid_file.read_text()))


def test_workers_and_their_daemons_do_not_outlive_a_sigkilled_agent(launcher, tmp_path):
    """SIGKILL to the agent alone: its workers (own sessions) and the daemon one of them double-forked (own session,
    re-parented to the agent, then to init once the agent is gone) must all end within 5 s."""
    import signal
    import time

    script = tmp_path / "daemonize.py"
    script.write_text(_DAEMONIZING_WORKER)
    daemon_pid_file = tmp_path / "daemon.pid"
    agent = launcher.start(
        ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)],
        DAEMON_PID_FILE=daemon_pid_file, PID_DIR=tmp_path, WORKER_SLEEP="600",
    )
    pid_files = [tmp_path / "worker0", tmp_path / "worker1", daemon_pid_file]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert time.monotonic() < deadline, launcher.output(agent)[1][-3000:]
        time.sleep(0.1)
    workers = [int(p.read_text()) for p in pid_files[:2]]
    daemon = int(daemon_pid_file.read_text())
    try:
        assert is_alive(daemon)
        agent.send_signal(signal.SIGKILL)  # the agent alone (its workers and the daemon have sessions of their own)
        agent.wait(10)
        deadline = time.monotonic() + 5
        while any(is_alive(p) for p in [*workers, daemon]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(is_alive(w) for w in workers), "workers outlived their SIGKILLed agent"
        assert not is_alive(daemon), f"the daemon {daemon} a worker double-forked outlived the SIGKILLed agent"
    finally:
        for pid in [*workers, daemon]:
            _kill_quietly(pid)


def test_waiting_for_peers_is_silent(launcher, tmp_path):
    """A node waiting for its peers printed ~3 C++ ``[c10d] waitForInput ... timed out`` lines a second."""
    import time

    script = tmp_path / "noop.py"
    script.write_text("pass\n")
    port = free_port()
    agent = launcher.start(
        ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "alone", str(script)],
    )
    time.sleep(6)
    assert agent.poll() is None, launcher.output(agent)[1][-2000:]  # still waiting for the second node
    err = launcher.output(agent)[1]
    assert "waitForInput" not in err and "[c10d]" not in err, err[-2000:]
