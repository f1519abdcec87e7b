"""Helpers for the "beyond upstream" scenarios (issue 8): real launchers side by side with upstream torchrun.

The rendezvous TCPStore is hosted by the TEST process (agents join with ``is_host=false``), so killing or stopping
any agent never takes the store with it (store-host loss is a separate scenario) and the test can read the
rendezvous state (closed? job-wide restart count?) after the agents are gone.

Every figure a test measures is printed as ``MEASURED <name> = <value>`` (run with ``-s`` to see them), attached to
the JUnit report (``record_property``) and, when ``ELASTIC_MEASUREMENTS_FILE`` is set, appended there as JSON lines.
They are reported, not asserted tightly: the assertions are generous bounds that a naive implementation misses.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest

from tests.launcher.conftest import (  # noqa: F401  (fixtures and helpers re-exported for these tests)
    TRAIN,
    Launcher,
    launcher,
    marker_pids,
    needs_runtime,
    new_markers,
    read_markers,
    wait_for,
)


@pytest.fixture
def rdzv_store():
    """A TCPStore on a free loopback port, hosted here for the agents' c10d rendezvous."""
    from torch.distributed import TCPStore

    store = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True, timeout=timedelta(seconds=30)
    )
    yield store
    del store


def agent_args(port: int, nnodes: str, *, run_id: str, max_restarts: int = 0, nproc: int = 2,
               conf: str = "", tool: str = "elastic-run", grace: float | None = 3) -> list[str]:
    """Launcher options for one agent of a multi-agent c10d job whose store the test hosts."""
    rdzv_conf = "is_host=false,join_timeout=60,last_call_timeout=1,close_timeout=10"
    if conf:
        rdzv_conf += "," + conf
    args = [
        "--nnodes", nnodes,
        "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", run_id,
        "--rdzv-conf", rdzv_conf,
        "--max-restarts", str(max_restarts),
        "--monitor-interval", "0.1",
    ]
    if tool == "elastic-run" and grace is not None:
        args += ["--shutdown-grace", str(grace)]
    return args


def our_rdzv_state(store, run_id: str):
    """Our rendezvous state of ``run_id`` as the agents left it in the store (None if never written)."""
    from elastic_impl.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from elastic_impl.rendezvous.dynamic_rendezvous import RendezvousState

    got = C10dRendezvousBackend(store, run_id).get_state()
    return None if got is None else RendezvousState.from_bytes(got[0])


def read_events(path) -> list[dict]:
    """The agent's structured events (ELASTIC_IMPL_EVENTS_FILE), in the order they were written."""
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
    return events


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(name))
    return children


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_node(proc) -> float:
    """SIGKILL a whole node: the agent's process group and its workers (own sessions). Returns the wall time."""
    workers = child_pids(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.time()
    proc.wait(30)
    return killed_at


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def measured(record_property):
    """``measured(name, value, unit="s")``: report one figure of this scenario."""

    def report(name: str, value, unit: str = "s") -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"MEASURED {name} = {text} {unit}".rstrip())
        record_property(name, f"{text} {unit}".strip())
        path = os.environ.get("ELASTIC_MEASUREMENTS_FILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"name": name, "value": value, "unit": unit}) + "\n")

    return report


TORCHRUN_REFERENCE_ENV = "ELASTIC_TORCHRUN_REFERENCE"


def pytest_collection_modifyitems(config, items):
    """The upstream-torchrun side of each scenario only measures upstream (often by watching it hang for a bounded
    time: ~15 min for all of them), so it runs on request: ``ELASTIC_TORCHRUN_REFERENCE=1``."""
    if os.environ.get(TORCHRUN_REFERENCE_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"upstream torchrun reference measurement; set {TORCHRUN_REFERENCE_ENV}=1 to run")
    for item in items:
        if "beyond_upstream" in item.nodeid and "torchrun" in item.nodeid:
            item.add_marker(skip)
