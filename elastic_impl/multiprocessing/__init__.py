"""Process runtime: start worker groups, redirect/tee their output, report failures, stop them with no orphans.

Drop-in for ``torch.distributed.elastic.multiprocessing``.
"""

from elastic_impl.multiprocessing.api import (
    DefaultLogsSpecs,
    LogsDest,
    LogsSpecs,
    MultiprocessContext,
    PContext,
    ProcessFailure,
    RunProcsResult,
    SignalException,
    Std,
    SubprocessContext,
    start_processes,
    to_map,
)
from elastic_impl.multiprocessing.errors import ChildFailedError, ErrorHandler, record
from elastic_impl.utils.logging import get_logger  # noqa: F401 -- upstream exposes it here

__all__ = [
    "ChildFailedError", "DefaultLogsSpecs", "ErrorHandler", "LogsDest", "LogsSpecs", "MultiprocessContext",
    "PContext", "ProcessFailure", "RunProcsResult", "SignalException", "Std", "SubprocessContext", "record",
    "start_processes", "to_map",
]
