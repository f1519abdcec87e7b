"""Virtual-time mode: the real rendezvous state machine (``RendezvousStepper``) and the real agent's decisions
(``AgentStepper``) on a virtual clock, over a simulated store with latency, loss and partitions and simulated worker
processes. Deterministic per seed."""

from .clock import EPOCH, NodeClock, VirtualClock
from .sim import SimResult, Simulation, rendezvous_scenario, run_rendezvous_round, run_virtual
from .store import SimStore, SimStoreClient

__all__ = [
    "EPOCH",
    "NodeClock",
    "SimResult",
    "SimStore",
    "SimStoreClient",
    "Simulation",
    "VirtualClock",
    "rendezvous_scenario",
    "run_rendezvous_round",
    "run_virtual",
]
