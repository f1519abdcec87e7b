"""What a live run is configured with, checked in one place, and what every process of the run inherits."""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["BACKENDS", "CONFIGURABLE", "LiveError", "NETWORKS", "RUN_MARKER_ENV", "Settings", "base_env",
           "default_train_script"]

# Every process of a run carries RUN_MARKER_ENV=<the run's token>: the orphan check finds escaped ones by it.
RUN_MARKER_ENV = "ELASTIC_SIM_RUN"
BACKENDS = ("c10d", "etcd-v2", "etcd-v3")
NETWORKS = ("auto", "netns", "proxy")
_REPO = Path(__file__).resolve().parents[2]


class LiveError(RuntimeError):
    """The live cluster cannot do what was asked (the message names the node/value and what is allowed)."""


def default_train_script() -> str:
    """``examples/train.py`` of this source tree."""
    return str(_REPO / "examples" / "train.py")


def base_env() -> dict[str, str]:
    """This process's environment without the run-specific variables a child must get from the run itself, with
    this source tree importable."""
    env = dict(os.environ)
    for key in ("ELASTIC_IMPL_EVENTS_FILE", "MARKER_DIR", "OMP_NUM_THREADS", RUN_MARKER_ENV, "PYTEST_XDIST_WORKER"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(_REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _default_timeouts() -> dict[str, float]:
    return {"join": 60.0, "last_call": 1.0, "heartbeat": 1.0, "close": 10.0, "keep_alive_max_attempt": 3,
            "monitor": 0.1, "read": 30.0}


@dataclass
class Settings:
    """The options of a :class:`~simulator.live.cluster.Cluster` (see its docstring); :meth:`update` changes them
    until the run starts. ``timeouts``, ``job`` and ``env`` given to the constructor or to :meth:`update` are merged
    into the current ones."""

    workers_per_node: int = 1
    min_nodes: int | None = None
    max_nodes: int | None = None
    max_restarts: int = 0
    backend: str = "c10d"
    timeouts: dict[str, float] = field(default_factory=_default_timeouts)
    job: dict[str, Any] = field(default_factory=lambda: {"steps": 10, "step_seconds": 0.5})
    shutdown_grace: float = 3.0
    timers: bool = True
    env: dict[str, str] = field(default_factory=dict)
    store_host: int | None = None
    store_members: int = 1
    network: str = "auto"
    train_script: str = field(default_factory=default_train_script)
    run_id: str = field(default_factory=lambda: f"sim-{uuid.uuid4().hex[:8]}")

    @classmethod
    def of(cls, options: dict[str, Any]) -> Settings:
        """Settings from constructor options (``None`` for ``train_script``/``run_id`` means the default)."""
        settings = cls()
        allowed = CONFIGURABLE + ("train_script", "run_id")
        settings.update({k: v for k, v in options.items() if k not in ("train_script", "run_id") or v is not None},
                        allowed)
        if not os.path.isfile(settings.train_script):
            raise LiveError(f"training script {settings.train_script!r} does not exist (pass train_script=)")
        return settings

    def update(self, options: dict[str, Any], allowed: tuple[str, ...] | None = None) -> None:
        allowed = CONFIGURABLE if allowed is None else allowed
        changed = copy.deepcopy(self)  # a refused value leaves the settings as they were
        for key, value in options.items():
            if key not in allowed:
                raise LiveError(f"unknown cluster option {key!r}; allowed: {', '.join(allowed)}")
            if key in ("timeouts", "job", "env"):
                getattr(changed, key).update(value or {})
            else:
                setattr(changed, key, value)
        changed.check()
        vars(self).update(vars(changed))

    def check(self) -> None:
        """Refuse a bad value (or combination) with a one-line error naming it and what is allowed."""
        if self.backend not in BACKENDS:
            raise LiveError(f"invalid live backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        host, members = self.store_host, self.store_members
        if host is not None:
            if isinstance(host, bool) or not isinstance(host, int) or host < 0:
                raise LiveError(f"invalid store_host {host!r}; expected a node index >= 0 or None")
            if self.backend != "c10d":
                raise LiveError(f"store_host={host} needs backend c10d (an agent hosts a TCPStore), "
                                f"not {self.backend}")
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise LiveError(f"invalid store_members {members!r}; expected an integer >= 1")
        if members > 1 and self.backend == "c10d":
            raise LiveError(f"store_members={members} needs an etcd backend (etcd-v2, etcd-v3), not c10d")
        if self.network not in NETWORKS:
            raise LiveError(f"invalid network {self.network!r}; allowed: {', '.join(NETWORKS)}")
        if not isinstance(self.workers_per_node, int) or self.workers_per_node < 1:
            raise LiveError(f"invalid workers_per_node {self.workers_per_node!r}; expected an integer >= 1")

    def fix_bounds(self, nodes: int) -> None:
        """Resolve ``min_nodes``/``max_nodes`` for a start with ``nodes`` agents (unset: that many)."""
        lo = self.min_nodes if self.min_nodes is not None else nodes
        hi = self.max_nodes if self.max_nodes is not None else max(nodes, lo)
        if not 1 <= lo <= hi:
            raise LiveError(f"invalid node bounds min_nodes={lo} max_nodes={hi}; expected 1 <= min_nodes <= max_nodes")
        self.min_nodes, self.max_nodes = lo, hi


# What configure()/start() may change (train_script and run_id are fixed by the constructor).
CONFIGURABLE = tuple(f.name for f in fields(Settings) if f.name not in ("train_script", "run_id"))
