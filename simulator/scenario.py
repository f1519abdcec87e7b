"""Scenario files (YAML, or TOML by extension): the cluster, the job, the fault schedule and the expected outcome.

Example::

    name: worker crash loop
    mode: virtual              # live | virtual
    nodes: 2                   # agents started at t=0 (node0..node{nodes-1})
    workers_per_node: 2
    min_nodes: 1
    max_nodes: 2
    max_restarts: 3
    backend: sim               # live: c10d | etcd-v2 | etcd-v3; virtual: sim
    timeouts: {join: 60, last_call: 1, heartbeat: 1, close: 10}
    job: {steps: 10, step_seconds: 0.5}
    seed: 0
    store: {latency: 0.001, loss: 0.0}       # virtual only; live: {hosted_by_node: 0} (c10d), {members: 3} (etcd)
    network: auto              # live only: netns (a network namespace per node) | proxy (a TCP proxy per node in
                               # front of the store) | auto (netns where namespaces can be made, else proxy)
    faults:
      - {at: 2.0, fault: kill_worker, node: 1, rank: 0}
    expect: {outcome: succeeded}

Every validation error is a :class:`ScenarioError` with a one-line message naming the field and the bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .faults import FAULT_NAMES as FAULT_NAMES  # re-exported: the names a scenario's faults may use
from .faults import validate_fault

MODES = ("live", "virtual")
LIVE_BACKENDS = ("c10d", "etcd-v2", "etcd-v3")
VIRTUAL_BACKENDS = ("sim",)
OUTCOMES = ("succeeded", "failed")
NETWORKS = ("auto", "netns", "proxy")  # how live nodes are connected (simulator/live/cluster.py)
_FAULT_KEYS = ("at", "fault", "node", "rank", "duration", "seconds", "signal", "args")
_TOP_KEYS = (
    "name",
    "description",
    "mode",
    "nodes",
    "workers_per_node",
    "min_nodes",
    "max_nodes",
    "max_restarts",
    "backend",
    "timeouts",
    "job",
    "seed",
    "store",
    "network",
    "faults",
    "expect",
    "time_limit",
)


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message is one line naming the field and value."""


def _err(where: str, field_name: str, value: Any, allowed: str) -> ScenarioError:
    return ScenarioError(f"{where}: {field_name}={value!r} is invalid ({allowed})")


