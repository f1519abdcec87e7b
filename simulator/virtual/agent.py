"""A simulated elastic agent on virtual time: the real agent's decisions over simulated processes and store.

What is real: the rendezvous protocol (:class:`~elastic_impl.rendezvous.dynamic_rendezvous.RendezvousStepper`
stepping over the simulated store) and every decision of the agent's run loop
(:class:`~elastic_impl.agent.server.decisions.AgentStepper`, the one ``SimpleElasticAgent`` runs: restart or fail,
the job-wide restart budget, membership re-forms, the peer-failure and exit-barrier outcomes). What is simulated:
worker processes (they "train" as timed events and fail when the nemesis says), the agent's answers to the
stepper's asks (from the simulated store, including the round's agent keys), the rendezvous handler's blocking
loops (join retries, the keep-alive thread) as scheduled callbacks, and the launcher's closing of the run when
the agent's run ends. The exit barrier does not wait: the simulated job ends on every member of a round at once.

The join's ride-out of a store outage is the handler's own policy (:class:`JoinOutageRideOut`, with the live
default budget: the store liveness bound). A store call that would hang (a silently cut node, see
simulator/virtual/store.py) suspends what made it -- a join step, a heartbeat, or the agent's decision in the middle
of its asks -- until the call returns, as the blocked thread is in a live agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from elastic_impl.agent.server.decisions import Action, AgentStepper, Ask, Decision, StoreUnavailable
from elastic_impl.rendezvous.api import RendezvousClosedError, RendezvousConnectionError
from elastic_impl.rendezvous.dynamic_rendezvous import (
    NodeDesc,
    RendezvousStepper,
    StepResult,
    num_nodes_waiting_in,
)
from elastic_impl.rendezvous.dynamic_rendezvous.outage import JoinOutageRideOut

from .. import history as h
from .clock import NodeClock

if TYPE_CHECKING:
    from collections.abc import Generator

    from .sim import Simulation

# Worker states.
RUNNING, FAILED, STOPPED, SUCCEEDED = "running", "failed", "stopped", "succeeded"
# Retries of one store step that lost a compare-and-set in the same instant (the stepper decides on the winner's
# state right away, so more than a couple means heavy contention).
_IMMEDIATE_RETRIES = 8
_PID_BASE = 10_000
# Wake-up lateness of the keep-alive thread, as a fraction of its interval (uniform, seeded).
KEEP_ALIVE_JITTER = 0.05
# Which store each decision ask calls, as the live agent answers it: the round's own store (the agent's own connection,
# each call bounded by the detection window), the rendezvous backend (bounded by the store liveness bound), or none
# (the answer reuses the read just made).
_ROUND_STORE_ASKS = frozenset({Ask.PEER_FAILED, Ask.EXIT_BARRIER, Ask.CLAIM_FAILURE_ROUND})
_NO_CALL_ASKS = frozenset({Ask.PARTICIPANTS, Ask.RUN_CLOSED})


def node_name_of(key: str) -> str:
    """Node name from a stepper node key (``<addr>_<pid>_<local_id>``, addr being the node name)."""
    return key.rsplit("_", 2)[0]


class SimAgent:
    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.name = f"node{index}"
        self.clock = NodeClock(sim.clock)
        self.backend = sim.store.client(self.name)
        self.node = NodeDesc(self.name, _PID_BASE + index, 0)
        self.stepper = RendezvousStepper(self.backend, sim.settings, self.node, self.clock)
        self.status = "new"  # new | joining | running | exited
        self.exit_state: str | None = None
        self.paused = False
        # The real agent's decisions (restart, re-form, exit barrier, fail, the restart budget); this class only
        # answers what they ask, from the simulated store, and acts them out on simulated processes.
        self.decisions = AgentStepper(sim.scenario.max_restarts, sim.scenario.timeouts.monitor,
                                      store_outage_window=sim.settings.heartbeat_expiry_seconds)
        self.workers: dict[int, str] = {}
        self.worker_fail_reason: dict[int, str] = {}
        # Failed local ranks already in the history (a failure waiting to be counted is decided on again later).
        self._failures_recorded: set[int] = set()
        self.round: int | None = None
        self.rank: int | None = None
        self.world_size: int | None = None
        self.succeeded = False
        self.keep_alive_on = False
        # The running join's ride-out of store outages (the handler's policy and budget).
        self._join_outage = JoinOutageRideOut(sim.settings, self.node, sim.store_liveness_timeout)
        # Bumped to cancel the callbacks of the previous phase (main loop) or of the heartbeat loop.
        self._epoch = 0
        self._ka_epoch = 0

    # ------------------------------------------------------------------ plumbing

    @property
    def alive(self) -> bool:
        return self.status != "exited"

    @property
    def now(self) -> float:
        return self.sim.clock.now

    def _record(self, event: str, **fields) -> None:
        self.sim.history.record(self.now, self.name, event, **fields)

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        self.sim.clock.after(delay, self._fire, self._epoch, fn)

    def _fire(self, epoch: int, fn: Callable[[], None]) -> None:
        if self.status == "exited" or epoch != self._epoch or self.paused:
            return  # cancelled, dead, or paused (resume re-arms)
        fn()

    def _arm_keep_alive(self) -> None:
        # A real keep-alive thread wakes a little late, by scheduling noise; without it nodes that completed a round
        # together would heartbeat in exact lockstep forever and collide on every compare-and-set.
        interval = self.sim.settings.keep_alive_seconds
        late = self.sim.rng.uniform(0.0, KEEP_ALIVE_JITTER * interval)
        self.sim.clock.after(interval + late, self._fire_keep_alive, self._ka_epoch)

    def _fire_keep_alive(self, epoch: int, give_up: float | None = None) -> None:
        if self.status == "exited" or epoch != self._ka_epoch or self.paused:
            return
        if self.sim.store.hold(self.name, lambda: self._fire_keep_alive(epoch, give_up)):
            return  # the beat's store call hangs: the keep-alive thread is stuck in it until it returns
        now = self.sim.clock.now
        if give_up is None:
            give_up = now + self.sim.settings.keep_alive_seconds
        result = self.stepper.step("keep_alive")  # errors: a missed beat, like the real keep-alive thread logs
        if result.error is None and not result.done and now < give_up:
            # Lost its compare-and-set: the real keep-alive loop retries on the winner's state within the interval.
            retry_at = min(result.wait_until if result.wait_until is not None else now, give_up)
            self.sim.clock.after(max(0.0, retry_at - now), lambda: self._fire_keep_alive(epoch, give_up))
            return
        self._arm_keep_alive()

    def _step_until_done(self, op: str) -> StepResult:
        result = StepResult(done=False)
        for _ in range(_IMMEDIATE_RETRIES):
            result = self.stepper.step(op)
            if result.done or result.error is not None:
                return result
        return result

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._record(h.AGENT_START, state="INIT")
        self._begin_join()

    def _begin_join(self) -> None:
        self.status = "joining"
        self._epoch += 1
        self._record(h.RDZV_JOIN, round=self.stepper.state.round if self.round is not None else None)
        self.stepper.begin_join()
        self._join_outage = JoinOutageRideOut(self.sim.settings, self.node, self.sim.store_liveness_timeout)
        self._arm(0.0, self._join_step)

    def _when_store_answers(self, call: Callable[[], None], connection: str = "rendezvous") -> bool:
        """Whether ``call`` (about to make a store call on ``connection``: ``rendezvous`` or ``round``) must wait for a
        blocked call to return; if so it runs then, unless this phase was cancelled (see SimStore.hold)."""
        epoch = self._epoch
        return self.sim.store.hold(self.name, lambda: self._fire(epoch, call), connection)

    def _join_step(self) -> None:
        if self._when_store_answers(self._join_step):
            return
        result = self.stepper.step("join")
        if result.error is not None:
            self._on_store_step_error(result.error, self._join_step)
            return
        self._join_outage.answered(self.clock.monotonic())
        if result.done:
            self._on_round(result)
            return
        wait = (result.wait_until if result.wait_until is not None else self.now) - self.now
        self._arm(max(wait, self.sim.store.round_trip(self.name)), self._join_step)

    def _on_store_step_error(self, error: Exception, retry: Callable[[], None]) -> None:
        if isinstance(error, RendezvousClosedError):
            self._stop_workers(-15)
            self._exit("CLOSED", reason="rendezvous closed")
            return
        if isinstance(error, RendezvousConnectionError):
            try:
                wait = self._join_outage.failed(error, self.clock.monotonic())
            except RendezvousConnectionError as gave_up:  # the store did not answer for the whole budget
                error = gave_up
            else:
                self._arm(max(wait, self.sim.store.round_trip(self.name)), retry)
                return
        self._stop_workers(-15)  # the agent's shutdown stops its workers whatever ended it
        self._exit("FAILED", reason=f"{type(error).__name__}: {error}")

    def _on_round(self, result: StepResult) -> None:
        self.round, self.rank, self.world_size = result.round, result.rank, result.world_size
        # Read the run's state (participants) after the round. The real agent does not (its join hands it the round,
        # world size and restart count); the virtual one still does by default because the checker wants each
        # round's participant list in the history. Scale runs switch it off.
        synced = self.stepper.step("sync") if self.sim.post_round_sync else StepResult(done=True)
        state = self.stepper.state
        restart_count = self.stepper.completed_restart_count
        if restart_count is None and synced.error is None:
            restart_count = state.restart_count
        # As the real agent with our handler: the join told the round, so a participant change shows in the count.
        self.decisions.joined(self.round, self.world_size, restart_count, members=None, members_by_count=True)
        participants = None
        if self.sim.record_participants and synced.error is None and state.round == self.round and state.complete:
            # O(N log N) per node: scale runs switch it off.
            by_rank = sorted(state.participants.items(), key=lambda kv: kv[1])
            participants = [node_name_of(k) for k, _ in by_rank]
        self._record(
            h.RDZV_COMPLETE, round=self.round, rank=self.rank, world_size=self.world_size,
            detail=self._round_detail(participants),
        )
        wpn = self.sim.scenario.workers_per_node
        self.workers = {lr: RUNNING for lr in range(wpn)}
        self.worker_fail_reason = {}
        self._failures_recorded = set()
        for lr in range(wpn):
            self._record(
                h.WORKER_START, round=self.round, rank=self.rank * wpn + lr, world_size=self.world_size * wpn,
                detail={"local_rank": lr, "restart_count": self.decisions.restart_count},
            )
        self.status = "running"
        self._epoch += 1
        if not self.keep_alive_on:
            self.keep_alive_on = True
            self._arm_keep_alive()
        self.sim.round_started(self, self.round, participants if participants is not None else state.participants)
        self._arm(self.sim.scenario.timeouts.monitor, self._monitor)

    def _round_detail(self, participants: list[str] | None) -> dict:
        if participants is None:
            return {}
        if len(participants) == self.world_size:
            return {"participants": participants}
        # Some participants left (or were evicted) after the round completed and before this node read it: the state
        # no longer lists the whole round, so only the count is known.
        return {"participants_left": (self.world_size or 0) - len(participants)}

    def _stop_workers(self, exitcode: int) -> None:
        for lr, st in self.workers.items():
            if st in (RUNNING, FAILED):
                code = -9 if st == FAILED else exitcode
                self._record(h.WORKER_EXIT, round=self.round, rank=(self.rank or 0) * len(self.workers) + lr,
                             detail={"local_rank": lr, "exitcode": code})
                self.workers[lr] = STOPPED

    def _monitor(self) -> None:
        """One monitor tick: the real agent's decision (AgentStepper) on the simulated workers' state."""
        failed = [lr for lr, st in self.workers.items() if st == FAILED]
        wpn = len(self.workers)
        for lr in failed:
            if lr in self._failures_recorded:
                continue
            self._failures_recorded.add(lr)
            self._record(h.WORKER_FAILED, round=self.round, rank=(self.rank or 0) * wpn + lr, state="FAILED",
                         detail={"local_rank": lr, "exitcode": -9, "reason": self.worker_fail_reason.get(lr, "SIGKILL")})
        if failed:
            self.sim.break_round(self.round)
        workers = "FAILED" if failed else "SUCCEEDED" if self.succeeded else "HEALTHY"
        self._decide(self.decisions.decide(workers, self.clock))

    def _decide(self, decision: Generator[Ask, object, Decision], reply: object = None) -> None:
        """Answer the decision's asks until it is made; an ask whose store call hangs suspends it until the call
        returns (the live agent's thread is blocked in that call meanwhile: no monitor ticks)."""
        try:
            while True:
                ask = decision.send(reply)
                if ask not in _NO_CALL_ASKS and self._when_store_answers(
                        lambda ask=ask: self._decide(decision, self._answer(ask)),
                        connection="round" if ask in _ROUND_STORE_ASKS else "rendezvous"):
                    return
                reply = self._answer(ask)
        except StopIteration as made:
            self._act(made.value)

    def _act(self, decision: Decision) -> None:
        """Carry out one monitor decision of the agent stepper."""
        action = decision.action
        if action == Action.KEEP_RUNNING:
            self._arm(self.sim.scenario.timeouts.monitor, self._monitor)
        elif action == Action.RETRY_LATER:
            self._arm(decision.retry_in, self._monitor)
        elif action in (Action.RESTART, Action.REFORM):
            kind = "worker_failed" if action == Action.RESTART else "membership"
            failed = [lr for lr, st in self.workers.items() if st == FAILED]
            why = f"local rank(s) {failed} failed" if action == Action.RESTART else decision.reason
            self._restart(kind, why, decision.restart_count)
        elif action == Action.SUCCEED:
            self._succeed()
        elif action == Action.STORE_LOST:
            self._stop_workers(-15)
            self._exit("FAILED", reason=f"{type(decision.error).__name__}: {decision.error}")
        else:  # FAIL (this node ends the job) or PEER_FAILED_JOB (another node did)
            self._stop_workers(-15)
            reason = f"{self.name}: {decision.reason}"
            if action == Action.FAIL:
                self.sim.job_failed(reason)
                self._round_store("set", "job_failed", str(self.rank).encode())  # tells the round's peers
            # The launcher closes the run once the agent's run returned (the job ended).
            self._step_until_done("close")
            self._exit("FAILED", reason=reason, restarts_exhausted=action == Action.FAIL)

    # ------------------------------------------------------------------ answers to the agent stepper's asks

    def _round_store(self, op: str, key: str, value: bytes = b"") -> bytes | int | None:
        """The round's agent keys (like the real agent's per-round store namespace) in the simulated store."""
        full = f"torchelastic/agent/round{self.round}/{key}"
        if op == "add":
            return self.sim.store.key_add(self.name, full, 1)
        if op == "set":
            try:
                self.sim.store.key_set(self.name, full, value)
            except RendezvousConnectionError:
                pass  # like the real agent: the peers then learn of it when they next rendezvous (closed run)
            return None
        return self.sim.store.key_get_many(self.name, [full])[0]

    def _synced_state(self):
        """The run's state as a plain read shows it now (None: the store could not be read)."""
        result = self.stepper.step("sync")
        return None if result.error is not None else self.stepper.state

    def _answer(self, ask: Ask):
        if ask in (Ask.PEER_FAILED, Ask.EXIT_BARRIER):
            # The simulated job ends on every member of a round at once, so the exit barrier has nothing to wait
            # for; what is left of it is whether a peer failed the job.
            try:
                return self._round_store("get", "job_failed") is not None
            except RendezvousConnectionError:
                return False
        # PARTICIPANTS and RUN_CLOSED come right after NODES_WAITING and CURRENT_ROUND, whose read they reuse (the
        # real handler reads again; one read per monitor tick keeps thousand-node runs affordable).
        if ask == Ask.PARTICIPANTS:
            return tuple(self.stepper.state.participants)
        if ask == Ask.RUN_CLOSED:
            return self.stepper.state.closed
        if ask in (Ask.CURRENT_ROUND, Ask.RESTART_COUNT_ABOVE):
            state = self._synced_state()
            if state is None:
                return None
            return state.round if ask == Ask.CURRENT_ROUND else state.restart_count
        if ask == Ask.NODES_WAITING:
            result = self.stepper.step("sync")
            if result.error is not None:
                return StoreUnavailable(result.error)
            return num_nodes_waiting_in(self.stepper.state, self.sim.settings, self.stepper.completed_round)
        if ask == Ask.CLAIM_FAILURE_ROUND:
            try:
                return self._round_store("add", "restart_bump") == 1
            except RendezvousConnectionError as e:
                return StoreUnavailable(e)
        if ask == Ask.INCREMENT_RESTART_COUNT:
            result = self._step_until_done("increment_restart_count")
            if result.error is not None:
                return StoreUnavailable(result.error)
            if not result.done:
                return StoreUnavailable(RendezvousConnectionError(
                    f"{self.name} lost {_IMMEDIATE_RETRIES} compare-and-sets in a row incrementing the restart count"))
            return self.stepper.state.restart_count
        raise ValueError(f"unknown decision ask: {ask!r}")

    def _restart(self, kind: str, why: str, restart_count: int | None) -> None:
        self._record(h.RESTART, round=self.round, detail={"restart_count": restart_count, "reason": kind, "why": why})
        self._stop_workers(-15)
        self.sim.break_round(self.round)
        self._begin_join()

    def _succeed(self) -> None:
        for lr in self.workers:
            self._record(h.WORKER_EXIT, round=self.round, rank=(self.rank or 0) * len(self.workers) + lr,
                         detail={"local_rank": lr, "exitcode": 0})
            self.workers[lr] = SUCCEEDED
        self.sim.job_succeeded()
        # The launcher closes the run once the job ended, so waiting nodes stop too.
        self._step_until_done("close")
        self._exit("SUCCEEDED")

    def _exit(self, state: str, reason: str | None = None, restarts_exhausted: bool = False) -> None:
        if self.status == "exited":
            return
        self.status = "exited"
        self.exit_state = state
        detail: dict = {"reason": reason} if reason else {}
        if restarts_exhausted:
            detail["restarts_exhausted"] = True
        self._record(h.AGENT_EXIT, state=state, detail=detail)
        self.sim.agent_exited(self)

    # ------------------------------------------------------------------ faults (the nemesis calls these)

    def kill_worker(self, local_rank: int, reason: str) -> bool:
        if self.status != "running" or self.workers.get(local_rank) != RUNNING:
            return False
        self.workers[local_rank] = FAILED
        self.worker_fail_reason[local_rank] = reason
        self.sim.break_round(self.round)  # its peers' collectives stall from here on
        return True

    def kill(self) -> bool:
        """SIGKILL the agent: its workers die with it (process-group kill), heartbeats stop, nothing is cleaned up
        in the store."""
        if not self.alive:
            return False
        self._stop_workers(-9)
        if self.status == "running":
            self.sim.break_round(self.round)
        self._exit("KILLED", reason="SIGKILL")
        return True

    def pause(self) -> bool:
        if not self.alive or self.paused:
            return False
        self.paused = True
        return True

    def resume(self) -> bool:
        if not self.alive or not self.paused:
            return False
        self.paused = False
        self._epoch += 1
        self._ka_epoch += 1
        if self.status == "joining":
            self._arm(0.0, self._join_step)
        elif self.status == "running":
            self._arm(0.0, self._monitor)
        if self.keep_alive_on:
            self._fire_keep_alive(self._ka_epoch)
        return True

    def leave(self) -> bool:
        """SIGTERM: stop the workers, leave the rendezvous (survivors re-form), exit."""
        if not self.alive:
            return False
        self._stop_workers(-15)
        if self.status == "running":
            self.sim.break_round(self.round)
        self._step_until_done("leave")
        self._exit("LEFT", reason="SIGTERM")
        return True

    def tear_down(self) -> None:
        self._stop_workers(-15)
        self._exit("TORN_DOWN", reason="simulation ended")
