"""The mutation runner: each mutant applies to a copy (never the working tree), and a planted bug is caught."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from conformance import mutation
from conformance.context import REPO_ROOT


def _by_name(name: str) -> mutation.Mutant:
    (found,) = [m for m in mutation.MUTANTS if m.name == name]
    return found


def test_every_mutant_snippet_occurs_exactly_once_in_the_source():
    # A mutant whose code moved on would be reported STALE and silently leave its bug unmeasured.
    stale = [m.name for m in mutation.MUTANTS
             if (REPO_ROOT / "elastic_impl" / m.path).read_text().count(m.old) != 1]
    assert not stale, f"update these mutants to the current source: {stale}"


def test_mutant_names_are_unique_and_each_changes_its_snippet():
    names = [m.name for m in mutation.MUTANTS]
    assert len(names) == len(set(names))
    assert all(m.old != m.new and m.rows for m in mutation.MUTANTS)


def test_a_planted_bug_is_killed_and_the_working_tree_is_untouched():
    mutant = _by_name("put-metric-drops-value")
    source = REPO_ROOT / "elastic_impl" / mutant.path
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    result = mutation.run_mutant(mutant, timeout_s=120)
    assert result["status"] == "KILLED", result
    assert "VIOLATION" in result["detail"] and "metrics" in result["detail"]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before


def test_the_unmutated_copy_certifies_the_same_rows():
    outcome, _, detail = mutation.certify_copy(mutation.METRIC_ROWS, timeout_s=120)
    assert outcome == "pass", detail


def test_a_snippet_that_is_not_in_the_source_is_stale_not_killed():
    ghost = replace(_by_name("put-metric-drops-value"), name="ghost", old="this text is not in the source")
    result = mutation.run_mutant(ghost, timeout_s=60)
    assert result["status"] == "STALE", result
    assert "elastic_impl/metrics/api.py" in result["detail"]


def test_unknown_mutant_names_are_a_one_line_error():
    with pytest.raises(SystemExit, match="unknown mutant.*no-such-mutant.*known: interleaved-ranks"):
        mutation.select_mutants("no-such-mutant")
