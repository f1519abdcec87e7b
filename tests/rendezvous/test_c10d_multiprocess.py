"""Done-when scenarios with one OS process per node over a real TCPStore on loopback."""

from __future__ import annotations

import json
import os
import select
import signal
import time

import pytest


def read_event(proc, timeout: float) -> dict:
    """The next JSON line the node prints (fails after ``timeout`` s, showing its stderr tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    raise AssertionError(f"node printed nothing within {timeout} s; stderr tail: {proc.stderr.read()[-2000:]}")


def endpoint(store) -> str:
    return f"127.0.0.1:{store.port}"


def wait_until_joined(ep: str, run_id: str = "test", timeout: float = 40) -> None:
    """Block until some node arrived in the run's round 0 (its startup may take seconds on a loaded machine)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, port = ep.rsplit(":", 1)
    client = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10), use_libuv=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.check([f"elastic.rdzv.{run_id}.k.g0.a1"]):
            del client
            return
        time.sleep(0.1)
    raise AssertionError(f"no node joined run {run_id!r} at {ep} within {timeout} s")


@pytest.mark.timeout(60)
def test_nodes_get_contiguous_ranks(tcp_store, node_procs):
    procs = [node_procs.start("join", "--endpoint", endpoint(tcp_store), "--min", "3", "--max", "3") for _ in range(3)]
    events = [read_event(p, 30) for p in procs]
    assert all(e["event"] == "rendezvous" for e in events), events
    assert sorted(e["rank"] for e in events) == [0, 1, 2]
    assert {e["world_size"] for e in events} == {3}
    assert len({e["node"] for e in events}) == 3
    assert all(p.wait(15) == 0 for p in procs)


@pytest.mark.timeout(60)
def test_late_node_triggers_a_new_round(tcp_store, node_procs):
    common = ("--endpoint", endpoint(tcp_store), "--min", "2", "--max", "3", "--last-call", "0.5")
    early = [node_procs.start("rejoin", *common) for _ in range(2)]
    first = [read_event(p, 30) for p in early]
    assert sorted(e["rank"] for e in first) == [0, 1] and {e["round"] for e in first} == {0}
    late = node_procs.start("join", *common)
    second = [read_event(p, 30) for p in [*early, late]]
    assert all(e["event"] == "rendezvous" for e in second), second
    assert {e["round"] for e in second} == {1}
    assert sorted(e["rank"] for e in second) == [0, 1, 2]
    assert {e["world_size"] for e in second} == {3}


@pytest.mark.timeout(60)
def test_node_that_stops_heartbeating_is_evicted(tcp_store, node_procs):
    common = ("--endpoint", endpoint(tcp_store), "--min", "2", "--max", "2", "--keep-alive", "0.3")
    assert_silent_node_is_evicted(node_procs.start("watch", *common), node_procs.start("watch", *common), 30, 15)


def assert_silent_node_is_evicted(watcher, victim, start_timeout: float, notice_timeout: float) -> None:
    """Two ``watch`` nodes rendezvous; the victim is frozen and the watcher must report it gone."""
    assert read_event(watcher, start_timeout)["event"] == "rendezvous"
    assert read_event(victim, start_timeout)["event"] == "rendezvous"
    os.killpg(victim.pid, signal.SIGSTOP)  # alive but silent: only its missing heartbeats can reveal it
    try:
        changed = read_event(watcher, notice_timeout)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
    assert changed["event"] == "participants_changed"
    assert len(changed["before"]) == 2 and len(changed["after"]) == 1


@pytest.mark.timeout(60)
def test_close_stops_waiting_nodes(tcp_store, node_procs):
    from elastic_impl.rendezvous import RendezvousParameters, rendezvous_handler_registry

    waiting = node_procs.start("join", "--endpoint", endpoint(tcp_store), "--min", "2", "--max", "2", "--join-timeout", "30")
    params = RendezvousParameters("c10d", endpoint(tcp_store), "test", 2, 2, is_host=False, read_timeout=5)
    closer = rendezvous_handler_registry.create_handler(params)
    # Close once the waiting node is visibly in the round.
    deadline = time.monotonic() + 20
    while not closer.get_participants() and time.monotonic() < deadline:
        time.sleep(0.1)
    closer.set_closed()
    event = read_event(waiting, 15)
    assert event["event"] == "error" and event["type"] == "RendezvousClosedError", event
    assert waiting.wait(10) == 1


