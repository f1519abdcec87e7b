"""The SimpleElasticAgent run loop: restart policy, membership restarts, exit barrier, failure publication.

Workers are scripted (the loop's decisions are under test, not process handling); the rendezvous round store is a
real TCPStore, namespaced per round like the real handler's.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass

from torch.distributed import PrefixStore

from elastic_impl.agent.server import RunResult, SimpleElasticAgent, WorkerSpec, WorkerState
from elastic_impl.agent.server.decisions import Ask


@dataclass
class _Info:
    store: object
    rank: int
    world_size: int
    bootstrap_store_info: object = None


@dataclass
class _Failure:
    local_rank: int
    exitcode: int
    timestamp: int
    pid: int = 1234
    message: str = "boom"


class RoundStoreHandler:
    """Rendezvous double: each call to next_rendezvous is a new round with its own prefix of one real store.

    It reports its round (``extensions.RoundReportingHandler``) but not what the join saw nor the participants.
    """

    def __init__(self, store, world_size=1, rank=0, waiting=None):
        self.store = store
        self.world_size = world_size
        self.rank = rank
        self.rounds = 0
        self.waiting = list(waiting or [])  # successive num_nodes_waiting() answers, then 0
        self.closed = False

    def next_rendezvous(self):
        self.rounds += 1
        return _Info(PrefixStore(f"round{self.rounds}", self.store), self.rank, self.world_size)

    def num_nodes_waiting(self):
        return self.waiting.pop(0) if self.waiting else 0

    def get_run_id(self):
        return "loop-test"

    def get_round(self):
        return self.rounds

    def last_round(self):
        return None  # not told by the join: the agent reads the round and the restart count instead

    def get_participants(self):
        return None  # unknown: the agent judges membership only by rounds and waiting nodes

    def set_closed(self):
        self.closed = True

    def shutdown(self):
        return True


class CountingRoundStoreHandler(RoundStoreHandler):
    """Adds the job-wide restart counter (``extensions.RestartCountingHandler``)."""

    def __init__(self, store, **kwargs):
        super().__init__(store, **kwargs)
        self.job_restarts = 0

    def get_restart_count(self):
        return self.job_restarts

    def increment_restart_count(self):
        self.job_restarts += 1
        return self.job_restarts


class ScriptedAgent(SimpleElasticAgent):
    """Workers whose monitored states come from a script; records lifecycle calls."""

    def __init__(self, spec, script, **kwargs):
        super().__init__(spec, **kwargs)
        self.script = list(script)
        self.calls: list[str] = []
        self.started_restart_counts: list[int] = []

    def _start_workers(self, worker_group):
        self.calls.append("start")
        self.started_restart_counts.append(self._restart_count)
        return {w.local_rank: 1000 + w.local_rank for w in worker_group.workers}

    def _stop_workers(self, worker_group):
        self.calls.append("stop")

    def _monitor_workers(self, worker_group):
        return self.script.pop(0) if self.script else RunResult(state=WorkerState.HEALTHY)

    def _shutdown(self, death_sig=signal.SIGTERM, timeout=30):
        self.calls.append("shutdown")


def _spec(handler, max_restarts=3):
    return WorkerSpec(
        role="trainer",
        local_world_size=2,
        rdzv_handler=handler,
        entrypoint="/bin/true",
        max_restarts=max_restarts,
        monitor_interval=0.01,
        master_addr="127.0.0.1",
        master_port=29999,
    )


FAILED = RunResult(state=WorkerState.FAILED, failures={1: _Failure(local_rank=1, exitcode=3, timestamp=10)})
HEALTHY = RunResult(state=WorkerState.HEALTHY)
SUCCEEDED = RunResult(state=WorkerState.SUCCEEDED, return_values={0: None, 1: None})


def test_failures_restart_until_success(tcp_store):
    handler = RoundStoreHandler(tcp_store)
    agent = ScriptedAgent(_spec(handler, max_restarts=3), [FAILED, HEALTHY, FAILED, SUCCEEDED])
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert handler.rounds == 3
    assert agent._remaining_restarts == 1
    assert agent.started_restart_counts == [0, 1, 2]  # TORCHELASTIC_RESTART_COUNT per attempt
    assert agent.calls == ["start", "stop", "start", "stop", "start", "shutdown"]


def test_no_restarts_left_fails_and_publishes_root_cause(tcp_store):
    handler = RoundStoreHandler(tcp_store)
    agent = ScriptedAgent(_spec(handler, max_restarts=1), [FAILED, FAILED])
    result = agent.run()
    assert result.is_failed() and 1 in result.failures
    assert handler.rounds == 2
    round_store = PrefixStore("round2", tcp_store)
    assert round_store.get("torchelastic/agent/job_failed") == b"0"
    published = json.loads(round_store.get("torchelastic/agent/failure/0"))
    assert (published["rank"], published["exitcode"], published["message"]) == (1, 3, "boom")


def test_waiting_nodes_trigger_restart_without_consuming_restarts(tcp_store):
    handler = RoundStoreHandler(tcp_store, waiting=[0, 1])
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY, HEALTHY, HEALTHY, SUCCEEDED])
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert handler.rounds == 2
    assert agent._remaining_restarts == 0 and agent.started_restart_counts == [0, 0]


def test_job_wide_restart_counter_is_used_and_bumped_once_per_round(tcp_store):
    handler = CountingRoundStoreHandler(tcp_store)
    handler.job_restarts = 5  # e.g. restarts that happened before this node joined
    agent = ScriptedAgent(_spec(handler, max_restarts=10), [FAILED, SUCCEEDED])
    agent.run()
    assert agent.started_restart_counts == [5, 6]
    # a second agent failing in the same round does not bump the counter again
    other = ScriptedAgent(_spec(handler, max_restarts=2), [])
    other._store = PrefixStore("round1", tcp_store)
    assert other._answer(Ask.CLAIM_FAILURE_ROUND) is False  # round 1's failure is already counted
    assert handler.job_restarts == 6


def test_exit_barrier_skipped_when_peer_failed_the_job(tcp_store):
    # two nodes; the peer never reaches the barrier but reported the job failed
    handler = RoundStoreHandler(tcp_store, world_size=2, rank=0)
    agent = ScriptedAgent(_spec(handler), [SUCCEEDED], exit_barrier_timeout=60)
    peer_view = PrefixStore("round1", tcp_store)
    peer_view.set("torchelastic/agent/role_info/1", json.dumps({"role": "trainer", "local_world_size": 2}))
    peer_view.set("torchelastic/agent/job_failed", b"1")
    start = time.monotonic()
    result = agent.run()
    # this node's workers succeeded, but the job failed: never reported as a success (issue 13)
    assert result.state == WorkerState.FAILED
    assert time.monotonic() - start < 10  # not the 60 s barrier timeout
    assert peer_view.add("torchelastic/agent/job_failed_ack", 0) == 1


def test_exit_barrier_waits_for_all_nodes_then_times_out(tcp_store):
    handler = RoundStoreHandler(tcp_store, world_size=2, rank=0)
    agent = ScriptedAgent(_spec(handler), [SUCCEEDED], exit_barrier_timeout=0.5)
    PrefixStore("round1", tcp_store).set(
        "torchelastic/agent/role_info/1", json.dumps({"role": "trainer", "local_world_size": 2})
    )
    start = time.monotonic()
    agent.run()
    assert 0.5 <= time.monotonic() - start < 10


def test_healthy_workers_stopped_when_peer_failed_the_job(tcp_store):
    handler = RoundStoreHandler(tcp_store, world_size=2, rank=1)
    peer_view = PrefixStore("round1", tcp_store)
    peer_view.set("torchelastic/agent/role_info/0", json.dumps({"role": "trainer", "local_world_size": 2}))
    peer_failure = {"rank": 0, "local_rank": 0, "pid": 1, "exitcode": 7, "timestamp": 5, "message": "oom", "host": "h"}
    peer_view.set("torchelastic/agent/failure/0", json.dumps(peer_failure))
    peer_view.set("torchelastic/agent/job_failed", b"0")
    agent = ScriptedAgent(_spec(handler, max_restarts=3), [HEALTHY] * 5)
    result = agent.run()
    assert result.is_failed() and handler.rounds == 1  # no restart: the job is over
    assert agent.get_peer_failures() == {0: peer_failure}


class ParticipantsHandler(RoundStoreHandler):
    """Adds the participants extension: the set shrinks when a peer leaves or is evicted."""

    def __init__(self, store, participants_script):
        super().__init__(store)
        self.participants_script = list(participants_script)
        self.current = self.participants_script[0]

    def get_participants(self):
        if self.participants_script:
            self.current = self.participants_script.pop(0)
        return self.current


def test_lost_peer_triggers_reformation_without_consuming_restarts(tcp_store):
    # the rendezvous reports {a, b}; later b is gone (left or missed its heartbeats)
    handler = ParticipantsHandler(tcp_store, [("a", "b"), ("a", "b"), ("a",), ("a",)])
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY, HEALTHY, HEALTHY, SUCCEEDED])
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert handler.rounds == 2 and agent._remaining_restarts == 0


def test_job_wide_budget_spent_elsewhere_means_no_restart_here(tcp_store):
    # The job already used its one restart (e.g. before this node rejoined): a fresh agent process must not get a
    # fresh budget. A per-process countdown (upstream) would restart here.
    handler = CountingRoundStoreHandler(tcp_store)
    handler.job_restarts = 1
    agent = ScriptedAgent(_spec(handler, max_restarts=1), [FAILED, SUCCEEDED])
    result = agent.run()
    assert result.is_failed()
    assert handler.rounds == 1 and agent.started_restart_counts == [1]
    assert handler.job_restarts == 2  # the failure round was counted


def test_job_wide_budget_allows_restarts_up_to_max(tcp_store):
    handler = CountingRoundStoreHandler(tcp_store)
    agent = ScriptedAgent(_spec(handler, max_restarts=2), [FAILED, FAILED, FAILED])
    result = agent.run()
    assert result.is_failed()
    assert agent.started_restart_counts == [0, 1, 2] and handler.job_restarts == 3


def test_signal_leaves_the_rendezvous_before_stopping_workers(tcp_store):
    import pytest

    from elastic_impl.agent.server.api import AgentSignalError

    class LeavingHandler(RoundStoreHandler):
        def __init__(self, store, calls):
            super().__init__(store)
            self.calls = calls

        def leave(self):
            self.calls.append("leave")

    class SignalledAgent(ScriptedAgent):
        def _monitor_workers(self, worker_group):
            raise AgentSignalError("agent received SIGTERM", signal.SIGTERM)

    calls: list[str] = []
    handler = LeavingHandler(tcp_store, calls)
    agent = SignalledAgent(_spec(handler), [])
    agent.calls = calls
    with pytest.raises(AgentSignalError):
        agent.run()
    # the peers may re-form while this node's workers use their grace; the job is not closed
    assert calls == ["start", "leave", "shutdown"] and not handler.closed


def _peer_in(store, *rounds):
    """Group rank 1 of a 2-node world registered its workers in these rounds' stores."""
    for name in rounds:
        PrefixStore(name, store).set("torchelastic/agent/role_info/1", json.dumps({"role": "trainer", "local_world_size": 2}))


