"""The check registry: one behavioural check per support-table row, keyed by the documented API path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from conformance.table import API_PREFIX

CHECK_MODULES = (
    "agent", "multiprocessing", "errors", "rendezvous", "dynamic", "c10d", "etcd", "timer", "metrics", "events",
    "health_check", "control_plane", "debug_info_logging",  # rows of the 120-row table only
)


class CheckFailed(AssertionError):
    """The implementation did not behave as documented; one-line message."""


class CheckSkipped(Exception):
    """The check could not run here (device or tool absent); the message is the reason."""


@dataclass(frozen=True)
class Check:
    api: str
    fn: Callable
    group: str
    device: bool = False  # touches the accelerator chosen with --device
    timeout: float = 60.0
    tags: tuple[str, ...] = field(default_factory=tuple)


REGISTRY: dict[str, Check] = {}


def check(api: str, *, device: bool = False, timeout: float = 60.0, tags: tuple[str, ...] = ()):
    """Register ``fn(ctx)`` as the behavioural check of ``api`` (full path or relative to torch.distributed.elastic)."""
    full = api if api.startswith(API_PREFIX) else API_PREFIX + api

    def register(fn: Callable) -> Callable:
        if full in REGISTRY:
            raise RuntimeError(f"two checks registered for {full}: {REGISTRY[full].fn.__qualname__} and {fn.__qualname__}")
        group = fn.__module__.rsplit(".", 1)[-1]
        REGISTRY[full] = Check(full, fn, group, device, timeout, tags)
        return fn

    return register


def load_checks() -> dict[str, Check]:
    for name in CHECK_MODULES:
        importlib.import_module(f"conformance.checks.{name}")
    return REGISTRY
