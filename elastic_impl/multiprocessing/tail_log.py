"""TailLog: follow per-rank log files and copy their lines, prefixed, to a destination stream (tee)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TextIO

from elastic_impl.utils.clock import REAL_CLOCK, Clock

logger = logging.getLogger(__name__)

__all__ = ["TailLog", "tail_logfile"]


def tail_logfile(
    header: str,
    file: str,
    dst: TextIO,
    finished: threading.Event,
    interval_sec: float,
    log_line_filter: Callable[[str], bool] | None = None,
    *,
    clock: Clock = REAL_CLOCK,
) -> None:
    """Copy the lines of ``file`` to ``dst``, each prefixed with ``header``, until ``finished`` is set.

    The file may not exist yet (a worker creates it): wait for it, checking every ``interval_sec``, and return
    without writing if ``finished`` is set first. Once it exists, follow it as it grows; after ``finished`` is set,
    copy what is left up to end of file, then return. ``log_line_filter`` (given the line without its newline)
    keeps the lines for which it is true; None keeps every line. A last line without a newline is copied too.
    """
    while not os.path.isfile(file):
        if clock.wait(finished, interval_sec):
            if not os.path.isfile(file):
                return
            break
    partial = ""
    with open(file, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                partial += chunk
                *lines, partial = partial.split("\n")
                for line in lines:
                    if log_line_filter is None or log_line_filter(line):
                        dst.write(f"{header}{line}\n")
                dst.flush()
                continue
            if finished.is_set():
                break
            clock.wait(finished, interval_sec)
    if partial and (log_line_filter is None or log_line_filter(partial)):
        dst.write(f"{header}{partial}\n")
        dst.flush()


class TailLog:
    def __init__(
        self,
        name: str,
        log_files: dict[int, str],
        dst: TextIO,
        log_line_prefixes: dict[int, str] | None = None,
        interval_sec: float = 0.1,
        log_line_filter: Callable[[str], bool] = lambda _: True,
        clock: Clock = REAL_CLOCK,
    ):
        self._name = name
        self._log_files = dict(log_files)
        self._dst = dst
        self._prefixes = {r: (log_line_prefixes or {}).get(r, f"[{name}{r}]:") for r in self._log_files}
        self._interval = interval_sec
        self._line_filter = log_line_filter
        self._clock = clock
        self._stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def start(self) -> TailLog:
        for rank, path in self._log_files.items():
            t = threading.Thread(target=self._tail, args=(path, self._prefixes[rank]), daemon=True,
                                 name=f"tail-{self._name}-{rank}")
            t.start()
            self._threads.append(t)
        return self

    def _tail(self, path: str, prefix: str) -> None:
        try:
            tail_logfile(prefix, path, self._dst, self._stop_event, self._interval, self._line_filter,
                         clock=self._clock)
        except Exception as e:
            logger.error("error tailing %s: %s", path, e)

    def stop(self) -> None:
        # Drain: each thread reads to EOF once more after the stop flag before it exits.
        self._stop_event.set()
        for t in self._threads:
            t.join(timeout=5)
        self._stopped = True

    def stopped(self) -> bool:
        return self._stopped