def _int(where: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(where, name, value, f"must be an integer >= {minimum}")
    return value


def _num(where: str, name: str, value: Any, minimum: float = 0.0, strict: bool = False, maximum: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        raise _err(where, name, value, f"must be a number of seconds {bound}" if maximum is None else f"must be a number {bound}")
    return float(value)


def _mapping(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(where, name, value, f"must be a mapping with keys {', '.join(allowed)}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ScenarioError(f"{where}: unknown field {name}.{unknown[0]} (allowed: {', '.join(allowed)})")
    return value


@dataclass
class Timeouts:
    join: float = 60.0
    last_call: float = 1.0
    heartbeat: float = 1.0
    close: float = 10.0
    # Missed heartbeats before a node is evicted, and the agent's worker-monitor interval.
    keep_alive_max_attempt: int = 3
    monitor: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("join", "last_call", "heartbeat", "close", "keep_alive_max_attempt", "monitor")}


@dataclass
class Job:
    steps: int = 10
    step_seconds: float = 0.5
    # Live only: each worker double-forks a setsid daemon that outlives the job unless the runtime stops it.
    daemon: bool = False
    # Live only: the workers join a gloo group and all-reduce at every step (a peer cut off hangs the collective
    # until ``collective_timeout`` seconds, the group's timeout, make it fail: the worker fails).
    collective: bool = False
    collective_timeout: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "step_seconds": self.step_seconds}
        if self.daemon:
            out["daemon"] = True
        if self.collective:
            out.update(collective=True, collective_timeout=self.collective_timeout)
        return out

    @property
    def seconds(self) -> float:
        return self.steps * self.step_seconds


@dataclass
class StoreConfig:
    """Virtual store model: per-call latency (seconds, upper bound of a uniform draw) and loss probability.

    ``broken_cas`` is TEST-ONLY: the simulated store accepts every write whatever its compare-and-set token, which
    breaks the rendezvous on purpose so tests can prove the checker catches it.
    """

    latency: float = 0.001
    loss: float = 0.0
    broken_cas: bool = False
    # Offer the backend seam's optional keyed storage (per-key add/set/get-many/compare-set) to the state machine.
    keyed: bool = False
    # Whether a restart_store keeps the data (etcd: yes) or comes back empty with every open connection gone for
    # good (a TCPStore server: its clients never reconnect), as in live mode.
    persistent: bool = True
    # Live only. ``hosted_by_node``: that node's agent hosts the c10d TCPStore (is_host=true; the others connect to
    # it directly) instead of a store process of the simulator's own. ``members``: size of the real etcd cluster.
    hosted_by_node: int | None = None
    members: int = 1


@dataclass
class Fault:
    at: float
    fault: str
    node: int | None = None
    rank: int | None = None
    duration: float | None = None
    seconds: float | None = None
    signal: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "fault": self.fault}
        for name in ("node", "rank", "duration", "seconds", "signal"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.args:
            out["args"] = dict(self.args)
        return out

    def describe(self) -> str:
        parts = [self.fault]
        if self.node is not None:
            parts.append(f"node={self.node}")
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        if self.duration is not None:
            parts.append(f"duration={self.duration:g}")
        if self.seconds is not None:
            parts.append(f"seconds={self.seconds:g}")
        return f"t={self.at:g} " + " ".join(parts)


@dataclass
class Expect:
    """Expected outcome. ``outcome``: succeeded | failed | None (either). ``violations``: invariant names the run is
    expected to break (a replayed fuzz finding); anything else a scenario wants checked goes in ``extra``."""

    outcome: str | None = None
    violations: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.outcome is not None:
            out["outcome"] = self.outcome
        if self.violations:
            out["violations"] = list(self.violations)
        return out


@dataclass
class Scenario:
    name: str
    mode: str = "virtual"
    nodes: int = 2
    workers_per_node: int = 1
    min_nodes: int = 0  # 0 = "same as nodes" (resolved in validation)
    max_nodes: int = 0
    max_restarts: int = 3
    backend: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    job: Job = field(default_factory=Job)
    seed: int = 0
    store: StoreConfig = field(default_factory=StoreConfig)
    network: str = "auto"
    faults: list[Fault] = field(default_factory=list)
    expect: Expect = field(default_factory=Expect)
    # Give up (the run fails with a liveness violation) after this many seconds of scenario time.
    time_limit: float = 600.0
    description: str = ""
    source: str = ""  # path it was loaded from, for messages

    def __post_init__(self) -> None:
        if not self.min_nodes:
            self.min_nodes = self.nodes
        if not self.max_nodes:
            self.max_nodes = max(self.nodes, self.min_nodes)
        if not self.backend:
            self.backend = "sim" if self.mode == "virtual" else "c10d"
        self.faults = sorted(self.faults, key=lambda f: f.at)

    @property
    def total_nodes(self) -> int:
        """Initial nodes plus nodes added by ``add_node`` faults (node indices run 0..total_nodes-1)."""
        return self.nodes + sum(1 for f in self.faults if f.fault == "add_node")

    @property
    def fault_end(self) -> float:
        """When the last fault (including its duration) is over."""
        return max((f.at + (f.duration or 0.0) for f in self.faults), default=0.0)

    def validate(self) -> Scenario:
        """Raise :class:`ScenarioError` for the first bad field; return self."""
        where = f"scenario {self.source or self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise _err(where, "name", self.name, "must be a non-empty string")
        if self.mode not in MODES:
            raise _err(where, "mode", self.mode, f"allowed: {', '.join(MODES)}")
        _int(where, "nodes", self.nodes, 1)
        _int(where, "workers_per_node", self.workers_per_node, 1)
        _int(where, "min_nodes", self.min_nodes, 1)
        _int(where, "max_nodes", self.max_nodes, 1)
        if self.max_nodes < self.min_nodes:
            raise _err(where, "max_nodes", self.max_nodes, f"must be >= min_nodes ({self.min_nodes})")
        _int(where, "max_restarts", self.max_restarts, 0)
        backends = VIRTUAL_BACKENDS if self.mode == "virtual" else LIVE_BACKENDS
        if self.backend not in backends:
            raise _err(where, "backend", self.backend, f"allowed in {self.mode} mode: {', '.join(backends)}")
        t = self.timeouts
        for name in ("join", "last_call", "heartbeat", "close", "monitor"):
            _num(where, f"timeouts.{name}", getattr(t, name), 0.0, strict=True)
        _int(where, "timeouts.keep_alive_max_attempt", t.keep_alive_max_attempt, 1)
        _int(where, "job.steps", self.job.steps, 1)
        _num(where, "job.step_seconds", self.job.step_seconds, 0.0, strict=True)
        _int(where, "seed", self.seed, 0)
        _num(where, "store.latency", self.store.latency, 0.0)
        _num(where, "store.loss", self.store.loss, 0.0, maximum=0.5)
        if not isinstance(self.store.broken_cas, bool):
            raise _err(where, "store.broken_cas", self.store.broken_cas, "must be true or false")
        if not isinstance(self.store.keyed, bool):
            raise _err(where, "store.keyed", self.store.keyed, "must be true or false")
        if not isinstance(self.store.persistent, bool):
            raise _err(where, "store.persistent", self.store.persistent, "must be true or false")
        if self.store.broken_cas and self.mode != "virtual":
            raise _err(where, "store.broken_cas", True, "only the virtual store can break compare-and-set")
        self._validate_live_store(where)
        if self.network not in NETWORKS:
            raise _err(where, "network", self.network, f"allowed: {', '.join(NETWORKS)}")
        if self.network != "auto" and self.mode != "live":
            raise _err(where, "network", self.network, "only live nodes have a network (virtual: leave it auto)")
        _num(where, "time_limit", self.time_limit, 0.0, strict=True)
        for i, f in enumerate(self.faults):
            validate_fault(f, self, f"{where}: faults[{i}]", ScenarioError)
        if self.expect.outcome is not None and self.expect.outcome not in OUTCOMES:
            raise _err(where, "expect.outcome", self.expect.outcome, f"allowed: {', '.join(OUTCOMES)}")
        if not isinstance(self.expect.violations, list) or not all(isinstance(v, str) for v in self.expect.violations):
            raise _err(where, "expect.violations", self.expect.violations, "must be a list of invariant names")
        from .checker import INVARIANTS  # the checker imports this module

        for name in self.expect.violations:
            if name not in INVARIANTS:
                raise _err(where, "expect.violations", name, f"not an invariant; allowed: {', '.join(INVARIANTS)}")
        self._validate_expect_extra(where)
        return self

    def _validate_expect_extra(self, where: str) -> None:
        """The ``expect`` keys the checker reads must have values it can compare (other keys are the scenario's own)."""
        extra = self.expect.extra
        if "restarts" in extra:
            _int(where, "expect.restarts", extra["restarts"], 0)
        if "final_world_size" in extra:
            _int(where, "expect.final_world_size", extra["final_world_size"], 1)
        for name in ("failure_bound", "detection_bound"):
            if name in extra:
                _num(where, f"expect.{name}", extra[name], 0.0, strict=True)

    def _validate_live_store(self, where: str) -> None:
        if not isinstance(self.job.daemon, bool):
            raise _err(where, "job.daemon", self.job.daemon, "must be true or false")
        if self.job.daemon and self.mode != "live":
            raise _err(where, "job.daemon", True, "only live workers can start a daemon")
        if not isinstance(self.job.collective, bool):
            raise _err(where, "job.collective", self.job.collective, "must be true or false")
        if self.job.collective and self.mode != "live":
            raise _err(where, "job.collective", True, "only live workers run collectives")
        _num(where, "job.collective_timeout", self.job.collective_timeout, 0.0, strict=True)
        host = self.store.hosted_by_node
        if host is not None:
            _int(where, "store.hosted_by_node", host, 0)
            if self.mode != "live" or self.backend != "c10d":
                raise _err(where, "store.hosted_by_node", host, "an agent hosts the store only in live mode with backend c10d")
            if host >= self.nodes:
                raise _err(where, "store.hosted_by_node", host, f"must be one of the initial nodes 0..{self.nodes - 1}")
        _int(where, "store.members", self.store.members, 1)
        if self.store.members > 1 and (self.mode != "live" or self.backend not in ("etcd-v2", "etcd-v3")):
            raise _err(where, "store.members", self.store.members, "an etcd cluster needs live mode with backend etcd-v2 or etcd-v3")

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(
            mode=self.mode,
            nodes=self.nodes,
            workers_per_node=self.workers_per_node,
            min_nodes=self.min_nodes,
            max_nodes=self.max_nodes,
            max_restarts=self.max_restarts,
            backend=self.backend,
            timeouts=self.timeouts.to_dict(),
            job=self.job.to_dict(),
            seed=self.seed,
        )
        if self.mode == "virtual":
            store: dict[str, Any] = {"latency": self.store.latency, "loss": self.store.loss}
            if self.store.broken_cas:
                store["broken_cas"] = True
            if self.store.keyed:
                store["keyed"] = True
            if not self.store.persistent:
                store["persistent"] = False
            out["store"] = store
        else:
            live_store: dict[str, Any] = {}
            if self.store.hosted_by_node is not None:
                live_store["hosted_by_node"] = self.store.hosted_by_node
            if self.store.members != 1:
                live_store["members"] = self.store.members
            if live_store:
                out["store"] = live_store
            if self.network != "auto":
                out["network"] = self.network
        out["time_limit"] = self.time_limit
        out["faults"] = [f.to_dict() for f in self.faults]
        expect = self.expect.to_dict()
        if expect:
            out["expect"] = expect
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The scenario as YAML (loadable by :func:`load_scenario`); also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text


def scenario_from_dict(data: Any, source: str = "") -> Scenario:
    """Build and validate a :class:`Scenario` from parsed YAML/TOML."""
    where = f"scenario {source!r}" if source else "scenario"
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: top level must be a mapping of fields ({', '.join(_TOP_KEYS[:6])}, ...), got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(_TOP_KEYS)})")
    if "name" not in data:
        raise ScenarioError(f"{where}: field 'name' is required")
    tdata = _mapping(where, "timeouts", data.get("timeouts"), tuple(Timeouts.__dataclass_fields__))
    jdata = _mapping(where, "job", data.get("job"), tuple(Job.__dataclass_fields__))
    sdata = _mapping(where, "store", data.get("store"), tuple(StoreConfig.__dataclass_fields__))
    edata = data.get("expect") or {}
    if not isinstance(edata, dict):
        raise _err(where, "expect", edata, "must be a mapping (outcome: succeeded|failed, ...)")
    raw_faults = data.get("faults") or []
    if not isinstance(raw_faults, list):
        raise _err(where, "faults", raw_faults, "must be a list of {at, fault, node, ...}")
    faults = []
    for i, fd in enumerate(raw_faults):
        fd = _mapping(where, f"faults[{i}]", fd, _FAULT_KEYS)
        for required in ("at", "fault"):
            if required not in fd:
                raise ScenarioError(f"{where}: faults[{i}].{required} is required")
        faults.append(Fault(**fd))
    try:
        scenario = Scenario(
            name=data["name"],
            description=str(data.get("description") or ""),
            mode=data.get("mode", "virtual"),
            nodes=data.get("nodes", 2),
            workers_per_node=data.get("workers_per_node", 1),
            min_nodes=data.get("min_nodes") or 0,
            max_nodes=data.get("max_nodes") or 0,
            max_restarts=data.get("max_restarts", 3),
            backend=data.get("backend") or "",
            timeouts=Timeouts(**tdata),
            job=Job(**jdata),
            seed=data.get("seed", 0),
            store=StoreConfig(**sdata),
            network=data.get("network", "auto"),
            faults=faults,
            expect=Expect(
                outcome=edata.get("outcome"),
                violations=edata.get("violations") or [],
                extra={k: v for k, v in edata.items() if k not in ("outcome", "violations")},
            ),
            time_limit=data.get("time_limit", 600.0),
            source=source,
        )
    except TypeError as e:
        # Sorting faults or comparing defaults on a wrongly typed field: name it without a traceback.
        raise ScenarioError(f"{where}: a field has the wrong type ({e})") from None
    scenario.validate()
    _check_size(scenario, where)
    return scenario


