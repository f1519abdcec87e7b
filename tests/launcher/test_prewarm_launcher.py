"""elastic-run --prewarm end to end: the same job, with and without pre-warmed worker interpreters, gives the workers
the same view of how they were started, the same error file and the same exit code, restart included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launcher.conftest import needs_runtime

PROBE = Path(__file__).resolve().parents[1] / "multiprocessing" / "prewarm_scripts" / "probe_worker.py"
pytestmark = [needs_runtime, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")]


def _job(launcher, tmp_path: Path, prewarm: bool, name: str = "", **env: str) -> tuple[int, str, list[dict]]:
    name = name or ("warm" if prewarm else "fresh")
    logs = tmp_path / name
    argv = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1",
            "--log-dir", str(logs), "--redirects", "3", *(["--prewarm"] if prewarm else []), str(PROBE), "slow-raise"]
    # Without --prewarm the pool is off unless a test turns it on: these tests also run with ELASTIC_IMPL_PREWARM=1
    # in the environment (tox -e prewarm).
    env = {"ELASTIC_IMPL_PREWARM": "0", "ELASTIC_IMPL_PREWARM_PRELOAD": "colorsys", **env}
    proc = launcher.start(argv, name=name, **env)
    code = launcher.wait(proc, 180)
    _, err = launcher.output(proc)
    observed = []
    for path in sorted(logs.glob("*/attempt_*/*/stdout.log")):
        seen = json.loads(path.read_text().splitlines()[0])
        seen["env"] = {k: "/".join(v.split("/")[-3:]) for k, v in seen["env"].items()}  # below the random run dir
        seen.pop("ppid")  # each job's own agent
        observed.append(seen)
    return code, err, observed


def test_prewarmed_job_is_indistinguishable_to_its_workers(launcher, tmp_path):
    fresh_code, fresh_err, fresh = _job(launcher, tmp_path, prewarm=False)
    warm_code, warm_err, warm = _job(launcher, tmp_path, prewarm=True)
    assert len(fresh) == len(warm) == 4  # 2 workers x (first attempt + 1 restart)
    assert [w.pop("colorsys_preloaded") for w in warm] == [True] * 4  # every start, restart too, was a fork
    assert [f.pop("colorsys_preloaded") for f in fresh] == [False] * 4
    assert warm == fresh
    assert warm_code == fresh_code == 1
    # The launcher's failure summary names the same root cause, read from the workers' error files.
    assert "RuntimeError: probe failed on purpose" in warm_err and "RuntimeError: probe failed on purpose" in fresh_err


def test_launcher_starts_the_pool_before_setting_up_the_rendezvous(launcher, tmp_path):
    # elastic-run knows the workers' command once it has parsed its options: the pool preloads while the launcher
    # imports torch and sets up the rendezvous handler, and the agent serves every start (restart too) from it.
    code, err, observed = _job(launcher, tmp_path, prewarm=True, LOGLEVEL="INFO")
    assert code == 1
    lines = err.splitlines()
    pools = [i for i, line in enumerate(lines) if "prewarm: interpreter pid" in line]
    set_up = [i for i, line in enumerate(lines) if " elastic_impl.launcher.api: " in line or " elastic_impl.agent." in line]
    assert len(pools) == 1, err[-3000:]
    assert set_up and pools[0] < set_up[0], err[-3000:]
    assert [w["colorsys_preloaded"] for w in observed] == [True] * 4


def test_prewarm_environment_variable_turns_the_pool_on(launcher, tmp_path):
    code, _, observed = _job(launcher, tmp_path, prewarm=False, name="env", ELASTIC_IMPL_PREWARM="1")
    assert code == 1
    assert [w["colorsys_preloaded"] for w in observed] == [True] * 4


# A worker that says whether it was forked from the pool (only a pool told to preload colorsys has it loaded before
# the script runs). The torch import never runs: the launcher's default only reads the script for it.
_DEFAULT_PROBE = """import json, sys
print(json.dumps({"forked": "colorsys" in sys.modules}), flush=True)
if len(sys.argv) > 5:
    import torch  # noqa: F401
"""


def _default_job(launcher, tmp_path: Path, name: str, source: str, *flags: str) -> list[bool]:
    script = tmp_path / f"{name}.py"
    script.write_text(source)
    logs = tmp_path / name
    argv = ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", "--log-dir", str(logs),
            "--redirects", "3", *flags, str(script)]
    proc = launcher.start(argv, name=name, ELASTIC_IMPL_PREWARM="", ELASTIC_IMPL_PREWARM_PRELOAD="colorsys")
    code = launcher.wait(proc, 180)
    _, err = launcher.output(proc)
    assert code == 0, err[-3000:]
    return [json.loads(p.read_text().splitlines()[0])["forked"] for p in sorted(logs.glob("*/attempt_*/*/stdout.log"))]


def test_the_pool_is_on_by_default_for_a_script_that_imports_torch(launcher, tmp_path):
    assert _default_job(launcher, tmp_path, "imports_torch", _DEFAULT_PROBE) == [True, True]
    assert _default_job(launcher, tmp_path, "turned_off", _DEFAULT_PROBE, "--no-prewarm") == [False, False]
    no_torch = _DEFAULT_PROBE.replace("import torch", "import colorsys")
    assert _default_job(launcher, tmp_path, "no_torch", no_torch) == [False, False]
    assert _default_job(launcher, tmp_path, "forced_on", no_torch, "--prewarm") == [True, True]
