from __future__ import annotations

import inspect

from conformance import runner
from conformance.adapters import get_adapter
from conformance.device import detect
from conformance.registry import CHECK_MODULES, REGISTRY, load_checks
from conformance.signatures import load_snapshot
from conformance.table import load_claims, load_table, parse_markdown

from .conftest import TABLE


def test_every_table_row_has_exactly_one_registered_check():
    load_checks()
    published = {r.api for r in load_table(TABLE)}
    per_hardware = {r.api for r in load_claims("ascend-2.13", "Atlas A2").rows}
    assert published - set(REGISTRY) == set(), "rows without a check"
    assert per_hardware - set(REGISTRY) == set(), "rows of the 120-row table without a check"
    assert set(REGISTRY) - per_hardware == set(), "checks for APIs that are in no table"
    assert len(per_hardware - published) == 16


def test_every_row_of_the_120_row_table_has_a_documented_shape():
    assert {r.api for r in load_claims("all-supported").rows} <= set(load_snapshot())


def test_checks_are_grouped_by_module_and_take_a_context():
    load_checks()
    assert {c.group for c in REGISTRY.values()} == set(CHECK_MODULES)
    for check in REGISTRY.values():
        assert list(inspect.signature(check.fn).parameters) == ["ctx"], check.api


def test_every_row_has_a_documented_shape():
    snapshot = load_snapshot()
    assert {r.api for r in load_table(TABLE)} <= set(snapshot)


def test_checks_use_no_upstream_import():
    # Checks must reach the implementation only through ctx.get(), so the same check runs on every impl.
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[2] / "conformance" / "checks").glob("*.py"):
        text = path.read_text()
        assert "import torch.distributed.elastic" not in text and "from torch.distributed.elastic" not in text, path


def test_a_row_without_a_check_fails_the_suite(tmp_path):
    # Std exists upstream but has no row in any table, hence no check.
    rows = parse_markdown("|api|supported|notes|\n|--|--|--|\n"
                          "|torch.distributed.elastic.multiprocessing.api.Std|no|-|\n", "t.md")
    results = runner.certify(rows, get_adapter("torch"), detect("cpu"), workdir=tmp_path)
    assert [(r.verdict, r.observed) for r in results] == [("NO-CHECK", "fail")]
    assert "no check registered" in results[0].error
    assert runner.exit_code(results) == 1
