import os
import signal

import pytest

from elastic_impl.multiprocessing.api import _group_members, guardian_pid
from elastic_impl.utils.proc_tree import descendants


def descendants_of_us() -> set[int]:
    """Live descendants of this test process (from /proc), but its guardian: a process of the runtime that lives as
    long as this one (elastic_impl/multiprocessing/_guardian.py), never a worker's."""
    return set(descendants(os.getpid())) - {guardian_pid()}


@pytest.fixture
def contexts():
    """Collects started PContexts; the finalizer closes them all and kills anything they left."""
    started = []
    yield started
    for pc in started:
        roots = set(pc.pids().values())
        pc.close(timeout=2)
        for p in _group_members(roots):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
