"""Live: a worker failure while its node cannot reach the store still spends the job's restart budget.

Two real agents (``elastic-run``, etcd-v2 rendezvous on a real etcd), each talking to etcd through its own loopback
TCP proxy, max_restarts=1. Node a's worker fails once: the job's one restart is spent (count 1); node b re-forms for
free (its workers do not depend on a's), so its own countdown is never spent. Then node b's proxy drops every
connection and b's worker fails: b cannot reach the job-wide counter. It must count the failure once the store
answers (the budget is spent: b fails the job and a stops on b's failure), not restart on its unspent local
countdown. Seen before the fix: b "restarted" on that countdown (a second failure round on a budget of one); here
its re-rendezvous then hit the cut store, so b died of a connection error without failing the job, and a waited
for it until its join timeout. (Had the cut healed before that rendezvous, b's workers would have run again.)
"""

from __future__ import annotations

import pathlib
import time

import pytest

from fault_injection.network import TcpProxy
from tests.launcher.conftest import Launcher, requires

pytestmark = [pytest.mark.etcd, pytest.mark.slow, requires("etcd", "elastic_impl.rendezvous")]

# Workers of both nodes: record each start, fail when told, else run a few seconds and succeed. Independent of each
# other (no collectives), so a peer's failure reaches the other node only as a membership change.
WORKER = """
import os, sys, time, pathlib
marks, node = pathlib.Path(sys.argv[1]), os.environ["BUDGET_NODE"]
starts = len(list(marks.glob(f"start-{node}-*")))
(marks / f"start-{node}-{starts}").write_text(os.environ["TORCHELASTIC_RESTART_COUNT"])
if node == "a" and starts == 0:
    time.sleep(1.0)
    sys.exit(3)
fail = marks / f"fail-{node}"
end = time.monotonic() + 8
while time.monotonic() < end:
    if fail.exists():
        fail.unlink()
        sys.exit(4)
    time.sleep(0.05)
"""


def _starts(marks: pathlib.Path, node: str) -> int:
    return len(list(marks.glob(f"start-{node}-*")))


def _wait_for(what, condition, timeout: float, agents, launcher) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(a.poll() is not None for a in agents):
            logs = [launcher.output(a)[1][-3000:] for a in agents]
            pytest.fail(f"{what} did not happen within {timeout} s (exit codes {[a.poll() for a in agents]})\n"
                        + "\n---\n".join(logs))
        time.sleep(0.05)


def test_a_failure_while_the_store_is_cut_off_is_counted_when_it_answers(tmp_path):
    from elastic_impl.rendezvous.etcd_server import EtcdServer

    marks = tmp_path / "marks"
    marks.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    server = EtcdServer()
    launcher = Launcher(tmp_path)
    try:
        server.start(timeout=60)
        proxies = {node: TcpProxy((server.get_host(), server.get_port()), name=f"proxy-{node}") for node in "ab"}
        agents = {
            node: launcher.start([
                "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1", "--monitor-interval", "0.1",
                "--rdzv-backend", "etcd-v2", "--rdzv-endpoint", proxies[node].endpoint, "--rdzv-id", "budget",
                # Outage window (heartbeat x missed) 15 s: the 1.5 s cut below is well inside it.
                "--rdzv-conf", "join_timeout=60,last_call_timeout=1,close_timeout=10,heartbeat=3,missed_heartbeats=5",
                str(worker), str(marks),
            ], name=f"agent-{node}", BUDGET_NODE=node)
            for node in "ab"
        }
        running = list(agents.values())
        # a failed once (the job's one restart), b re-formed with it: both started twice.
        _wait_for("the first restart", lambda: _starts(marks, "a") == 2 and _starts(marks, "b") == 2, 90, running,
                  launcher)
        assert (marks / "start-a-1").read_text() == "1"  # the job-wide count: the budget is spent
        proxies["b"].set_mode("drop")
        (marks / "fail-b").write_text("")
        time.sleep(1.5)  # b's failure is seen (monitor 0.1 s) and its counter calls fail all this time
        assert not (marks / "fail-b").exists(), "b's worker did not fail while cut off"
        proxies["b"].set_mode("forward")
        deadline = time.monotonic() + 60
        while _starts(marks, "b") == 2 and time.monotonic() < deadline and any(a.poll() is None for a in running):
            time.sleep(0.05)
        out_b = launcher.output(agents["b"])[1]
        assert _starts(marks, "b") == 2, f"b restarted its workers past max_restarts=1:\n{out_b[-3000:]}"
        code_b = launcher.wait(agents["b"], 60)
        out_b = launcher.output(agents["b"])[1]
        assert "the failure is counted once the store answers" in out_b, out_b[-3000:]
        assert "max_restarts=1 is exhausted" in out_b and code_b != 0, (code_b, out_b[-3000:])
        assert launcher.wait(agents["a"], 30) != 0  # a stops on b's published failure, not after its join timeout
    finally:
        launcher.cleanup()
        for proxy in locals().get("proxies", {}).values():
            proxy.close()
        server.stop()
