"""Worker entrypoints for the tests (module level so the spawn start method can import them)."""

import os
import sys
import time

from elastic_impl.multiprocessing.errors import record


def echo_double(x):
    print(f"out-{x}")
    print(f"err-{x}", file=sys.stderr)
    return x * 2


def raise_on(rank_to_fail, x):
    if x == rank_to_fail:
        raise RuntimeError(f"worker {x} failed on purpose")
    time.sleep(60)


@record
def raise_recorded(msg):
    raise ValueError(msg)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def sleep_forever():
    time.sleep(600)


def env_value(name):
    return os.environ.get(name)
