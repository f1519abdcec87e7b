"""Documented shapes of the table's APIs, compared by name.

``reference_signatures.json`` is a snapshot of parameter names (not code) taken from the upstream reference with
``python -m conformance.signatures --update``; each check compares the implementation's object against it, so a
drift in either implementation, upstream included, shows up as a failed row.
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

SNAPSHOT_PATH = Path(__file__).with_name("reference_signatures.json")
_OPTIONAL_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def describe(obj: Any) -> dict[str, Any]:
    """A JSON-able description of an API object: its kind and the names that make up its signature."""
    if isinstance(obj, property):
        return {"kind": "property"}
    if isinstance(obj, types.UnionType) or typing.get_origin(obj) is typing.Union:
        return {"kind": "union", "members": sorted(_type_name(a) for a in typing.get_args(obj))}
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return {"kind": "enum", "members": list(obj.__members__)}
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return {"kind": "exception", "bases": [b.__name__ for b in obj.__mro__[1:] if b.__name__.startswith("Rendezvous")]}
    kind = "class" if isinstance(obj, type) else "function" if callable(obj) else "value"
    described: dict[str, Any] = {"kind": kind}
    if callable(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return described
        described["params"] = [[p.name, p.kind.name, p.default is not inspect.Parameter.empty] for p in sig.parameters.values()]
    return described


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


def compare(api: str, expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Problems (one line each) where ``actual`` departs from the documented ``expected`` shape."""
    problems: list[str] = []
    if expected["kind"] != actual["kind"]:
        return [f"{api} is a {actual['kind']}, documented as a {expected['kind']}"]
    for key in ("members", "bases"):
        if key in expected and expected[key] != actual.get(key):
            problems.append(f"{api} {key} {actual.get(key)} differ from documented {expected[key]}")
    if "params" not in expected:
        return problems
    if "params" not in actual:
        return problems + [f"{api} has no inspectable signature; documented ({_fmt(expected['params'])})"]
    # Ours may accept more than documented (extra optional parameters, a documented-required one made optional),
    # never less: every documented name exists, documented positional order holds, nothing new is required.
    exp, act = expected["params"], actual["params"]
    named = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY")
    exp_required = {p[0] for p in exp if not p[2] and p[1] in named}
    act_names = {p[0] for p in act}
    missing = [p[0] for p in exp if p[1] in named and p[0] not in act_names]
    if missing:
        problems.append(f"{api} lacks documented parameter(s) {missing}")
    extra_required = [p[0] for p in act if not p[2] and p[1] in named and p[0] not in exp_required]
    if extra_required:
        problems.append(f"{api} requires {extra_required}, not documented as required (documented: {_fmt(exp)})")
    positional = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    exp_pos = [p[0] for p in exp if p[1] in positional]
    act_pos = [p[0] for p in act if p[1] in positional]
    if [n for n in exp_pos if n in act_pos] != [n for n in act_pos if n in exp_pos] or not set(exp_pos) <= set(act_pos):
        problems.append(f"{api} positional parameters {act_pos} do not keep the documented order {exp_pos}")
    for var_kind in _OPTIONAL_KINDS:
        if any(p[1] == var_kind.name for p in exp) and not any(p[1] == var_kind.name for p in act):
            problems.append(f"{api} lacks the documented {'*args' if 'POSITIONAL' in var_kind.name else '**kwargs'}")
    return problems


def _fmt(params: list) -> str:
    return ", ".join(p[0] for p in params)


def load_snapshot() -> dict[str, dict[str, Any]]:
    return json.loads(SNAPSHOT_PATH.read_text(encoding="utf-8"))


def _update(table_path: str | None) -> None:
    from conformance.adapters import reference_adapter
    from conformance.table import ALL_SUPPORTED, default_table_path, load_claims, load_table

    adapter = reference_adapter()
    rows = load_table(table_path or default_table_path())
    if table_path is None:  # every documented row any bundled table certifies: the 120-row list included
        rows += [r for r in load_claims(ALL_SUPPORTED).rows if r.api not in {x.api for x in rows}]
    snapshot = {row.api: describe(adapter.resolve(row.api)) for row in rows}
    SNAPSHOT_PATH.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(snapshot)} documented shapes to {SNAPSHOT_PATH}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--update"]:
        sys.exit("usage: python -m conformance.signatures --update [TABLE]")
    _update(sys.argv[2] if len(sys.argv) > 2 else None)
