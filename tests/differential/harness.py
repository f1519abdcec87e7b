"""The differential harness: the same edge-case call on ``elastic_impl`` and on upstream ``torch.distributed.elastic``.

A *case* is a function ``(root, tmp) -> observation``: ``root`` is one implementation's package path, ``tmp`` a fresh
directory for that implementation. The observation is what a user's code can see (return values, attributes, files
written, exception type and message). A case is registered with the APIs it exercises (names relative to
``torch.distributed.elastic``, as in the 120-row table), so ``test_coverage.py`` can prove every public API of the table
has at least one case.

Each test module registers its cases with ``@case("api", ...)`` and ends with
``test_same_observable_behaviour = same_behaviour_test(__name__)``. A case whose observations differ must be listed in
``conformance.known_differences.API_BEHAVIOUR_DIFFERENCES`` with its reason; a listed case whose observations are equal
fails as a stale entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conformance.known_differences import API_BEHAVIOUR_DIFFERENCES

OURS = "elastic_impl"
UPSTREAM = "torch.distributed.elastic"
IMPLEMENTATIONS = (UPSTREAM, OURS)

CaseFn = Callable[[str, Path], Any]


@dataclass(frozen=True)
class Case:
    name: str
    fn: CaseFn
    covers: tuple[str, ...]  # API names relative to torch.distributed.elastic
    module: str


ALL_CASES: dict[str, Case] = {}


def register(name: str, fn: CaseFn, covers: tuple[str, ...], module_name: str) -> None:
    if not covers:
        raise ValueError(f"case {name!r} must name the API(s) it exercises")
    if name in ALL_CASES:
        raise ValueError(f"duplicate differential case name {name!r} ({ALL_CASES[name].module} and {module_name})")
    ALL_CASES[name] = Case(name, fn, tuple(covers), module_name)


def case(*covers: str) -> Callable[[CaseFn], CaseFn]:
    """Register ``case_<name>`` as the case ``<name>`` exercising ``covers``."""

    def decorate(fn: CaseFn) -> CaseFn:
        register(fn.__name__.removeprefix("case_"), fn, covers, fn.__module__)
        return fn

    return decorate


def module(root: str, path: str):
    return importlib.import_module(f"{root}.{path}")


def outcome(call: Callable[[], Any], *, compare_message: bool = True) -> tuple:
    """("ok", value) or ("raised", exception type name[, message]): what the caller of ``call`` observes."""
    try:
        return ("ok", call())
    except BaseException as e:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are observations here too
        return ("raised", type(e).__name__, str(e)) if compare_message else ("raised", type(e).__name__)


def observe_both(name: str, tmp_path: Path) -> dict[str, Any]:
    observed = {}
    for root in IMPLEMENTATIONS:
        workdir = tmp_path / root
        workdir.mkdir()
        observed[root] = ALL_CASES[name].fn(root, workdir)
    return observed


def same_behaviour_test(module_name: str):
    """The parametrized test comparing both implementations on every case registered by ``module_name``."""
    names = sorted(n for n, c in ALL_CASES.items() if c.module == module_name)

    @pytest.mark.parametrize("name", names)
    def test_same_observable_behaviour(name, tmp_path):
        observed = observe_both(name, tmp_path)
        reason = API_BEHAVIOUR_DIFFERENCES.get(name)
        if reason is None:
            assert observed[OURS] == observed[UPSTREAM]
        else:
            assert observed[OURS] != observed[UPSTREAM], (
                f"stale known difference {name!r}: both now give {observed[OURS]!r}")

    return test_same_observable_behaviour
