"""The certifier must catch deliberately broken implementations, and not flag the correct one."""

from __future__ import annotations

import json

from conformance import runner
from conformance.adapters import Adapter
from conformance.device import detect
from conformance.table import load_table

from .conftest import TABLE, run_cli

GET_AS_INT = "torch.distributed.elastic.rendezvous.RendezvousParameters.get_as_int"
CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


def test_planted_get_as_int_is_a_violation_with_nonzero_exit(planted_impl, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "-k", "RendezvousParameters.get_as_int",
                    "--out", str(out)], extra_path=planted_impl)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VIOLATION" in proc.stdout and "certification FAILED" in proc.stderr
    (row,) = json.loads((out / "report.json").read_text())["results"]
    assert (row["api"], row["claimed"], row["observed"], row["verdict"]) == (GET_AS_INT, "yes", "fail", "VIOLATION")
    assert "get_as_int('42')" in row["error"] and "43" in row["error"]
    # The per-assertion results (web-platform-tests layout): the check ran (OK), the signature expectation passed,
    # and the failed expectation is a FAIL subtest with its message.
    (test,) = json.loads((out / "wpt.json").read_text())["results"]
    assert (test["test"], test["status"], test["verdict"]) == (GET_AS_INT, "OK", "VIOLATION")
    statuses = [(sub["name"], sub["status"]) for sub in test["subtests"]]
    assert statuses[0] == ("signature as documented", "PASS")
    assert statuses[-1][1] == "FAIL" and "43" in test["subtests"][-1]["message"]


def test_the_reference_passes_the_same_row(tmp_path):
    proc = run_cli(["certify", "--impl", "torch", "--device", "cpu", "-k", "RendezvousParameters.get_as_int"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CONFORMS" in proc.stdout


class BrokenChildFailedAdapter(Adapter):
    """Upstream, except that ChildFailedError blames the LAST failure instead of the first (root cause)."""

    def __init__(self) -> None:
        super().__init__("broken-child-failed", "torch.distributed.elastic", "torch.distributed.run")

    def resolve(self, api):
        obj = super().resolve(api)
        if api != CHILD_FAILED:
            return obj

        class ChildFailedError(obj):
            def get_first_failure(self):
                rank = max(self.failures, key=lambda r: self.failures[r].timestamp)
                return rank, self.failures[rank]

        return ChildFailedError


def test_planted_child_failed_error_is_a_violation(tmp_path):
    rows = [r for r in load_table(TABLE) if r.api == CHILD_FAILED]
    broken = runner.certify(rows, BrokenChildFailedAdapter(), detect("cpu"), workdir=tmp_path)
    assert [r.verdict for r in broken] == ["VIOLATION"]
    assert "root cause rank" in broken[0].error
    assert runner.exit_code(broken) == 1
    honest = runner.certify(rows, Adapter("torch", "torch.distributed.elastic", "torch.distributed.run"),
                            detect("cpu"), workdir=tmp_path)
    assert [r.verdict for r in honest] == ["CONFORMS"]


def test_missing_module_is_a_violation_naming_it(planted_impl, tmp_path):
    # planted_impl has no timer package at all.
    proc = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "-k", "timer.configure", "-q"],
                   extra_path=planted_impl)
    assert proc.returncode == 1
    assert "planted_impl has no submodule or attribute 'timer'" in proc.stdout


def test_claimed_unsupported_rows_do_not_fail_the_certification(planted_impl, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["certify", "--impl", "planted_impl", "--device", "cpu", "-k", "etcd_store.EtcdStore.add",
                    "--out", str(out)], extra_path=planted_impl)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads((out / "report.json").read_text())["results"]
    assert (row["claimed"], row["observed"], row["verdict"]) == ("no", "fail", "CLAIMED-UNSUPPORTED")
    assert "planted_impl" in row["error"]  # what actually happened is recorded


CLOSE_TIMEOUT = "torch.distributed.elastic.rendezvous.dynamic_rendezvous.RendezvousTimeout.close"
HANDLER = "torch.distributed.elastic.rendezvous.dynamic_rendezvous.DynamicRendezvousHandler"


class CloseTimeoutIgnoredAdapter(Adapter):
    """Ours, except that set_closed() keeps retrying for an hour instead of giving up after timeout.close."""

    def __init__(self) -> None:
        super().__init__("close-timeout-ignored", "elastic_impl", "elastic_impl.run")

    def resolve(self, api):
        obj = super().resolve(api)
        if api != HANDLER:
            return obj

        class DynamicRendezvousHandler(obj):
            def set_closed(self):
                self._run("close", 3600.0)

        return DynamicRendezvousHandler


def test_set_closed_ignoring_the_close_timeout_is_a_violation(tmp_path):
    rows = [r for r in load_table(TABLE) if r.api == CLOSE_TIMEOUT]
    (broken,) = runner.certify(rows, CloseTimeoutIgnoredAdapter(), detect("cpu"), workdir=tmp_path)
    assert broken.verdict == "VIOLATION"
    assert "still retrying a contended store" in broken.error
    honest = runner.certify(rows, Adapter("elastic_impl", "elastic_impl", "elastic_impl.run"), detect("cpu"),
                            workdir=tmp_path)
    assert [r.verdict for r in honest] == ["CONFORMS"]
