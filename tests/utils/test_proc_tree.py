"""elastic_impl.utils.proc_tree on real processes: the stat reader, descendants across sessions, liveness of a
zombie, and processes found by an environment entry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

from elastic_impl.utils.proc_tree import descendants, is_alive, pids_with_env, process_table, read_stat

# A child that starts a grandchild in a session of its own (so no process group or session links them), prints the
# grandchild's pid and waits.
_PARENT_OF_DAEMON = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(g.pid, flush=True)
time.sleep(60)
"""


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_descendants_follow_parent_links_across_sessions_and_a_zombie_is_not_alive():
    marker = uuid.uuid4().hex
    env = {**os.environ, "PROC_TREE_TEST": marker}
    child = subprocess.Popen([sys.executable, "-c", _PARENT_OF_DAEMON], stdout=subprocess.PIPE, text=True, env=env)
    grandchild = int(child.stdout.readline())
    try:
        stat = read_stat(grandchild)
        assert stat is not None and stat.ppid == child.pid and stat.session == grandchild
        assert stat.start_time is not None and stat.start_time.isdigit()
        assert descendants(os.getpid()).index(child.pid) < descendants(os.getpid()).index(grandchild)
        assert descendants([child.pid, 1], process_table()).count(grandchild) == 1
        # the grandchild inherited the marker (found once its exec has finished)
        assert _wait_until(lambda: pids_with_env("PROC_TREE_TEST", marker) == sorted([child.pid, grandchild]))
        assert pids_with_env("PROC_TREE_TEST", marker + "x") == []
    finally:
        os.kill(grandchild, 9)
        child.kill()
    assert _wait_until(lambda: getattr(read_stat(child.pid), "state", None) == "Z")
    assert not is_alive(child.pid) and child.pid not in process_table()  # killed, not yet reaped
    child.wait()
    child.stdout.close()
    assert read_stat(child.pid) is None and not is_alive(child.pid)
    assert is_alive(os.getpid())


def test_a_command_name_with_parentheses_and_spaces(tmp_path):
    tricky = tmp_path / "a) Z 1 (b"  # fields that would be misread if the line were split at the first ')'
    shutil.copy(shutil.which("sleep"), tricky)
    child = subprocess.Popen([str(tricky), "60"])
    try:
        assert _wait_until(lambda: getattr(read_stat(child.pid), "state", None) == "S")
        assert read_stat(child.pid).ppid == os.getpid() and is_alive(child.pid)
    finally:
        child.kill()
        child.wait()
