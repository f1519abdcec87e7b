"""Agent server: the generic agent API and the local (process-based) agent.

Mirrors ``torch.distributed.elastic.agent.server``.
"""

from elastic_impl.agent.server.api import (
    ElasticAgent,
    RunResult,
    SimpleElasticAgent,
    Worker,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)

__all__ = [
    "ElasticAgent",
    "RunResult",
    "SimpleElasticAgent",
    "Worker",
    "WorkerGroup",
    "WorkerSpec",
    "WorkerState",
    "LocalElasticAgent",
    "TORCHELASTIC_ENABLE_FILE_TIMER",
    "TORCHELASTIC_TIMER_FILE",
]

TORCHELASTIC_ENABLE_FILE_TIMER = "TORCHELASTIC_ENABLE_FILE_TIMER"
TORCHELASTIC_TIMER_FILE = "TORCHELASTIC_TIMER_FILE"


def __getattr__(name: str):
    # LocalElasticAgent pulls in elastic_impl.multiprocessing; import it only when asked for so that the
    # plain data types above stay importable on their own.
    if name == "LocalElasticAgent":
        from elastic_impl.agent.server.local_elastic_agent import LocalElasticAgent

        return LocalElasticAgent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
