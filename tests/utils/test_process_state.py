"""read_proc_state / is_uninterruptible_state on real processes, for ours and upstream's."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time

import pytest


@pytest.fixture(params=["elastic_impl", "torch.distributed.elastic"])
def process_state(request):
    return importlib.import_module(f"{request.param}.utils.process_state")


def _wait_for_state(process_state, pid: int, wanted: str) -> str | None:
    deadline = time.monotonic() + 10
    state = process_state.read_proc_state(pid)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.02)
        state = process_state.read_proc_state(pid)
    return state


def test_running_sleeping_and_zombie_processes(process_state):
    assert process_state.read_proc_state(os.getpid()) == "R"  # we are running while we read it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _wait_for_state(process_state, child.pid, "S") == "S"
        child.kill()
        # Killed but not yet reaped: a zombie.
        assert _wait_for_state(process_state, child.pid, "Z") == "Z"
    finally:
        child.kill()
        child.wait()
    assert process_state.read_proc_state(child.pid) is None  # reaped: no /proc entry


def test_command_name_with_parentheses_and_spaces(process_state, tmp_path):
    # The command name is printed in parentheses and may itself contain ") Z (": the state must come after the
    # LAST ')'.
    tricky = tmp_path / "a) Z (b"
    shutil.copy(shutil.which("sleep"), tricky)
    child = subprocess.Popen([str(tricky), "60"])
    try:
        assert _wait_for_state(process_state, child.pid, "S") == "S"
    finally:
        child.kill()
        child.wait()


def test_unreadable_pid_is_none(process_state):
    assert process_state.read_proc_state(2**22 + 12345) is None  # above pid_max's default range


@pytest.mark.parametrize(
    ("state", "uninterruptible"), [("D", True), ("D+", True), ("S", False), ("R", False), ("Z", False), (None, False)]
)
def test_is_uninterruptible_state(process_state, state, uninterruptible):
    assert process_state.is_uninterruptible_state(state) is uninterruptible
