"""TailLog: follow per-rank log files and copy their lines, prefixed, to a destination stream (tee)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TextIO

from elastic_impl.utils.clock import REAL_CLOCK, Clock

logger = logging.getLogger(__name__)

__all__ = ["TailLog"]


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
        # The worker may not have created its file yet; wait for it, but never past stop().
        while not os.path.isfile(path):
            if self._clock.wait(self._stop_event, self._interval):
                if not os.path.isfile(path):
                    return
                break
        partial = ""
        try:
            with open(path, errors="replace") as f:
                while True:
                    chunk = f.read()
                    if chunk:
                        partial += chunk
                        *lines, partial = partial.split("\n")
                        for line in lines:
                            if self._line_filter(line):
                                self._dst.write(f"{prefix}{line}\n")
                        self._dst.flush()
                        continue
                    if self._stop_event.is_set():
                        break
                    self._clock.wait(self._stop_event, self._interval)
        except Exception as e:
            logger.error("error tailing %s: %s", path, e)
        if partial:
            self._dst.write(f"{prefix}{partial}\n")
            self._dst.flush()

    def stop(self) -> None:
        # Drain: each thread reads to EOF once more after the stop flag before it exits.
        self._stop_event.set()
        for t in self._threads:
            t.join(timeout=5)
        self._stopped = True

    def stopped(self) -> bool:
        return self._stopped
