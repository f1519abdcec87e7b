"""What every fault has in common: ``inject()``, ``heal()`` (the clean undo) and a record that it fired.

A fault reports ``fault_start`` when injected and ``fault_end`` when healed, to an optional ``on_event(name, detail)``
callback (the simulator turns these into history records) and to its own :attr:`Fault.records`. Instant faults
(a SIGKILL cannot be undone) report both at ``inject()``; their ``heal()`` is a no-op.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Fault", "FaultError", "EventCallback"]

EventCallback = Callable[[str, dict[str, Any]], None]


class FaultError(RuntimeError):
    """A fault could not be injected or healed (the message names the fault and its target)."""


class Fault:
    """Base class: subclasses set :attr:`kind`, implement ``_inject`` (and ``_heal`` unless :attr:`instant`)."""

    kind: str = "fault"
    instant: bool = False

    def __init__(self, on_event: EventCallback | None = None, **args: Any) -> None:
        self.args: dict[str, Any] = dict(args)
        self.on_event = on_event
        # (time.time(), "fault_start" | "fault_end", detail): proof that the fault fired, kept even without a callback
        self.records: list[tuple[float, str, dict[str, Any]]] = []
        self._active = False
        self._lock = threading.Lock()
        self.result: Any = None  # what the injection found/did (e.g. the pids it killed)

    @property
    def active(self) -> bool:
        return self._active

    def describe(self) -> dict[str, Any]:
        """``{"fault": kind, **args}``: what the history records for this fault."""
        return {"fault": self.kind, **{k: v for k, v in self.args.items() if v is not None}}

    def _emit(self, name: str, **extra: Any) -> None:
        detail = self.describe()
        detail.update(extra)
        self.records.append((time.time(), name, detail))
        if self.on_event is not None:
            self.on_event(name, detail)

    def inject(self) -> Fault:
        with self._lock:
            if self._active:
                raise FaultError(f"{self.kind} {self.args} is already injected")
            self.result = self._inject()
            extra = self._result_detail()
            self._emit("fault_start", **extra)
            if self.instant:
                self._emit("fault_end")
            else:
                self._active = True
        return self

    def heal(self) -> None:
        """Undo the fault; healing a fault that is not active does nothing."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            self._heal()
            self._emit("fault_end")

    def _inject(self) -> Any:
        raise NotImplementedError

    def _heal(self) -> None:
        pass

    def _result_detail(self) -> dict[str, Any]:
        return {}

    def __enter__(self) -> Fault:
        return self.inject()

    def __exit__(self, *exc: Any) -> None:
        self.heal()

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"{type(self).__name__}({self.args}, {state})"
