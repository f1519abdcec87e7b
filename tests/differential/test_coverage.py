"""Every public API of the 120-row table has at least one differential case, and every known difference names one.

The differential modules register their cases when imported, so this test imports every ``test_*`` module of the
package first (under xdist a worker may not have collected them).
"""

from __future__ import annotations

import importlib
import pkgutil

from conformance.known_differences import API_BEHAVIOUR_DIFFERENCES
from conformance.table import ALL_SUPPORTED, API_PREFIX, load_claims
from tests import differential
from tests.differential.harness import ALL_CASES


def _all_cases():
    for info in pkgutil.iter_modules(differential.__path__):
        if info.name.startswith("test_"):
            importlib.import_module(f"{differential.__name__}.{info.name}")
    return ALL_CASES


def _table_apis() -> list[str]:
    return [row.api.removeprefix(API_PREFIX) for row in load_claims(ALL_SUPPORTED).rows]


def test_every_api_of_the_table_has_a_differential_case():
    covered = {api for c in _all_cases().values() for api in c.covers}
    missing = [api for api in _table_apis() if api not in covered]
    assert missing == [], f"{len(missing)} APIs of the 120-row table have no differential case: {missing}"


def test_cases_name_apis_that_exist_upstream():
    """A typo in ``covers`` would hide a gap: every named API must resolve in torch.distributed.elastic."""
    unresolved = []
    for c in _all_cases().values():
        for api in c.covers:
            parts = api.split(".")
            for split in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module("torch.distributed.elastic." + ".".join(parts[:split]))
                except ImportError:
                    continue
                try:
                    for attr in parts[split:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    unresolved.append((c.name, api))
                break
            else:
                unresolved.append((c.name, api))
    assert unresolved == []


def test_known_differences_name_existing_cases():
    assert sorted(set(API_BEHAVIOUR_DIFFERENCES) - set(_all_cases())) == []
