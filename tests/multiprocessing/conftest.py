import os
import signal

import pytest

from elastic_impl.multiprocessing.api import _group_members, _proc_table


def descendants_of_us() -> set[int]:
    """Live descendants of this test process (from /proc)."""
    table = _proc_table()
    me = os.getpid()
    out: set[int] = set()
    changed = True
    while changed:
        changed = False
        for p, (ppid, _) in table.items():
            if (ppid == me or ppid in out) and p not in out:
                out.add(p)
                changed = True
    return out


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