class MovingRoundHandler(RoundStoreHandler):
    """The run moves past this node's round behind its back (it was evicted); optionally the run is closed too."""

    def __init__(self, store, world_size=1, closed=False):
        super().__init__(store, world_size=world_size)
        self.others_rounds = 0  # rounds opened by the other nodes since this node's last rendezvous
        self.closed = closed

    def next_rendezvous(self):
        self.rounds += self.others_rounds
        self.others_rounds = 0
        return super().next_rendezvous()

    def get_round(self):
        return self.rounds + self.others_rounds

    def is_closed(self):
        return self.closed


class EvictedWhileFinishing(ScriptedAgent):
    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.SUCCEEDED and self.calls.count("start") == 1:
            self._rdzv_handler.others_rounds = 1  # re-formed without us while our workers were finishing
        return result


def test_success_in_a_superseded_round_rejoins_instead_of_waiting_at_a_dead_barrier(tcp_store):
    # world_size 2: had the agent gone to round 1's exit barrier it would have waited for a peer that moved on
    handler = MovingRoundHandler(tcp_store, world_size=2)
    agent = EvictedWhileFinishing(_spec(handler, max_restarts=0), [SUCCEEDED, SUCCEEDED], exit_barrier_timeout=0.5)
    agent._rdzv_handler = handler
    _peer_in(tcp_store, "round1", "round3")
    PrefixStore("round3", tcp_store).add("torchelastic/agent/exit_barrier", 1)  # the peer of the new round is done
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert agent.calls.count("start") == 2 and handler.rounds == 3  # rejoined: round 1 -> (2 by others) -> 3
    assert agent._remaining_restarts == 0  # a membership restart, not a failure


