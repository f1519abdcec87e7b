"""Every public name of upstream ``torch.distributed.elastic`` exists at the same path in ``elastic_impl``.

What counts as a public name of an upstream module M (the rule this test applies):

- M is every module under ``torch.distributed.elastic`` that ``pkgutil.walk_packages`` finds, except private ones
  (a dotted-path part starting with ``_``, e.g. ``rendezvous._etcd_stub``);
- a public name is an entry of ``vars(M)`` not starting with ``_``, except:
  * modules (``import os``, ``import torch.distributed.elastic.timer as timer``): submodules are walked themselves;
  * classes and functions defined outside ``torch.distributed.elastic`` (``TCPStore``, ``dataclass``, ``Enum``,
    ``partial``): imports of stdlib or third-party names, not elastic's surface;
  * the very object that ``typing`` or ``__future__`` exports under that name (``Optional``, ``TYPE_CHECKING``,
    ``annotations``): typing helpers;
  everything else counts: classes and functions defined in elastic (also where M re-exports another elastic
  module's name), constants, loggers, type aliases;
- the public members of a counted class (checked where the class is defined, or at every path that exposes it when
  it is defined in a private module): names in ``dir(cls)`` not starting with ``_`` that an elastic class defines
  (the first class in the MRO holding the name; members inherited from ``Exception``, ``Enum``... do not count),
  plus its dataclass fields.

Ours has a module-level name when our module at the same path has that attribute; a member when our class has the
attribute, a dataclass field or an annotation of that name. On top of presence, two parity checks: a plain constant
(str/int/float/bool, e.g. an environment variable's name) has upstream's value, and a re-export is a re-export (where
upstream's name is the object of its home module, ours is our object of that home module).
"""

from __future__ import annotations
import __future__

import dataclasses
import importlib
import inspect
import pkgutil
import types
import typing

import torch.distributed.elastic as upstream

UPSTREAM = "torch.distributed.elastic"
OURS = "elastic_impl"

# Upstream names (relative to torch.distributed.elastic) that deliberately do not exist in ours, each with its
# reason. Empty: every name exists.
NOT_IN_OURS: dict[str, str] = {}


def _is_elastic(module_name: object, root: str = UPSTREAM) -> bool:
    return isinstance(module_name, str) and (module_name == root or module_name.startswith(root + "."))


def upstream_modules() -> list[str]:
    names = [UPSTREAM]
    for info in pkgutil.walk_packages(upstream.__path__, UPSTREAM + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def public_names(module: types.ModuleType) -> dict[str, object]:
    names = {}
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if inspect.isclass(value) or inspect.isroutine(value):
            if not _is_elastic(getattr(value, "__module__", None)):
                continue
        elif any(getattr(helpers, name, object()) is value for helpers in (typing, __future__)):
            continue
        names[name] = value
    return names


def public_members(cls: type) -> set[str]:
    members = set()
    for name in dir(cls):
        if name.startswith("_"):
            continue
        owner = next((base for base in cls.__mro__ if name in vars(base)), None)
        if owner is not None and _is_elastic(owner.__module__):
            members.add(name)
    if dataclasses.is_dataclass(cls):
        members |= {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    return members


def has_member(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    return any(name in getattr(base, "__annotations__", {}) for base in cls.__mro__)


def _ours_path(upstream_path: str) -> str:
    return OURS + upstream_path[len(UPSTREAM):]


def _relative(upstream_path: str) -> str:
    return upstream_path[len(UPSTREAM) + 1:]


def compare_surface() -> tuple[int, int, list[str]]:
    """(names ours has, names counted, differences) over the whole upstream surface."""
    walked = set(upstream_modules())
    counted = present = 0
    differences: list[str] = []

    def check(upstream_path: str, found: bool) -> None:
        nonlocal counted, present
        counted += 1
        relative = _relative(upstream_path)
        if found:
            present += 1
        elif relative not in NOT_IN_OURS:
            differences.append(f"missing: {_ours_path(upstream_path)}")

    for module_name in sorted(walked):
        module = importlib.import_module(module_name)
        try:
            ours = importlib.import_module(_ours_path(module_name))
        except ModuleNotFoundError:
            ours = None
        for name, value in sorted(public_names(module).items()):
            path = f"{module_name}.{name}"
            our_value = getattr(ours, name, None) if ours is not None else None
            check(path, ours is not None and hasattr(ours, name))
            if our_value is None:
                pass
            elif isinstance(value, (str, int, float, bool)) and our_value != value:
                differences.append(f"value: {_ours_path(path)} is {our_value!r}, upstream {value!r}")
            elif (inspect.isclass(value) or inspect.isroutine(value)) and value.__module__ != module_name:
                home = importlib.import_module(value.__module__)
                if value.__module__ in walked and getattr(home, name, None) is value:
                    try:
                        our_home = importlib.import_module(_ours_path(value.__module__))
                    except ModuleNotFoundError:
                        our_home = None
                    if our_home is not None and getattr(our_home, name, None) is not our_value:
                        differences.append(
                            f"not a re-export: {_ours_path(path)} is not {_ours_path(value.__module__)}.{name}"
                        )
            if inspect.isclass(value) and (value.__module__ == module_name or value.__module__ not in walked):
                for member in sorted(public_members(value)):
                    check(f"{path}.{member}", inspect.isclass(our_value) and has_member(our_value, member))
    return present, counted, differences


def test_upstream_public_surface_exists_in_ours(capsys):
    present, counted, differences = compare_surface()
    # A stale allow-list entry would hide a future gap: each must still be an upstream public name.
    for relative in NOT_IN_OURS:
        module_name, _, name = relative.rpartition(".")
        module = importlib.import_module(f"{UPSTREAM}.{module_name}")
        if name not in public_names(module):
            differences.append(f"stale NOT_IN_OURS entry: {relative}")
    with capsys.disabled():
        print(f"\npublic surface: {present} of {counted} upstream names at the same path in {OURS}")
    assert not differences, f"{len(differences)} differences from {UPSTREAM}:\n" + "\n".join(differences)


def test_rule_excludes_imports_and_counts_reexports():
    # The rule itself, on names whose status is known: stdlib imports and typing helpers are out, elastic re-exports in.
    local_agent = public_names(importlib.import_module(f"{UPSTREAM}.agent.server.local_elastic_agent"))
    assert {"LocalElasticAgent", "LogsSpecs", "TORCHELASTIC_TIMER_FILE", "macros"} <= set(local_agent)
    assert not {"json", "Template", "Any", "TYPE_CHECKING", "annotations", "timer"} & set(local_agent)
    errors = importlib.import_module(f"{UPSTREAM}.multiprocessing.errors")
    assert "with_traceback" not in public_members(errors.ChildFailedError)  # inherited from Exception
    assert "error_file" in public_members(errors.ProcessFailure)  # a dataclass field