@pytest.mark.timeout(60)
def test_join_timeout(tcp_store, node_procs):
    proc = node_procs.start("join", "--endpoint", endpoint(tcp_store), "--min", "2", "--max", "2", "--join-timeout", "2")
    event = read_event(proc, 30)
    assert event["event"] == "error" and event["type"] == "RendezvousTimeoutError", event


@pytest.mark.timeout(60)
def test_store_host_loss_is_a_connection_error(node_procs):
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()
    host = node_procs.start("host", "--endpoint", f"127.0.0.1:{port}")
    assert read_event(host, 30)["event"] == "hosting"
    waiting = node_procs.start(
        "join", "--endpoint", f"127.0.0.1:{port}", "--min", "2", "--max", "2", "--join-timeout", "60", "--read-timeout", "3"
    )
    wait_until_joined(f"127.0.0.1:{port}")
    os.killpg(host.pid, signal.SIGKILL)
    started = time.monotonic()
    event = read_event(waiting, 20)
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert f"127.0.0.1:{port} is gone" in event["message"]
    assert "\n" not in event["message"]
    assert time.monotonic() - started < 15


def _hosted_store(node_procs) -> tuple[object, str]:
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()
    host = node_procs.start("host", "--endpoint", f"127.0.0.1:{port}")
    assert read_event(host, 30)["event"] == "hosting"
    return host, f"127.0.0.1:{port}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("phase", ["joining", "running"])
def test_silent_store_host_fails_survivors_within_the_liveness_bound(node_procs, phase):
    """A store host that stops answering (SIGSTOP: sockets stay open, nothing replies, like a hung or partitioned
    machine) must not hold the survivors for the 60 s read timeout: they fail within the liveness bound."""
    host, ep = _hosted_store(node_procs)
    liveness = 2.0
    args = ["--endpoint", ep, "--read-timeout", "60", "--liveness", str(liveness), "--join-timeout", "120"]
    if phase == "joining":
        node = node_procs.start("join", *args, "--min", "2", "--max", "2")
        wait_until_joined(ep)
    else:
        node = node_procs.start("join", *args, "--min", "1", "--max", "1", "--last-call", "0.1", "--hold", "120")
        assert read_event(node, 30)["event"] == "rendezvous"
    os.killpg(host.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        event = read_event(node, 40)
    finally:
        os.killpg(host.pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert f"store host {ep} is gone" in event["message"] and "\n" not in event["message"]
    # Bounded by the liveness timeout (plus scheduling slack on a loaded machine), far below the read timeout.
    assert elapsed < 30, elapsed


@pytest.mark.timeout(60)
def test_unresolvable_endpoint_fails_at_once_naming_it():
    from elastic_impl.rendezvous import (
        RendezvousConnectionError,
        RendezvousParameters,
        rendezvous_handler_registry,
    )

    params = RendezvousParameters("c10d", "no-such-host.invalid:29411", "run", 1, 1, is_host=False, read_timeout=60)
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as excinfo:
        rendezvous_handler_registry.create_handler(params)
    assert time.monotonic() - started < 10
    assert "no-such-host.invalid:29411" in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.timeout(60)
def test_refused_endpoint_fails_after_connect_timeout_naming_it(caplog):
    from elastic_impl.rendezvous import (
        RendezvousConnectionError,
        RendezvousParameters,
        rendezvous_handler_registry,
    )
    from elastic_impl.utils.distributed import get_free_port

    port = get_free_port()  # nothing listens there
    params = RendezvousParameters(
        "c10d", f"127.0.0.1:{port}", "run", 1, 1, is_host=False, read_timeout=60, connect_timeout=3
    )
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="elastic_impl.rendezvous"), pytest.raises(RendezvousConnectionError) as excinfo:
        rendezvous_handler_registry.create_handler(params)
    # After a quiet first try, the node says where it waits and for how long (torchrun waits silently).
    waiting = [r.getMessage() for r in caplog.records if "does not answer yet" in r.getMessage()]
    assert len(waiting) == 1 and f"127.0.0.1:{port}" in waiting[0] and "up to 1 s more" in waiting[0], waiting
    assert time.monotonic() - started < 30  # 3 s connect timeout (TCPStore retries within ~2x), not the 60 s read timeout
    assert f"127.0.0.1:{port}" in str(excinfo.value) and "within 3.0 s" in str(excinfo.value)
