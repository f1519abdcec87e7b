from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from conformance.cli import main
from conformance.report import terminal_table, write_reports
from conformance.runner import Result, exit_code, select, verdict_for
from conformance.table import Row


@pytest.mark.parametrize("supported, observed, verdict", [
    (True, "pass", "CONFORMS"), (True, "fail", "VIOLATION"), (False, "fail", "CLAIMED-UNSUPPORTED"),
    (False, "pass", "UNDOCUMENTED-SUPPORT"), (True, "skip", "SKIPPED"), (False, "skip", "SKIPPED"),
])
def test_verdicts(supported, observed, verdict):
    assert verdict_for(supported, observed) == verdict


def _results():
    return [
        Result("torch.distributed.elastic.a", "agent", "yes", "pass", 0.5, "CONFORMS"),
        Result("torch.distributed.elastic.b", "agent", "yes", "fail", 1.0, "VIOLATION", "CheckFailed: x | y", "tb"),
        Result("torch.distributed.elastic.c", "etcd", "no", "pass", 0.1, "UNDOCUMENTED-SUPPORT"),
        Result("torch.distributed.elastic.d", "multiprocessing", "yes", "skip", 0.0, "SKIPPED", "npu not available"),
    ]


def test_reports_are_written_and_consistent(tmp_path):
    results = _results()
    paths = write_reports(results, tmp_path, impl="torch", device="cpu", table="t.md")
    assert [p.name for p in paths] == ["report.json", "report.md", "junit.xml", "wpt.json"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["meta"]["summary"] == {"VIOLATION": 1, "UNDOCUMENTED-SUPPORT": 1, "SKIPPED": 1, "CONFORMS": 1}
    by_api = {r["api"]: r for r in data["results"]}
    assert by_api["torch.distributed.elastic.b"]["error"] == "CheckFailed: x | y"
    assert set(by_api["torch.distributed.elastic.a"]) >= {"claimed", "observed", "duration_s", "error", "verdict"}
    md = (tmp_path / "report.md").read_text()
    assert "|`torch.distributed.elastic.b`|yes|fail|VIOLATION|1.00|CheckFailed: x \\| y|" in md
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["torch.distributed.elastic.b"]
    assert "VIOLATION=1" in terminal_table(results)
    assert exit_code(results) == 1 and exit_code([results[0], results[2], results[3]]) == 0


def test_select_by_substrings():
    rows = [Row("torch.distributed.elastic.timer.configure", True, "-", 1),
            Row("torch.distributed.elastic.metrics.configure", True, "-", 2),
            Row("torch.distributed.elastic.events.record", True, "-", 3)]
    assert [r.line for r in select(rows, "TIMER.,record")] == [1, 3]
    assert select(rows, None) == rows


@pytest.mark.parametrize("argv, needle", [
    (["certify", "--impl", "no_such_impl_pkg"], "--impl 'no_such_impl_pkg' is not importable"),
    (["certify", "--impl", "torch", "--device", "tpu"], "--device 'tpu' is not one of"),
    (["certify", "--impl", "torch", "-k", "zzz-no-such-api"], "-k 'zzz-no-such-api' matches no api"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["certify"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--impl" in err


def test_certify_small_selection_writes_reports(tmp_path, capsys):
    code = main(["certify", "--impl", "torch", "--device", "cpu", "-k", "RendezvousTimeout.", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("CONFORMS") >= 4 and "[  1/4]" in out  # one progress line per check
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["verdict"] for r in data["results"]] == ["CONFORMS"] * 4
