"""Claims are an input: --table (a path, the per-hardware Ascend table with --hardware, all-supported) and
--baseline (a row that passed before and fails now is a REGRESSION whatever the claim)."""

from __future__ import annotations

import json

import pytest

from conformance.runner import CLAIMED_UNSUPPORTED, CONFORMS, REGRESSION, VIOLATION, Result, apply_baseline
from conformance.table import TableError, load_claims, load_table, parse_hardware_markdown

from .conftest import REPO_ROOT, TABLE, run_cli

ASCEND = REPO_ROOT / "conformance" / "support_table_ascend_2.13.md"
GET_AS_INT = "torch.distributed.elastic.rendezvous.RendezvousParameters.get_as_int"
ETCD_SERVER = "torch.distributed.elastic.rendezvous.etcd_server.EtcdServer"
HW_HEADER = "|section|API|Board X|Board Y|\n|--|--|:-:|:-:|\n"


def test_the_ascend_table_has_120_rows_per_hardware_and_contains_the_published_104():
    layout = parse_hardware_markdown(ASCEND.read_text(), ASCEND.name)
    assert layout.columns == ("Atlas A2 training", "Atlas A3 training", "Ascend 950DT")
    assert len(layout.entries) == 120 and sum(e.new for e in layout.entries) == 16
    a2 = load_claims("ascend-2.13", "Atlas A2")
    assert a2.hardware == "Atlas A2 training" and len(a2.rows) == 120
    assert [r.api for r in a2.rows if not r.supported] == [ETCD_SERVER]
    assert not any(r.supported for r in load_claims(str(ASCEND), "ascend 950dt").rows)
    assert {r.api for r in load_table(TABLE)} <= {r.api for r in a2.rows}
    assert a2.rows[0].section == "Elastic Agent"


def test_all_supported_claims_every_documented_api():
    claims = load_claims("all-supported")
    assert claims.name == "all-supported" and len(claims.rows) == 120 and all(r.supported for r in claims.rows)


@pytest.mark.parametrize("spec, hardware, needle", [
    ("ascend-2.13", None, "has one column per hardware; choose one with --hardware (one of 'Atlas A2 training', "
                          "'Atlas A3 training', 'Ascend 950DT')"),
    ("ascend-2.13", "Atlas A9", "--hardware 'Atlas A9' is not a column of support_table_ascend_2.13.md; one of "
                                "'Atlas A2 training', 'Atlas A3 training', 'Ascend 950DT'"),
    ("ascend-2.13", "Atlas", "--hardware 'Atlas' is not a column"),  # ambiguous prefix
    ("published", "Atlas A2", "--hardware 'Atlas A2' applies only to a per-hardware table"),
    ("all-supported", "Atlas A2", "applies only to a per-hardware table, not all-supported"),
])
def test_bad_or_missing_hardware_is_a_one_line_error(spec, hardware, needle):
    with pytest.raises(TableError) as info:
        load_claims(spec, hardware)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("body, line, needle", [
    ("|Rdzv|torch.distributed.elastic.timer.configure|✔|\n", 3, "expected 4 cells"),
    ("|Rdzv|torch.distributed.elastic.timer.configure|✔|yes|\n", 3, "Board Y value 'yes'"),
    ("|Rdzv|torch.nn.Linear|✔|✔|\n", 3, "'torch.nn.Linear'"),
])
def test_malformed_hardware_table_names_the_line(tmp_path, body, line, needle):
    path = tmp_path / "hw.md"
    path.write_text(HW_HEADER + body)
    with pytest.raises(TableError) as info:
        load_claims(str(path), "Board X")
    assert str(info.value).startswith(f"hw.md:{line}: ") and needle in str(info.value)