def test_success_after_the_job_ended_without_this_node_skips_the_exit_barrier(tcp_store):
    handler = MovingRoundHandler(tcp_store, world_size=2, closed=True)
    agent = EvictedWhileFinishing(_spec(handler), [SUCCEEDED], exit_barrier_timeout=60)
    agent._rdzv_handler = handler
    _peer_in(tcp_store, "round1")
    start = time.monotonic()
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED and handler.rounds == 1
    assert time.monotonic() - start < 10  # not the 60 s barrier timeout


def test_exit_barrier_ends_when_the_run_is_closed(tcp_store):
    handler = MovingRoundHandler(tcp_store, world_size=2)
    agent = ScriptedAgent(_spec(handler), [SUCCEEDED], exit_barrier_timeout=60)
    _peer_in(tcp_store, "round1")

    threading.Timer(1.0, lambda: setattr(handler, "closed", True)).start()  # the peer ended the job
    start = time.monotonic()
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert 1.0 <= time.monotonic() - start < 10


def test_members_read_short_of_the_world_size_count_as_a_membership_change(tcp_store, caplog):
    # the peer left between the round's completion and this node's first read of it: later reads equal that read
    handler = ParticipantsHandler(tcp_store, [(), (), ("a",), ("a",)])
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY, HEALTHY, SUCCEEDED])
    with caplog.at_level(logging.WARNING, logger="elastic_impl.agent.server.api"):
        result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert handler.rounds == 2 and agent._remaining_restarts == 0
    # a restart loses work: its reason is said at the default log level (issue 13: a stalled store restarted a
    # job with nothing printed)
    assert any(r.levelno == logging.WARNING and "membership change" in r.getMessage() for r in caplog.records)


