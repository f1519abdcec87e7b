"""The guardian (elastic_impl/multiprocessing/_guardian.py): what a process's workers leave running is stopped once
that process is gone, also where no parent-death signal reaches (a double-forked daemon; workers started from a
thread other than the main one). Real processes throughout: an owner program started here, SIGKILLed or exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fault_injection.processes import is_alive
from tests.launcher.conftest import REPO

pytestmark = pytest.mark.timeout(60)

# The owner: starts one worker (a Python script) with start_processes, from the main thread or from another one.
# The worker double-forks a setsid daemon and writes "<worker pid> <daemon pid>" to PID_FILE, then sleeps. The owner
# then sleeps (to be SIGKILLed) or returns without closing the group (a normal exit).
_OWNER = textwrap.dedent(
    """
    import os, sys, threading, time
    from elastic_impl.multiprocessing import DefaultLogsSpecs, start_processes

    pid_file, log_dir, how = sys.argv[1], sys.argv[2], sys.argv[3]

    def start():
        code = (
            "import os, sys, time\\n"
            "r, w = os.pipe()\\n"
            "if os.fork() == 0:\\n"
            "    os.setsid()\\n"
            "    d = os.fork()\\n"
            "    if d == 0:\\n"
            "        time.sleep(600)\\n"
            "    os.write(w, str(d).encode()); os._exit(0)\\n"
            "os.close(w); daemon = os.read(r, 32).decode(); os.wait()\\n"
            "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {daemon}')\\n"
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
            "time.sleep(600)\\n"
        )
        envs = {0: {"TORCHELASTIC_RUN_ID": "g", "TORCHELASTIC_RESTART_COUNT": "0"}}
        return start_processes("g", sys.executable, {0: ("-c", code, pid_file)}, envs, DefaultLogsSpecs(log_dir=log_dir))

    if how == "thread":
        started = []
        t = threading.Thread(target=lambda: started.append(start()))
        t.start()
        t.join()
    else:
        start()
    while not os.path.exists(pid_file):
        time.sleep(0.02)
    if how != "exit":
        time.sleep(600)  # SIGKILLed here
    # how == "exit": return without closing the group
    """
)


def _run_owner(tmp_path, how: str) -> tuple[subprocess.Popen, int, int]:
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    pid_file = tmp_path / "pids"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    owner = subprocess.Popen([sys.executable, str(script), str(pid_file), str(tmp_path / "logs"), how], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert owner.poll() is None or how == "exit", owner.communicate()
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    worker, daemon = (int(p) for p in pid_file.read_text().split())
    return owner, worker, daemon


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(is_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if is_alive(p)]


def _kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["main", "thread"])
def test_a_sigkilled_owner_leaves_no_worker_nor_daemon(tmp_path, how):
    """From the main thread the worker dies of its parent-death signal and only its daemon needs the guardian; from
    another thread (no parent-death signal: Linux ties it to the starting thread) the worker needs it too."""
    owner, worker, daemon = _run_owner(tmp_path, how)
    try:
        assert is_alive(worker) and is_alive(daemon)
        owner.kill()
        owner.wait(10)
        assert _gone_within([worker, daemon], 5) == [], f"left running after the owner was SIGKILLed ({how} thread)"
        err = owner.stderr.read().decode()
        assert "stopped them (SIGKILL)" in err and str(daemon) in err, err  # the guardian says what it stopped
    finally:
        _kill([owner.pid, worker, daemon])


def test_a_normal_exit_that_never_closed_its_group_leaves_no_daemon(tmp_path):
    owner, worker, daemon = _run_owner(tmp_path, "exit")
    try:
        _, err = owner.communicate(timeout=30)  # returns once the guardian is gone too: it shares our stderr pipe
        assert owner.returncode == 0, err
        assert _gone_within([worker, daemon], 5) == [], err.decode()
    finally:
        _kill([owner.pid, worker, daemon])


def test_the_sweep_stops_only_marks_of_its_own_prefix():
    from elastic_impl.multiprocessing import _guardian

    def sleeper(mark: str) -> subprocess.Popen:
        env = dict(os.environ, ELASTIC_IMPL_WORKER_GROUP=mark)
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)

    mine, other = sleeper("1.abc.0001"), sleeper("1.abcd.0001")  # a prefix of the other's token is not a match
    try:
        deadline = time.monotonic() + 10
        while len(_guardian.marked(b"1.abc")) < 2:  # both exec'd (their environment readable)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _guardian.sweep(b"1.abc.") == {mine.pid}
        assert mine.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()
