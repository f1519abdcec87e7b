"""Keyed arrivals: O(1)-sized announcements instead of whole-state rewrites (see the package notes)."""


from __future__ import annotations

import logging

from elastic_impl.events.api import NodeState

from ..api import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousTimeoutError,
)
from .state import (
    _CLAIM_RELEASED,
    _ROUND_DONE,
    RendezvousState,
    StepResult,
)

logger = logging.getLogger("elastic_impl.rendezvous.dynamic_rendezvous")  # one name for the whole package


class KeyedArrivals:
    """The keyed-arrival part of :class:`~.stepper.RendezvousStepper` (a mixin: it uses the stepper's state)."""

    # ------------------------------------------------------------------ keyed arrivals (O(N) bytes per round)
    #
    # With a backend that has keyed storage, a node arriving in an open round does not rewrite the state. Keys of
    # round R (the backend namespaces them by run id): ``gR.n`` arrival counter (atomic add gives each arrival its
    # slot i), ``gR.a<i>`` the node key in slot i ("-": withdrawn), ``gR.h<i>`` the slot's heartbeat, ``gR.dl`` the
    # last-call deadline (first writer wins), ``gR.claim`` who completes the round ("<node>|<time>"; "-": released),
    # ``gR.r<i>`` slot i's result ("<rank>,<world size>,<restart count>" or "wait"); the claim becomes "!" once all results are out.
    # The node whose arrival reaches max_nodes, or any node once the last call ended with min_nodes arrived, claims
    # the round, reads the slots once, applies the same join rules to each live arrival (participant while there is
    # room, else the wait list; ranks by sorted node key), writes the completed state once and publishes the
    # results. Everyone else only reads its own result key. The state of an open round holds no participants, so
    # reading it stays cheap; a claim older than the heartbeat expiry (a completer that died) can be taken over.

    def _keyed(self) -> bool:
        """Whether arrivals go by key: the backend offers keyed storage (``KeyedStorage``) and has it switched on."""
        return self._offers_keys and bool(self.backend.supports_keys())

    @staticmethod
    def _k(round_: int, name: str) -> str:
        return f"g{round_}.{name}"

    def _delete_round_keys(self, round_: int) -> None:
        """Remove an old round's keys (O(N) deletes by the one node that opened a newer round)."""
        k = self._k
        try:
            arrived = self.backend.key_add(k(round_, "n"), 0)
            keys = [k(round_, name) for name in ("n", "dl", "claim")]
            keys += [k(round_, f"{kind}{j}") for j in range(1, arrived + 1) for kind in ("a", "h", "r")]
            self.backend.key_delete_many(keys)
        except RendezvousError as e:  # leftovers cost memory, not correctness
            logger.debug("rendezvous %s: could not delete keys of round %s: %s", self.settings.run_id, round_, e)

    def _withdraw(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self.backend.key_set(self._k(slot[0], f"a{slot[1]}"), b"-")

    def _announce(self, round_: int) -> StepResult:
        self._announce_round = None
        now = self.clock.time()
        try:
            slot = self.backend.key_add(self._k(round_, "n"), 1)
            self.backend.key_set(self._k(round_, f"a{slot}"), self.node.key.encode())
            self.backend.key_set(self._k(round_, f"h{slot}"), repr(now).encode())
        except RendezvousError as e:
            return self._store_failed(e)
        self._slot, self._slot_beat = (round_, slot), self.clock.monotonic()
        self._events = []
        self._note("rdzv.join", f"joined round {round_}")
        self._record_events()
        return self._step_announced()

    def _step_announced(self) -> StepResult:
        assert self._slot is not None
        round_, slot = self._slot
        settings = self.settings
        now, mono = self.clock.time(), self.clock.monotonic()
        self._events = []
        k = self._k
        try:
            mine, claim = self.backend.key_get_many([k(round_, f"r{slot}"), k(round_, "claim")])
            done = claim == _ROUND_DONE
            if mine is not None:
                self._slot = None
                if mine == b"wait":
                    # The round filled up before this node: it is on the wait list now, like a late classic arrival.
                    return StepResult(done=False, wait_until=mono)
                rank, world_size, *restarts = (int(x) for x in mine.split(b","))
                return self._finish_join(round_, rank, world_size, restarts[0] if restarts else None)
            if done:
                # Completed without this node (taken for dead, or arrived too late): start over on the state.
                self._slot = None
                return StepResult(done=False, wait_until=mono)
            if self._join_deadline is not None and now > self._join_deadline:
                arrived = self.backend.key_add(k(round_, "n"), 0)
                self._withdraw()
                error = RendezvousTimeoutError(
                    f"rendezvous run {settings.run_id!r} round {round_} did not complete within the join timeout of "
                    f"{settings.timeout.join.total_seconds()} s ({arrived} of min {settings.min_nodes} nodes joined)"
                )
                self._note("rdzv.error", f"join failed: {error}", NodeState.FAILED)
                self._record_events()
                return StepResult(done=False, error=error)
            if mono - self._slot_beat >= settings.keep_alive_seconds / 2:
                self.backend.key_set(k(round_, f"h{slot}"), repr(now).encode())
                self._slot_beat = mono
            if self._liveness():
                self._beat()
                self._refresh_live()
            claim_live = (claim is not None and claim != _CLAIM_RELEASED
                          and not claim.startswith(self.node.key.encode() + b"|")  # ours: finish the job
                          and self._silent_for(("claim", round_), claim) <= settings.heartbeat_expiry_seconds)
            if claim_live:
                # Someone is completing the round: wait for the results without reading the state (it is about to
                # hold every participant).
                self.seen_version = None
                return StepResult(done=False, wait_until=mono + self.poll_interval)
            got = self._read("join")
        except RendezvousError as e:
            return self._store_failed(e)
        state = RendezvousState.from_bytes(got[0]) if got is not None else RendezvousState()
        self.state = state
        if state.closed:
            try:
                self._withdraw()
            except RendezvousError:
                pass
            return StepResult(done=False, error=RendezvousClosedError(f"rendezvous run {settings.run_id!r} is closed"))
        if state.round != round_ or state.complete:
            # The round is over or was replaced (everyone left and it reopened): start over on the state.
            self._slot = None
            return StepResult(done=False, wait_until=mono)
        try:
            arrived = self.backend.key_add(k(round_, "n"), 0)
            deadline = None
            if arrived >= settings.min_nodes:
                # One call either starts the last call (first node to see min_nodes) or reads when it ends.
                proposed = repr(now + settings.timeout.last_call.total_seconds()).encode()
                deadline = float(self.backend.key_compare_set(k(round_, "dl"), None, proposed))
            if (arrived >= settings.max_nodes or (deadline is not None and now >= deadline)
                    or self._may_be_reformed(round_, arrived, state)):
                return self._try_complete(round_, arrived, claim, state, got, now, mono, deadline)
        except RendezvousError as e:
            return self._store_failed(e)
        poll_until = now + self._next_poll_delay()
        wait_until = min(deadline, poll_until) if deadline is not None else poll_until
        return StepResult(done=False, wait_until=mono + max(0.0, wait_until - now))

    def _try_complete(self, round_, arrived, claim, state, got, now, mono, deadline) -> StepResult:
        settings, k, me = self.settings, self._k, self.node.key
        mine = f"{me}|{now!r}".encode()
        if self.backend.key_compare_set(k(round_, "claim"), claim, mine) != mine:
            return StepResult(done=False, wait_until=mono + self.poll_interval)
        names = [k(round_, f"a{j}") for j in range(1, arrived + 1)]
        beats = [k(round_, f"h{j}") for j in range(1, arrived + 1)]
        values = self.backend.key_get_many(names + beats)
        expiry = settings.heartbeat_expiry_seconds
        slots: dict[str, int] = {}
        suspects = []
        for j in range(arrived):
            name, beat = values[j], values[arrived + j]
            if name is None or name == b"-" or beat is None:
                continue  # not written yet, or withdrawn
            silent, changed = self._observe(("slot", round_, j + 1), beat)
            if silent > expiry and self._may_evict():
                continue  # the same beat for longer than the expiry, on this node's clock: dead
            if (silent > expiry or (not changed and now - float(beat) > expiry)) and name != me.encode():
                # Old by the wall clock but never watched: dead, or alive with a skewed clock. Watch it (at most the
                # expiry) rather than drop a live node or admit a dead one.
                suspects.append(name.decode())
            slots[name.decode()] = j + 1
        if suspects:
            # Keep the claim (a fresh value tells the others this completer is alive) and look again shortly.
            self.backend.key_set(k(round_, "claim"), f"{me}|{self.clock.time()!r}".encode())
            return StepResult(done=False, wait_until=mono + min(self.max_poll_interval, settings.keep_alive_seconds / 4))
        s = state.copy()
        self._evict_dead(s, now)
        for key in sorted(slots, key=slots.get):
            if len(s.participants) < settings.max_nodes:
                s.participants[key] = -1
                if key in s.wait_list:
                    s.wait_list.remove(key)
            elif key not in s.wait_list:
                s.wait_list.append(key)
            s.heartbeats[key] = now
        count = len(s.participants)
        if not (count >= settings.max_nodes or (count >= settings.min_nodes and deadline is not None and now >= deadline)
                or self._reformed(s)):
            # Some arrivals were withdrawn or dead: not enough live nodes yet. Let go and wait for more.
            self.backend.key_set(k(round_, "claim"), _CLAIM_RELEASED)
            return StepResult(done=False, wait_until=mono + self._next_poll_delay())
        self._complete(s)
        written = self.backend.set_state(s.to_bytes(), got[1] if got is not None else None)
        self._cached = None
        self.seen_version = None
        if written is None or not written[2]:
            self.backend.key_set(k(round_, "claim"), _CLAIM_RELEASED)
            return StepResult(done=False, wait_until=mono)
        self.state = s
        self._watch_heartbeats(s)
        for key, j in slots.items():
            rank = s.participants.get(key)
            # "<rank>,<world size>,<restart count>": a node learns its round without reading the O(N) state
            result = f"{rank},{s.world_size},{s.restart_count}".encode()
            self.backend.key_set(k(round_, f"r{j}"), b"wait" if rank is None else result)
        self.backend.key_set(k(round_, "claim"), _ROUND_DONE)
        self._slot = None
        if me not in s.participants:
            return StepResult(done=False, wait_until=mono)
        return self._finish_join(round_, s.participants[me], s.world_size, s.restart_count)

    def _may_be_reformed(self, round_: int, arrived: int, s: RendezvousState) -> bool:
        """Whether the arrivals may be exactly the expected members: worth a claim that reads them (once per
        arrival count and expected count, so a round where that is not the case costs no repeated O(N) reads)."""
        if s.expected is None or arrived < max(len(s.expected), self.settings.min_nodes):
            return False
        attempt = (round_, arrived, len(s.expected))
        if attempt == self._reform_tried:
            return False
        self._reform_tried = attempt
        return True

    def _finish_join(self, round_: int, rank: int, world_size: int, restart_count: int | None) -> StepResult:
        self._slot = None
        self.completed_round = round_
        self.completed_restart_count = restart_count
        self._join_deadline = None
        self._note("rdzv.complete", f"round={round_} rank={rank} world_size={world_size}", NodeState.SUCCEEDED, rank)
        self._record_events()
        return StepResult(done=True, round=round_, rank=rank, world_size=world_size)
