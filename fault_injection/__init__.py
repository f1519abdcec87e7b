"""The nemesis: faults with inject + heal (processes, network proxy, store, timers, clock).

Every fault is an object with ``inject()``, ``heal()`` (the clean undo; a no-op for instant faults such as a SIGKILL)
and a record that it fired (``fault_start``/``fault_end`` to an ``on_event`` callback and to ``fault.records``).

==================  ==========================================  =========================================
fault               module / class                              heal
==================  ==========================================  =========================================
kill_worker         processes.KillWorker (SIGKILL a pid)         instant (the agent restarts the worker)
kill_agent          processes.KillAgent (agent + descendants)    instant
pause_agent         processes.PauseAgent (SIGSTOP)               SIGCONT
partition           network.Partition (blackhole / drop)         forward again
delay               network.Delay (latency on the proxy)         latency back to before
restart_store       store.RestartStore                          store back (at once or when healed)
freeze_store        store.FreezeStore (SIGSTOP the store)        SIGCONT
kill_store_leader   store.KillStoreLeader (etcd cluster leader)  the member starts again and rejoins
expire_timer        timers.ExpireTimer (FileTimerServer)         instant (the worker is reaped)
clock_skew          clock.ClockSkew (agent's time.time())        previous offset
heartbeat_delay     clock.HeartbeatDelay (SIGSTOP duty cycle)    runs freely
==================  ==========================================  =========================================
"""

from fault_injection.base import Fault, FaultError  # noqa: F401
from fault_injection.clock import ClockSkew, HeartbeatDelay  # noqa: F401
from fault_injection.network import Delay, Partition, TcpProxy  # noqa: F401
from fault_injection.processes import KillAgent, KillWorker, PauseAgent  # noqa: F401
from fault_injection.store import (  # noqa: F401
    EtcdCluster,
    EtcdStoreServer,
    FreezeStore,
    KillStoreLeader,
    RestartStore,
    TCPStoreServer,
)
from fault_injection.timers import ExpireTimer, WorkerTimerServer  # noqa: F401