class JoinInfoHandler(RoundStoreHandler):
    """Our handler's extension: the join itself tells the round and the job's restart count. In round 1 the one
    participant disappears after the first poll (world size 1, so the count shows it)."""

    def __init__(self, store):
        super().__init__(store)
        self.participant_reads = 0

    def last_round(self):
        return self.rounds, 7

    def get_participants(self):
        self.participant_reads += 1
        return () if self.rounds == 1 and self.participant_reads > 1 else ("a",)


class NoReadAtJoin(ScriptedAgent):
    def _rendezvous(self, worker_group):
        before = self._rdzv_handler.participant_reads
        super()._rendezvous(worker_group)
        assert self._rdzv_handler.participant_reads == before, "participants read at the rendezvous step"


def test_round_and_restart_count_come_from_the_join_and_members_are_judged_by_count(tcp_store):
    handler = JoinInfoHandler(tcp_store)
    agent = NoReadAtJoin(_spec(handler, max_restarts=0), [HEALTHY] * 6 + [SUCCEEDED])
    agent._rdzv_handler = handler
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert agent.started_restart_counts == [7, 7]  # TORCHELASTIC_RESTART_COUNT from the join, no state read
    assert handler.rounds == 2  # the shrunken membership was noticed by its count


class FlakyStoreHandler(RoundStoreHandler):
    """num_nodes_waiting fails with a store error ``failures`` times (None: forever); heartbeat window 1 s."""

    class settings:  # noqa: N801 - mimics the handler's settings attribute
        heartbeat_expiry_seconds = 1.0

    def __init__(self, store, failures, error_type=None):
        from elastic_impl.rendezvous import RendezvousConnectionError

        super().__init__(store)
        self.failures = failures
        self.error_type = error_type or RendezvousConnectionError

    def num_nodes_waiting(self):
        if self.failures is None or self.failures > 0:
            if self.failures:
                self.failures -= 1
            raise self.error_type("etcd at 127.0.0.1:2379: Connection reset by peer")
        return 0


def test_a_short_store_outage_does_not_stop_healthy_workers(tcp_store):
    handler = FlakyStoreHandler(tcp_store, failures=3)  # e.g. etcd restarting
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY] * 40 + [SUCCEEDED])
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED and handler.failures == 0 and handler.rounds == 1


def test_upstreams_connection_error_is_an_outage_too(tcp_store):
    # The agent also runs with upstream's handlers (conformance), which raise upstream's class, and a backend may
    # raise a subclass: both are ridden out like ours, not taken for the agent's own failure.
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError as UpstreamConnectionError

    class EtcdUnreachable(UpstreamConnectionError):
        pass

    for error_type in (UpstreamConnectionError, EtcdUnreachable):
        handler = FlakyStoreHandler(tcp_store, failures=3, error_type=error_type)
        agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY] * 40 + [SUCCEEDED])
        result = agent.run()
        assert result.state == WorkerState.SUCCEEDED and handler.failures == 0 and handler.rounds == 1


def test_a_store_gone_for_good_ends_the_agent_after_the_heartbeat_window(tcp_store):
    import pytest

    from elastic_impl.rendezvous import RendezvousConnectionError

    handler = FlakyStoreHandler(tcp_store, failures=None)
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY] * 100000)
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="Connection reset"):
        agent.run()
    assert 1.0 <= time.monotonic() - start < 10


