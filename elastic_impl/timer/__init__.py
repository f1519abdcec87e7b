"""Expiration timers: ``expires(after)`` blocks whose worker is reaped by a server if they overrun.

Servers: :class:`LocalTimerServer` (multiprocessing queue) and :class:`FileTimerServer` (named pipe).
Extensions for the simulator / fault injector: ``TimerServer.run_once()``, ``TimerServer.expire_timer(...)`` and
``set_clock(clock)`` (see :mod:`elastic_impl.timer.api`).
"""

from elastic_impl.timer.api import (  # noqa: F401
    RequestQueue,
    TimerClient,
    TimerRequest,
    TimerServer,
    configure,
    expires,
    get_clock,
    set_clock,
)
from elastic_impl.timer.file_based_local_timer import (  # noqa: F401
    FileTimerClient,
    FileTimerRequest,
    FileTimerServer,
)
from elastic_impl.timer.local_timer import LocalTimerClient, LocalTimerServer  # noqa: F401