def test_the_cli_rejects_a_per_hardware_table_without_hardware():
    proc = run_cli(["certify", "--impl", "elastic_impl", "--device", "cpu", "--table", "ascend-2.13"], timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "choose one with --hardware (one of 'Atlas A2 training'" in proc.stderr


def test_baseline_turns_pass_then_fail_into_a_regression_whatever_the_claim():
    now = [Result(GET_AS_INT, "rendezvous", "no", "fail", 0.1, CLAIMED_UNSUPPORTED, "x"),
           Result(ETCD_SERVER, "etcd", "yes", "fail", 0.1, VIOLATION, "y"),
           Result("torch.distributed.elastic.timer.configure", "timer", "yes", "pass", 0.1, CONFORMS)]
    apply_baseline(now, {GET_AS_INT: "pass", ETCD_SERVER: "fail",
                         "torch.distributed.elastic.timer.configure": "pass"}, "old.json")
    assert [r.verdict for r in now] == [REGRESSION, VIOLATION, CONFORMS]
    assert "passed in old.json; would be CLAIMED-UNSUPPORTED" in now[0].notes


def _claim_get_as_int_unsupported(tmp_path):
    table = tmp_path / "claims.csv"
    table.write_text(f"api,supported,notes\n{GET_AS_INT},no,-\n")
    return table


def test_certify_planted_bug_against_each_claim(planted_impl, tmp_path):
    """The same broken row: honest 'no' claim → exit 0; all-supported → VIOLATION; a baseline where it passed
    (the reference's own report) → REGRESSION, exit 1, although the table says 'no'."""
    table = _claim_get_as_int_unsupported(tmp_path)
    base = tmp_path / "base"
    ref = run_cli(["certify", "--impl", "torch", "--device", "cpu", "--jobs", "1", "--table", str(table),
                   "--out", str(base)])
    assert ref.returncode == 0 and "UNDOCUMENTED-SUPPORT" in ref.stdout, ref.stdout + ref.stderr
    honest = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "--jobs", "1", "--table", str(table)],
                     extra_path=planted_impl)
    assert honest.returncode == 0 and CLAIMED_UNSUPPORTED in honest.stdout, honest.stdout + honest.stderr
    every = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "--jobs", "1", "--table", "all-supported",
                     "-k", "get_as_int"], extra_path=planted_impl)
    assert every.returncode == 1 and VIOLATION in every.stdout, every.stdout + every.stderr
    out = tmp_path / "now"
    regressed = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "--jobs", "1", "--table", str(table),
                         "--baseline", str(base / "report.json"), "--out", str(out)], extra_path=planted_impl)
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    assert "certification FAILED" in regressed.stderr
    data = json.loads((out / "report.json").read_text())
    (row,) = data["results"]
    assert (row["claimed"], row["observed"], row["verdict"]) == ("no", "fail", REGRESSION)
    assert data["meta"]["baseline"] == str(base / "report.json") and data["meta"]["outcome"] == "FAILED"


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read --baseline"),
    ("not json", "is not a report.json written by certify"),
    (json.dumps({"meta": {"device": "npu", "backend": "hccl"}, "results": []}), "was certified on npu/hccl; this run "
                                                                                  "is on cpu/gloo"),
])
def test_bad_baseline_is_a_one_line_error(tmp_path, content, needle):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    proc = run_cli(["certify", "--impl", "torch", "--device", "cpu", "--baseline", str(path)], timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_a_per_hardware_certification_writes_the_observed_table_in_the_vendor_layout(tmp_path):
    proc = run_cli(["certify", "--impl", "elastic_impl", "--device", "cpu", "--jobs", "1", "--table", "ascend-2.13",
                    "--hardware", "Atlas A2", "-k", "RendezvousParameters.get_as_int,etcd_server", "--out",
                    str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (tmp_path / "observed_table.md").read_text()
    assert "|section|API|Atlas A2 training|Atlas A3 training|Ascend 950DT|" in text
    assert f"|Rendezvous|{GET_AS_INT}|✔|✔|✘|" in text  # measured ✔ under Atlas A2
    assert f"|Rendezvous|{ETCD_SERVER}|✔|✘|✘|" in text  # claimed ✘, measured ✔
    assert f"|{ETCD_SERVER}|✘|✔|" in text.split("## Measured vs claimed")[1]
    assert "|Elastic Agent|torch.distributed.elastic.agent.server.ElasticAgent|?|✔|✘|" in text  # not selected
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["hardware"] == "Atlas A2 training"


def test_a_later_run_without_a_hardware_column_does_not_leave_an_earlier_observed_table_behind(tmp_path):
    """The same --out, first a per-hardware run, then a run of the 104-row table and one on an absent device: the
    earlier observed_table.md must not stand beside the new report as if it were this run's measurement. A file of
    the user's by that name (not written by certify) is left as it was."""
    common = ["--impl", "elastic_impl", "--jobs", "1", "-k", "RendezvousParameters.get_as_int", "--out", str(tmp_path)]
    first = run_cli(["certify", "--device", "cpu", "--table", "ascend-2.13", "--hardware", "Atlas A2", *common],
                    timeout=120)
    assert first.returncode == 0 and "|section|API|" in (tmp_path / "observed_table.md").read_text(), first.stderr
    second = run_cli(["certify", "--device", "cpu", *common], timeout=120)
    assert second.returncode == 0, second.stderr
    text = (tmp_path / "observed_table.md").read_text()
    assert text.startswith("# No observed support table:") and "|section|API|" not in text, text
    assert "has no per-hardware columns" in text
    absent = run_cli(["certify", "--device", "npu", *common], timeout=120)
    assert absent.returncode == 3, absent.stderr
    assert "nothing was certified (npu: not available" in (tmp_path / "observed_table.md").read_text()
    mine = "my own notes\n"
    (tmp_path / "observed_table.md").write_text(mine)
    assert run_cli(["certify", "--device", "cpu", *common], timeout=120).returncode == 0
    assert (tmp_path / "observed_table.md").read_text() == mine
