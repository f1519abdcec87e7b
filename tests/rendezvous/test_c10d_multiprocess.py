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
    watcher = node_procs.start("watch", *common)
    victim = node_procs.start("watch", *common)
    assert read_event(watcher, 30)["event"] == "rendezvous"
    assert read_event(victim, 30)["event"] == "rendezvous"
    os.killpg(victim.pid, signal.SIGSTOP)  # alive but silent: only its missing heartbeats can reveal it
    try:
        changed = read_event(watcher, 15)
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
    time.sleep(3)  # let it reach the waiting loop
    os.killpg(host.pid, signal.SIGKILL)
    started = time.monotonic()
    event = read_event(waiting, 20)
    assert event["event"] == "error" and event["type"] == "RendezvousConnectionError", event
    assert f"127.0.0.1:{port}" in event["message"]
    assert "\n" not in event["message"]
    assert time.monotonic() - started < 15
