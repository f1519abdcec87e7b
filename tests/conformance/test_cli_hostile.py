"""Bad input to ``elastic-conformance`` and ``python -m conformance.mutation``, as a new user would give it.

The rules: one line on stderr naming the bad value and what is allowed, exit status 2, no traceback, found before any
row runs; an interrupt while the CLI starts (torch loading) still interrupts it.
"""

from __future__ import annotations

import json

import pytest

from conformance.cli import main

ONE_ROW = ["certify", "--impl", "torch", "--device", "cpu", "--jobs", "1", "-q", "-k", "RendezvousTimeout.close"]


def _one_line_error(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert "certifying" not in captured.out, "the rows ran before the bad input was found: " + captured.out
    return err


# -- --baseline -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    json.dumps({"meta": [], "results": []}),
    json.dumps({"meta": {}, "results": []}),
    json.dumps({"meta": "cpu", "results": []}),
    json.dumps({"meta": {"device": "cpu"}, "results": [{"api": "x", "observed": "pass"}, 3]}),
])
def test_a_baseline_of_the_wrong_shape_is_a_one_line_error(tmp_path, content, capsys):
    path = tmp_path / "report.json"
    path.write_text(content)
    assert main([*ONE_ROW, "--baseline", str(path)]) == 2
    _one_line_error(capsys, f"--baseline {str(path)!r}", "is not a report.json written by certify")


# -- --table ----------------------------------------------------------------------------------------------------------

def test_an_unknown_table_name_lists_the_named_tables(capsys):
    assert main(["list", "--table", "ascend"]) == 2
    _one_line_error(capsys, "'ascend'", "published", "ascend-2.13", "all-supported")


def test_a_csv_table_saved_with_a_byte_order_mark_is_read(tmp_path, capsys):
    table = tmp_path / "claims.csv"  # what a spreadsheet's "CSV UTF-8" export writes
    table.write_bytes("\ufeffapi,supported,notes\ntorch.distributed.elastic.timer.configure,yes,-\n".encode())
    assert main(["list", "--table", str(table)]) == 0
    assert "torch.distributed.elastic.timer.configure" in capsys.readouterr().out
