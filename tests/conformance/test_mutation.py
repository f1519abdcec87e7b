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
    stale = [m.name for m in mutation.MUTANTS for path, old, _ in m.edits()
             if (REPO_ROOT / "elastic_impl" / path).read_text().count(old) != 1]
    assert not stale, f"update these mutants to the current source: {stale}"


def test_mutant_names_are_unique_and_each_changes_its_snippet():
    names = [m.name for m in mutation.MUTANTS]
    assert len(names) == len(set(names))
    assert all(m.rows and all(old != new for _, old, new in m.edits()) for m in mutation.MUTANTS)


def test_a_mutant_of_several_edits_applies_all_or_none(tmp_path):
    (tmp_path / "elastic_impl").mkdir()
    (tmp_path / "elastic_impl" / "a.py").write_text("x = 1\n")
    (tmp_path / "elastic_impl" / "b.py").write_text("y = 2\n")
    both = mutation.Mutant("two", "a.py", "x = 1", "x = 0", "rows", "bug", also=(("b.py", "y = 2", "y = 0"),))
    assert mutation.apply(both, tmp_path)
    assert (tmp_path / "elastic_impl" / "a.py").read_text() == "x = 0\n"
    assert (tmp_path / "elastic_impl" / "b.py").read_text() == "y = 0\n"
    half = mutation.Mutant("half", "a.py", "x = 0", "x = 5", "rows", "bug", also=(("b.py", "absent", "z"),))
    assert not mutation.apply(half, tmp_path)
    assert (tmp_path / "elastic_impl" / "a.py").read_text() == "x = 0\n"  # nothing written when one edit is stale


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