# What a scenario file may ask for. Virtual: a run's cost grows about N^3 with the nodes (every node reads and
# writes the whole rendezvous state; 200 nodes take ~6 s, 500 ~1 min on 2 cores) and its memory with N^2 (100,000
# nodes grew past 3.8 GB within a minute without finishing t=0.01 s). Live: every agent is a process importing
# torch (~230 MB), every worker one more process. Scale measurements build their Scenario in code
# (simulator.virtual.run_rendezvous_round) and are not limited.
MAX_VIRTUAL_NODES = 1000
MAX_LIVE_NODES = 16
MAX_LIVE_WORKERS = 64


def _check_size(scenario: Scenario, where: str) -> None:
    total = scenario.total_nodes
    plus = " with add_node faults" if total != scenario.nodes else ""
    if scenario.mode == "virtual" and total > MAX_VIRTUAL_NODES:
        raise ScenarioError(f"{where}: nodes={total}{plus} is too many for virtual mode (at most {MAX_VIRTUAL_NODES}: "
                            "its cost grows about N^3, 500 nodes take ~1 min; for rendezvous cost at scale use "
                            "simulator.virtual.run_rendezvous_round)")
    if scenario.mode == "live":
        if total > MAX_LIVE_NODES:
            raise ScenarioError(f"{where}: nodes={total}{plus} is too many for live mode (at most {MAX_LIVE_NODES} "
                                "agents, each a process of ~230 MB; use mode: virtual for more)")
        workers = total * scenario.workers_per_node
        if workers > MAX_LIVE_WORKERS:
            raise ScenarioError(f"{where}: workers_per_node={scenario.workers_per_node} x {total} nodes = {workers} "
                                f"worker processes is too many for live mode (at most {MAX_LIVE_WORKERS})")


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario from a ``.yaml``/``.yml`` or ``.toml`` file and validate it."""
    path = Path(path)
    if path.is_dir():
        raise ScenarioError(f"scenario file {str(path)!r} is a directory (give a .yaml/.yml or .toml file)")
    if not path.is_file():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"scenario {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ScenarioError(f"scenario file {str(path)!r} cannot be read ({e.strerror})") from None
    is_toml = path.suffix.lower() == ".toml"
    if is_toml:
        try:
            import tomllib  # Python 3.11+
        except ImportError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ScenarioError(f"scenario {str(path)!r}: TOML needs Python 3.11+ or 'pip install tomli'") from None
        toml_error: type[Exception] = tomllib.TOMLDecodeError
    else:
        toml_error = yaml.YAMLError
    try:
        data = tomllib.loads(text) if is_toml else yaml.safe_load(text)
    except (yaml.YAMLError, toml_error) as e:
        first = str(e).strip().splitlines()
        raise ScenarioError(f"scenario {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {' '.join(first)[:200]}") from None
    return scenario_from_dict(data, str(path))
