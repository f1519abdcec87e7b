from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

from .conftest import REPO_ROOT


def _plugin_args() -> list[str]:
    # Installed, the package registers the plugin through its pytest11 entry point; otherwise load it by name.
    registered = any(ep.value == "conformance.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if registered else ["-p", "conformance.pytest_plugin"]


def _pytest(tmp_path, *args, extra_path=None):
    (tmp_path / "conftest.py").write_text("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(extra_path or ""), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "pytest", *_plugin_args(), "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--rootdir", str(tmp_path), str(tmp_path), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path),
    )


def test_one_item_per_row_and_passing_rows(tmp_path):
    proc = _pytest(tmp_path, "--conformance-impl=torch", "--conformance-device=cpu", "-k", "RendezvousParameters")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "4 passed, 100 deselected" in proc.stdout


def test_planted_violation_fails_the_item(tmp_path, planted_impl):
    proc = _pytest(tmp_path, "--conformance-impl=planted_impl", "--conformance-device=cpu", "-k", "get_as_int",
                   extra_path=planted_impl)
    assert proc.returncode == 1
    assert "VIOLATION: CheckFailed: get_as_int('42')" in proc.stdout
    assert "1 failed, 103 deselected" in proc.stdout


def test_bad_impl_is_a_usage_error(tmp_path):
    proc = _pytest(tmp_path, "--conformance-impl=no_such_impl_pkg")
    assert proc.returncode == 4
    assert "--impl 'no_such_impl_pkg' is not importable" in proc.stderr


def test_no_items_without_the_option(tmp_path):
    proc = _pytest(tmp_path)
    assert proc.returncode == 5  # nothing collected


def test_an_absent_device_is_a_usage_error_nothing_runs(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        import pytest

        pytest.skip("torch_npu is installed here")
    proc = _pytest(tmp_path, "--conformance-impl=elastic_impl", "--conformance-device=npu", "-k", "RendezvousParameters")
    assert proc.returncode == 4, proc.stdout[-2000:]  # device-free rows would otherwise pass "on npu"
    assert "npu: not available on this machine: torch_npu is not installed; nothing certified" in proc.stderr
    assert "passed" not in proc.stdout


def test_the_readmes_command_collects_only_the_rows():
    """README: ``pytest --conformance-impl=torch --conformance-device=cpu`` from the repository root. Named no paths,
    it is the rows alone (seen failing before: 977 items, the repository's tests collected with the 104 rows)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *_plugin_args(), "-p", "no:cacheprovider", "-p", "no:xdist",
         "--conformance-impl=torch", "--conformance-device=cpu", "--collect-only", "-q"],
        capture_output=True, text=True, timeout=240, cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    items = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(items) == 104 and all("::conformance[torch]::" in line for line in items), proc.stdout[-2000:]
    assert "104 tests collected" in proc.stdout
