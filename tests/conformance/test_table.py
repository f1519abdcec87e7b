from __future__ import annotations

import pytest

from conformance.adapters import reference_adapter
from conformance.cli import main
from conformance.table import TableError, load_table, parse_csv, parse_markdown, validate_paths

from .conftest import TABLE

HEADER = "|api|supported|notes|\n|--|--|--|\n"


def test_published_table_parses_into_104_rows():
    rows = load_table(TABLE)
    assert len(rows) == 104
    assert sum(not r.supported for r in rows) == 13
    assert all(r.api.startswith("torch.distributed.elastic.") for r in rows)
    first = rows[0]
    assert (first.api, first.supported, first.notes) == ("torch.distributed.elastic.agent.server.ElasticAgent", True, "-")


def test_csv_table_gives_the_same_rows(tmp_path):
    rows = load_table(TABLE)
    csv_path = tmp_path / "table.csv"
    csv_path.write_text("api,supported,notes\n" + "".join(f"{r.api},{r.claimed},{r.notes}\n" for r in rows))
    again = load_table(csv_path)
    assert [(r.api, r.supported, r.notes) for r in again] == [(r.api, r.supported, r.notes) for r in rows]


def test_csv_without_suffix_is_sniffed(tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("api,supported,notes\ntorch.distributed.elastic.timer.configure,YES,fine\n")
    (row,) = load_table(path)
    assert row.supported and row.notes == "fine"


@pytest.mark.parametrize(
    "body, line, needle",
    [
        ("|torch.distributed.elastic.timer.configure|yes|\n", 5, "expected 3 cells"),
        ("|torch.distributed.elastic.timer.configure|maybe|-|\n", 5, "'maybe'"),
        ("|torch.nn.Linear|yes|-|\n", 5, "'torch.nn.Linear'"),
        ("|torch.distributed.elastic.timer.configure|yes|-\n", 5, "must start and end with '|'"),
        ("|torch.distributed.elastic.timer.configure|yes|-|\n|torch.distributed.elastic.timer.configure|no|-|\n",
         6, "duplicate api"),
    ],
)
def test_malformed_markdown_gives_one_line_error_naming_the_line(body, line, needle):
    with pytest.raises(TableError) as info:
        parse_markdown("# title\n\n" + HEADER + body, "t.md")
    message = str(info.value)
    assert "\n" not in message
    assert needle in message
    assert message.startswith(f"t.md:{line}: ")


def test_missing_header_and_bad_csv():
    with pytest.raises(TableError, match="no table with header"):
        parse_markdown("just text\n", "t.md")
    with pytest.raises(TableError, match=r"^t.csv:1: header must be api\|supported\|notes"):
        parse_csv("name,ok\n", "t.csv")
    with pytest.raises(TableError, match=r"^t.csv:2: expected 3 cells"):
        parse_csv("api,supported,notes\ntorch.distributed.elastic.timer.configure,yes\n", "t.csv")


def test_unknown_api_path_is_rejected_against_the_reference():
    rows = parse_markdown(HEADER + "|torch.distributed.elastic.timer.configure|yes|-|\n"
                          "|torch.distributed.elastic.timer.NoSuchTimer|yes|-|\n", "t.md")
    with pytest.raises(TableError) as info:
        validate_paths(rows, reference_adapter().exists, "t.md")
    assert str(info.value) == ("t.md:4: api torch.distributed.elastic.timer.NoSuchTimer does not exist in the "
                               "reference implementation")


def test_cli_reports_malformed_table_in_one_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.md"
    bad.write_text(HEADER + "|torch.distributed.elastic.timer.configure|sometimes|-|\n")
    assert main(["certify", "--impl", "torch", "--device", "cpu", "--table", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "bad.md:3" in err and "'sometimes'" in err and "Traceback" not in err


def test_cli_missing_table_file(tmp_path, capsys):
    assert main(["certify", "--impl", "torch", "--table", str(tmp_path / "nope.md")]) == 2
    assert "cannot read table" in capsys.readouterr().err


def test_bundled_table_matches_the_published_one():
    from pathlib import Path

    published = Path("/work/shared/support_table.md")
    if not published.exists():
        pytest.skip("the published table is not on this machine")
    assert [(r.api, r.supported) for r in load_table(TABLE)] == [(r.api, r.supported) for r in load_table(published)]


def test_cli_certifies_the_rows_of_a_csv_table(tmp_path, capsys):
    table = tmp_path / "ours.csv"
    table.write_text("api,supported,notes\n"
                     "torch.distributed.elastic.rendezvous.RendezvousParameters.get_as_int,yes,-\n"
                     "torch.distributed.elastic.timer.TimerRequest,no,claimed unsupported here\n")
    out = tmp_path / "out"
    assert main(["certify", "--impl", "torch", "--device", "cpu", "--jobs", "1", "-q", "--table", str(table),
                 "--out", str(out)]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["table"] == "ours.csv"
    assert [(r["api"].rsplit(".", 1)[-1], r["verdict"]) for r in report["results"]] == [
        ("get_as_int", "CONFORMS"), ("TimerRequest", "UNDOCUMENTED-SUPPORT")]


def test_cli_rejects_a_csv_row_naming_an_api_that_does_not_exist(tmp_path, capsys):
    table = tmp_path / "typo.csv"
    table.write_text("api,supported,notes\ntorch.distributed.elastic.timer.FileTimerSever,yes,-\n")
    assert main(["certify", "--impl", "elastic_impl", "--device", "cpu", "--table", str(table)]) == 2
    err = capsys.readouterr().err
    assert err == ("elastic-conformance: error: typo.csv:2: api torch.distributed.elastic.timer.FileTimerSever "
                   "does not exist in the reference implementation\n")
