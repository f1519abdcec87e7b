"""Bad input to ``elastic-conformance`` and ``python -m conformance.mutation``, as a new user would give it.

The rules: one line on stderr naming the bad value and what is allowed, exit status 2, no traceback, found before any
row runs; an interrupt while the CLI starts (torch loading) still interrupts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conformance import mutation
from conformance.cli import main
from tests.conformance.conftest import REPO_ROOT, run_cli

ONE_ROW = ["certify", "--impl", "torch", "--device", "cpu", "--jobs", "1", "-q", "-k", "RendezvousTimeout.close"]


def _one_line_error(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert "certifying" not in captured.out, "the rows ran before the bad input was found: " + captured.out
    return err


# -- --out ------------------------------------------------------------------------------------------------------------

def test_out_naming_an_existing_file_is_refused_before_any_row_runs_and_the_file_is_kept(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's own file\n")
    assert main([*ONE_ROW, "--out", str(mine)]) == 2
    _one_line_error(capsys, f"--out {str(mine)!r}", "not a directory")
    assert mine.read_text() == "the user's own file\n"


def test_out_that_cannot_be_made_is_refused_before_any_row_runs(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*ONE_ROW, "--out", str(afile / "sub")]) == 2
    _one_line_error(capsys, f"--out {str(afile / 'sub')!r}")


def test_out_holding_a_folder_where_a_report_goes_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "report.json").mkdir()
    (tmp_path / "report.json" / "mine.txt").write_text("kept")
    assert main([*ONE_ROW, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "report.json")
    assert (tmp_path / "report.json" / "mine.txt").read_text() == "kept"


def test_out_naming_a_file_with_an_absent_device_is_bad_input_not_a_traceback(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert main(["certify", "--impl", "torch", "--device", "npu", "--out", str(mine)]) == 2
    _one_line_error(capsys, f"--out {str(mine)!r}")
    assert mine.read_text() == "mine"


def test_checking_out_makes_no_folder(tmp_path):
    # A run stopped after the check (Ctrl-C, a failing row's crash) leaves nothing behind in the user's tree.
    from conformance.cli import _out_problem

    assert _out_problem(str(tmp_path / "new" / "deeper")) is None
    assert list(tmp_path.iterdir()) == []


def test_reports_that_fail_to_write_after_the_run_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    import conformance.report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conformance.report, "write_reports", full_disk)
    assert main([*ONE_ROW, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write the reports to --out {str(tmp_path / 'out')!r}: No space left on device" in err, err


# -- input checked before the device's absence ends the run --------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--jobs", "abc"], "--jobs 'abc'"),
    (["-k", "zzz-no-such-api"], "-k 'zzz-no-such-api'"),
])
def test_bad_input_with_an_absent_device_is_exit_2_not_3(extra, needle, capsys):
    assert main(["certify", "--impl", "torch", "--device", "npu", *extra]) == 2
    _one_line_error(capsys, needle)


# -- -k ---------------------------------------------------------------------------------------------------------------

def test_a_k_substring_matching_no_row_is_named_even_when_another_matches(capsys):
    assert main([*ONE_ROW[:-1], "RendezvousTimeout.close,zzz-typo"]) == 2
    err = _one_line_error(capsys, "'zzz-typo'", "matches no api")
    assert "'RendezvousTimeout.close'" not in err.split(":", 2)[-1].split("matches")[0]


def test_every_mutation_row_pattern_matches_a_row_of_the_table_it_certifies():
    # The mutation runner passes these -k patterns; each substring must keep matching a row.
    from conformance.runner import select
    from conformance.table import load_claims

    rows = load_claims("all-supported").rows
    for mutant in mutation.MUTANTS:
        for needle in mutant.rows.split(","):
            assert select(rows, needle), (mutant.name, needle)


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


# -- --impl -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["raising_impl", "raising_impl.sub"])
def test_an_impl_that_raises_on_import_is_a_one_line_error_naming_the_error(tmp_path, impl):
    (tmp_path / "raising_impl" / "sub").mkdir(parents=True)
    (tmp_path / "raising_impl" / "__init__.py").write_text("raise RuntimeError('boom on import')\n")
    (tmp_path / "raising_impl" / "sub" / "__init__.py").write_text("")
    proc = run_cli(["certify", "--impl", impl, "--device", "cpu", "-k", "RendezvousTimeout.close"],
                   extra_path=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--impl {impl!r} cannot be imported" in proc.stderr, proc.stderr
    assert "RuntimeError: boom on import" in proc.stderr, proc.stderr
    assert "certifying" not in proc.stdout


# -- an interrupt while torch loads -----------------------------------------------------------------------------------

_KICK = textwrap.dedent("""
    import os, signal, sys

    class Kick:  # sends the signal the moment torch starts importing numpy
        done = False

        def find_spec(self, name, path=None, target=None):
            if name == "numpy" and not self.done:
                self.done = True
                os.kill(os.getpid(), signal.{sig})
            return None

    sys.meta_path.insert(0, Kick())
    sys.argv = ["elastic-conformance", *sys.argv[1:]]
    from conformance.cli import console_main
    console_main()
""")


@pytest.mark.parametrize("sig, code, needle", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_while_torch_loads_still_stops_the_cli(sig, code, needle):
    # torch's C++ import of numpy swallows any exception raised in it, KeyboardInterrupt included: Ctrl-C in
    # the first fraction of a second was ignored and the run went on to exit 0.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                         if p))
    proc = subprocess.run([sys.executable, "-c", _KICK.format(sig=sig), *ONE_ROW], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(REPO_ROOT))
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "certifying" not in proc.stdout


# -- python -m conformance.mutation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--timeout", "0", "--only", "interleaved-ranks", "--skip-baseline"], "--timeout '0'"),
    (["--timeout", "-5", "--only", "interleaved-ranks", "--skip-baseline"], "--timeout '-5'"),
    (["--timeout", "nan", "--only", "interleaved-ranks", "--skip-baseline"], "--timeout 'nan'"),
    (["--only", ",", "--skip-baseline"], "--only ','"),
    (["--only", "no-such-mutant", "--skip-baseline"], "unknown mutant(s) no-such-mutant"),
    (["--jobs", "abc"], "--jobs"),
    (["--bogus"], "--bogus"),
])
def test_mutation_bad_input_is_one_line_and_exit_2_before_any_certification(argv, needle, capsys):
    try:
        code = mutation.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and needle in captured.err, captured.err
    assert "KILLED" not in captured.out and "score" not in captured.out, captured.out


def test_mutation_json_that_cannot_be_written_is_refused_before_any_certification(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    try:
        code = mutation.main(["--only", "interleaved-ranks", "--skip-baseline", "--timeout", "1", "--json",
                              str(afile / "out.json")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--json" in captured.err, captured.err
    assert "KILLED" not in captured.out


def test_mutation_list_piped_into_head_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m conformance.mutation --list | head -1", shell=True, text=True,
                          capture_output=True, cwd=str(REPO_ROOT), timeout=60)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
