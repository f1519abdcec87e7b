"""Stopping ``elastic-sim run`` on a live scenario with a signal (Ctrl-C, ``timeout``'s SIGTERM, a closed terminal's
SIGHUP) stops the cluster: no store, agent, worker or network namespace is left, the history is written, and the
exit is one line naming the signal and where the logs are."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]

SCENARIO = """
name: interrupted
mode: live
nodes: 2
workers_per_node: 1
max_restarts: 0
backend: etcd-v3
timeouts: {join: 60, last_call: 1, heartbeat: 1, close: 10, keep_alive_max_attempt: 3}
job: {steps: 200, step_seconds: 0.5}
time_limit: 200
"""


def _namespaces() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _network_leftovers(namespaces: set[str]) -> list[str]:
    """What is left of these namespaces' run: the namespaces, their bridges and veths, their /etc/netns files."""
    tags = {name.split("-")[1] for name in namespaces}
    left = sorted(namespaces & _namespaces())
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.split("\n")
    left += [line.split()[0] for line in links if line and any(line.startswith((f"eb{t}", f"ev{t}")) for t in tags)]
    if os.path.isdir("/etc/netns"):
        left += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if any(n.startswith(f"elnet-{t}") for t in tags)]
    return left


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment contains ``text`` (the run's output directory)."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            shown = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
            found.append(f"{entry}: {shown}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_during_a_live_run_stops_the_cluster_and_keeps_its_history(tmp_path, sig):
    # Before: SIGTERM killed elastic-sim at once -- etcd, the network namespaces (and, for a while, agents and
    # workers) stayed, and history.jsonl was never written (seen, with etcd SIGSTOPped forever when the signal came
    # during a freeze_store).
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    before = _namespaces()
    proc = subprocess.Popen([sys.executable, "-m", "simulator", "run", str(scenario), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while not all(list((out / f"node{i}" / "markers").glob("attempt*")) for i in range(2)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        ours = _namespaces() - before
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, err[-1000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"elastic-sim: interrupted by {signal.Signals(sig).name}; cluster stopped, its history and logs "
                    f"are in {out}"), err[-1000:]
    assert took < 45, took
    assert (out / "history.jsonl").is_file()
    assert not _processes_mentioning(str(out)), _processes_mentioning(str(out))
    assert not _network_leftovers(ours), _network_leftovers(ours)
