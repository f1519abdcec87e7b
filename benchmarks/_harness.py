"""Shared pieces of the benchmark harness: machine info, statistics, process hygiene, results."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

from elastic_impl.utils.proc_tree import descendants, is_alive

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """One side of a comparison cannot be measured here; the message says why (one line)."""


def machine_info() -> dict:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "torch": torch_version,
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
    }


def summarize(samples: Iterable[float]) -> dict:
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("summarize() needs at least one sample")
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        # Spread as the full range and the population stdev: with 5 samples quartiles say little.
        "stdev": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "samples": values,
    }


def ratio(ours: dict | None, upstream: dict | None, key: str = "median") -> float | None:
    """ours/upstream of a summary field; None when either side is unavailable."""
    try:
        a, b = ours[key], upstream[key]
    except (TypeError, KeyError):
        return None
    if not b:
        return None
    return a / b


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_available(name: str) -> str | None:
    """None if the module can be found, else a one-line reason."""
    try:
        if importlib.util.find_spec(name) is None:
            return f"module {name} not found"
    except (ImportError, ValueError) as e:
        return f"module {name} not importable: {type(e).__name__}: {e}"
    return None


def bench_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # Make the repository importable by child processes however the harness was started.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


def spawn(cmd: list[str], env: dict, log_path: Path | None = None, **kwargs) -> subprocess.Popen:
    """Start a process in its own session so the whole tree can be signalled as one group."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed by the Popen owner
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(REPO_ROOT), **kwargs)
    finally:
        if log_path:
            out.close()


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it after `grace` seconds; reaps the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Children that moved to their own session survive the leader; killpg still reaches the rest of the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_pids(pids: Iterable[int]) -> list[int]:
    """SIGKILL leftover processes (e.g. workers started in their own session); returns those that were alive."""
    alive = [p for p in set(pids) if p > 1 and is_alive(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def run_side(fn, *args, **kwargs) -> dict:
    """Run one side of a comparison; an Unavailable or crash becomes {"unavailable": reason}."""
    try:
        return fn(*args, **kwargs)
    except Unavailable as e:
        return {"unavailable": str(e)}
    except Exception as e:  # noqa: BLE001 - a benchmark side must never take the whole run down
        return {"unavailable": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def write_json(name: str, payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def python() -> str:
    return sys.executable


def timed_command(cmd: list[str], timeout: float, workdir: Path) -> tuple[float, int, str]:
    """Run a command once in its own process group: (wall seconds, exit code, last output line).

    A command still running after `timeout` is killed with its group and reported as Unavailable.
    """
    log = workdir / "command.log"
    t0 = time.time()
    proc = spawn(cmd, bench_env(), log)
    try:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{' '.join(cmd[2:5])} did not finish within {timeout:.0f}s") from None
        return time.time() - t0, proc.returncode, tail(log, 1)
    finally:
        # Children that started their own session (e.g. the certifier's etcd server) are outside the group.
        tree = descendants(proc.pid)
        stop_group(proc, grace=5.0)
        kill_pids(tree)
