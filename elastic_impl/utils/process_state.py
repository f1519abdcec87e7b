"""Linux process state as ``/proc/<pid>/stat`` reports it, and whether it is uninterruptible sleep (D).

Used by the local agent to notice a worker stuck in the kernel (e.g. a hung device driver or NFS read), which no
signal can interrupt.
"""

from __future__ import annotations

from elastic_impl.utils.proc_tree import read_stat

__all__ = ["read_proc_state", "is_uninterruptible_state"]


def read_proc_state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` ('R', 'S', 'D', 'Z', ...), or None when it cannot be read.

    None covers: not Linux, no such process, no permission, or a malformed stat line.
    """
    stat = read_stat(pid)
    return stat.state if stat is not None else None


def is_uninterruptible_state(state: str | None) -> bool:
    """Whether ``state`` (as :func:`read_proc_state` returns it) is uninterruptible sleep: it starts with 'D'."""
    return state is not None and state.startswith("D")
