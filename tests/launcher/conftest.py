"""Fixtures for launcher tests: start elastic-run / torchrun as real process groups and always reap them."""

from __future__ import annotations

import glob
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing

import pytest


def _missing(*modules: str) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            if name.split(".")[0] == "elastic_impl":
                raise  # our runtime is always in the tree: a broken import must fail the tests, not skip them
            missing.append(name)
    return missing


def requires(*modules: str):
    """Skip (saying which) when an optional third-party module is not installed; a module of our own runtime that
    fails to import is an error, raised at collection."""
    missing = _missing(*modules)
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


RUNTIME = ("elastic_impl.multiprocessing", "elastic_impl.rendezvous")
needs_runtime = requires(*RUNTIME)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "train.py")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launcher:
    """Starts launcher processes in their own sessions; ``cleanup`` kills every process group it started."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.marker_dirs: list = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("OMP_NUM_THREADS", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, argv: list[str], tool: str = "elastic-run", name: str = "agent", **env: str) -> subprocess.Popen:
        if tool == "elastic-run":
            cmd = [sys.executable, "-m", "elastic_impl.run", *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", *argv]
        out = open(self.tmp_path / f"{name}.{len(self.procs)}.out", "w+")
        err = open(self.tmp_path / f"{name}.{len(self.procs)}.err", "w+")
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env(**env), stdout=out, stderr=err, start_new_session=True
        )
        proc.out_file, proc.err_file = out, err  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc) -> tuple[str, str]:
        proc.out_file.flush()
        proc.err_file.flush()
        with open(proc.out_file.name) as o, open(proc.err_file.name) as e:
            return o.read(), e.read()

    def wait(self, proc, timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            out, err = self.output(proc)
            pytest.fail(f"launcher did not exit within {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")

    def cleanup(self) -> None:
        from fault_injection.processes import kill_session

        for proc in self.procs:
            kill_session(proc, timeout=10)
            # workers live in the launcher's session: make sure none of them outlived it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.out_file.close()
            proc.err_file.close()
        # A SIGKILLed agent cannot stop its workers (they run in their own process groups): reap them by pid.
        for marker_dir in self.marker_dirs:
            for marker in read_markers(marker_dir):
                _kill_if_train_worker(marker["pid"])


def _kill_if_train_worker(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"train.py" not in f.read():
                return  # pid reused by something else
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def launcher(tmp_path):
    runner = Launcher(tmp_path)
    yield runner
    runner.cleanup()


def read_markers(marker_dir) -> list[dict]:
    markers = []
    for path in sorted(glob.glob(os.path.join(str(marker_dir), "attempt*.json"))):
        with open(path) as f:
            markers.append(json.load(f))
    return markers


def marker_pids(marker_dir) -> set[int]:
    return {m["pid"] for m in read_markers(marker_dir)}


def new_markers(marker_dir, seen_pids: set[int], world_size: int) -> list[dict]:
    """Markers at ``world_size`` of workers not in ``seen_pids``: a node started alone in a MIN:MAX job may run a
    round of its own before its peer arrives, so "WORLD_SIZE=2 markers" alone does not identify a re-formed group."""
    return [m for m in read_markers(marker_dir) if m["pid"] not in seen_pids and m["WORLD_SIZE"] == str(world_size)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
