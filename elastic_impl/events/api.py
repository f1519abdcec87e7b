"""Event data types: what the agent and rendezvous report, as plain JSON-serialisable records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Union

__all__ = ["EventSource", "Event", "NodeState", "RdzvEvent", "EventMetadataValue"]

EventMetadataValue = str | int | float | bool | None


class EventSource(str, Enum):
    """Who emitted an event."""

    AGENT = "AGENT"
    WORKER = "WORKER"


def _loads_object(data: str | bytes, kind: str) -> dict:
    try:
        obj = json.loads(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot deserialize {kind} from {data!r:.80}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"cannot deserialize {kind} from {data!r:.80}: expected a JSON object")
    return obj


def _enum_member(enum_cls: type[Enum], value: object, kind: str) -> Enum:
    if isinstance(value, enum_cls):
        return value
    allowed = [m.name for m in enum_cls]
    if isinstance(value, str):
        # accept both the bare name and "EnumName.NAME" (str() of the member)
        name = value.split(".", 1)[1] if value.startswith(enum_cls.__name__ + ".") else value
        if name in enum_cls.__members__:
            return enum_cls[name]
    raise ValueError(f"invalid {kind} {value!r}; allowed: {allowed}")


@dataclass
class Event:
    """A generic event: ``name``, who emitted it (``source``), a timestamp and free-form ``metadata``."""

    name: str
    source: EventSource
    timestamp: int = 0
    metadata: dict[str, EventMetadataValue] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.serialize()

    @staticmethod
    def deserialize(data: Union[str, Event]) -> Event:
        if isinstance(data, Event):
            return data
        obj = _loads_object(data, "Event")
        obj["source"] = _enum_member(EventSource, obj.get("source"), "event source")
        try:
            return Event(**obj)
        except TypeError as e:
            raise ValueError(f"cannot deserialize Event from {data!r:.80}: {e}") from None

    def serialize(self) -> str:
        return json.dumps(asdict(self), default=str)


class NodeState(str, Enum):
    """The state of a node as seen by rendezvous events."""

    INIT = "INIT"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass
class RdzvEvent:
    """An event emitted by the rendezvous protocol on one node."""

    name: str
    run_id: str
    message: str
    hostname: str
    pid: int
    node_state: NodeState
    master_endpoint: str = ""
    rank: int | None = None
    local_id: int | None = None
    error_trace: str = ""

    def __str__(self) -> str:
        return self.serialize()

    @staticmethod
    def deserialize(data: Union[str, RdzvEvent]) -> RdzvEvent:
        if isinstance(data, RdzvEvent):
            return data
        obj = _loads_object(data, "RdzvEvent")
        obj["node_state"] = _enum_member(NodeState, obj.get("node_state"), "node state")
        try:
            return RdzvEvent(**obj)
        except TypeError as e:
            raise ValueError(f"cannot deserialize RdzvEvent from {data!r:.80}: {e}") from None

    def serialize(self) -> str:
        return json.dumps(asdict(self), default=str)