def test_upstreams_own_handler_drives_the_agent_without_our_extensions(tcp_store):
    # The agent must run with torch's DynamicRendezvousHandler, which offers none of elastic_impl's extension
    # protocols: restarts then count locally (upstream's countdown) and no membership or window is read.
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    from elastic_impl.rendezvous import extensions

    params = RendezvousParameters("c10d", f"127.0.0.1:{tcp_store.port}", "upstream-handler", 1, 1, last_call_timeout=1)
    handler = create_handler(tcp_store, C10dRendezvousBackend(tcp_store, "upstream-handler"), params)
    offered = [p.__name__ for p in (extensions.LeavingHandler, extensions.RoundReportingHandler,
                                    extensions.RestartCountingHandler) if isinstance(handler, p)]
    assert offered == [] and extensions.detection_window(handler) is None
    agent = ScriptedAgent(_spec(handler, max_restarts=1), [FAILED, SUCCEEDED])
    try:
        result = agent.run()
    finally:
        handler.shutdown()
    assert result.state == WorkerState.SUCCEEDED
    assert agent.started_restart_counts == [0, 1] and agent._remaining_restarts == 0


def test_upstreams_closed_run_is_not_published_as_the_agents_own_failure(tcp_store):
    # With upstream's handlers the run ends with upstream's RendezvousClosedError (a peer ended the job): that is
    # not an error of this agent, so it must not be published as the job's root cause (ours is recognised by type).
    import pytest
    from torch.distributed.elastic.rendezvous import RendezvousClosedError as UpstreamClosed

    handler = FlakyStoreHandler(tcp_store, failures=None, error_type=UpstreamClosed)
    agent = ScriptedAgent(_spec(handler, max_restarts=0), [HEALTHY] * 100)
    published = []
    agent._publish_agent_error = published.append
    with pytest.raises(UpstreamClosed):
        agent.run()
    assert published == []


class WindowReportingHandler(CountingRoundStoreHandler):
    """Also reports its detection window (``extensions.SettingsReportingHandler``), as our rendezvous handler does."""

    def __init__(self, store, window: float, **kwargs):
        super().__init__(store, **kwargs)
        from types import SimpleNamespace

        self.settings = SimpleNamespace(heartbeat_expiry_seconds=window)


def test_the_agents_own_store_calls_are_bounded_when_the_store_goes_silent(tcp_store):
    """A store host gone silent (cut off, hung) must not hang the agent's monitor loop on its own round-store calls:
    unbounded, the peer-failure check hung until the network healed, so the loop never reached the rendezvous calls
    that fail over to a successor (live netns_store_host_isolated ended at world size 3 when the cut landed there),
    and on a store gone for good it would hang forever. Each call is bounded by the handler's detection window."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from elastic_impl.agent.server.decisions import StoreUnavailable
    from fault_injection.network import Partition, TcpProxy

    with TcpProxy(("127.0.0.1", tcp_store.port)) as proxy:
        client = TCPStore(proxy.host, proxy.port, is_master=False, timeout=timedelta(seconds=300), use_libuv=True)
        agent = ScriptedAgent(_spec(WindowReportingHandler(client, window=1.0)), [])
        agent._rendezvous(agent._worker_group)
        assert agent._answer(Ask.PEER_FAILED) is False
        # connections open during the cut stay silent after the heal (TCP's backoff), as with real network cuts
        cut = Partition(proxy, mode="blackhole", resume_lag=120).inject()
        answers: dict = {}

        def ask() -> None:
            started = time.monotonic()
            answers["peer_failed"] = agent._answer(Ask.PEER_FAILED)
            answers["first_took"] = time.monotonic() - started
            started = time.monotonic()
            answers["claim"] = agent._answer(Ask.CLAIM_FAILURE_ROUND)
            answers["second_took"] = time.monotonic() - started

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(timeout=20)
        cut.heal()
        assert not asking.is_alive(), "the agent's round-store call hung on a silent store"
        assert answers["peer_failed"] is False and answers["first_took"] < 5.0, answers
        # still cut: the next call's fresh connection gets no answer either (bounded), an outage to ride out
        assert isinstance(answers["claim"], StoreUnavailable) and answers["second_took"] < 5.0, answers
        # healed: a fresh connection answers though the first one is still stuck (a reconnect attempt opened during
        # the cut is replaced after a few seconds: through this proxy it stays silent like the old connection)
        started = time.monotonic()
        claim = agent._answer(Ask.CLAIM_FAILURE_ROUND)
        while claim is not True and time.monotonic() - started < 15:
            claim = agent._answer(Ask.CLAIM_FAILURE_ROUND)
        assert claim is True and time.monotonic() - started < 10.0
        assert agent._worker_group.store is not agent._store  # workers and users see the store itself
