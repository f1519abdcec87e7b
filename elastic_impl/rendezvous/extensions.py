"""What a rendezvous handler may offer beyond upstream's ``RendezvousHandler``, declared as protocols.

The agent and the launcher work with any ``RendezvousHandler`` (upstream's, a third party's, ours); where a handler
offers one of these capabilities they use it, else they fall back to upstream's behaviour. Each capability is its
own protocol, so a handler can offer any subset: ``isinstance(handler, LeavingHandler)`` says whether it has the
members (``runtime_checkable`` checks presence, not signatures). ``DynamicRendezvousHandler`` offers all of them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "LeavingHandler",
    "LivenessSettings",
    "RestartCountingHandler",
    "RoundReportingHandler",
    "SettingsReportingHandler",
    "detection_window",
]


@runtime_checkable
class LeavingHandler(Protocol):
    """This node can go away while the job goes on (upstream has only ``shutdown()``, which ends the run)."""

    def leave(self) -> bool:
        """Leave the run without closing it; return whether the store took it."""
        ...


@runtime_checkable
class RoundReportingHandler(Protocol):
    """The handler tells which round the run is in and who is in it, so an agent notices a peer that left or died."""

    def get_round(self) -> int:
        """The run's current round number."""
        ...

    def last_round(self) -> tuple[int, int | None] | None:
        """(round, job-wide restart count) of this node's last completed rendezvous; None before any."""
        ...

    def get_participants(self) -> list[str]:
        """Keys of the current round's participants."""
        ...


@runtime_checkable
class RestartCountingHandler(Protocol):
    """A job-wide restart counter kept in the rendezvous state, the same on every node."""

    def get_restart_count(self) -> int:
        ...

    def increment_restart_count(self) -> int:
        """Add one atomically; return the new count."""
        ...


@runtime_checkable
class LivenessSettings(Protocol):
    """Settings that say how long a silent node lives on (heartbeat interval x missed heartbeats)."""

    @property
    def heartbeat_expiry_seconds(self) -> float:
        ...


@runtime_checkable
class SettingsReportingHandler(Protocol):
    """The handler shows its settings (``DynamicRendezvousHandler.settings``)."""

    @property
    def settings(self) -> object:
        ...


def detection_window(handler: object) -> float | None:
    """Seconds after which the handler drops a silent peer, when it says; None when it does not."""
    if not isinstance(handler, SettingsReportingHandler):
        return None
    settings = handler.settings
    if not isinstance(settings, LivenessSettings):
        return None
    window = settings.heartbeat_expiry_seconds
    return float(window) if isinstance(window, (int, float)) and not isinstance(window, bool) else None
