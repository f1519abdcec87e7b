"""The same script under upstream torchrun and under elastic-run: same worker env, restarts, exit codes, report."""

from __future__ import annotations

import pytest

from tests.launcher.conftest import TRAIN, needs_runtime, read_markers

pytestmark = [pytest.mark.slow, needs_runtime]

# Values that must be identical under both launchers (the rest is per-run: ports, run ids, file paths).
# TORCHELASTIC_USE_AGENT_STORE differs by design: our workers get a fresh store per round (no stale keys).
SAME_VALUE = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
)
ARGS = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1"]


def _run(launcher, tmp_path, tool: str, **env):
    markers = tmp_path / f"markers-{tool}"
    launcher.marker_dirs.append(markers)
    proc = launcher.start([*ARGS, TRAIN], tool=tool, name=tool, MARKER_DIR=markers, **env)
    rc = launcher.wait(proc, 180)
    return rc, launcher.output(proc)[1], read_markers(markers)


def _view(markers):
    """Per (rank, attempt): which contract vars were set, and the values that must match."""
    return {
        (m["RANK"], m["TORCHELASTIC_RESTART_COUNT"]): (
            sorted(k for k, v in m.items() if v is not None and k.isupper()),
            {k: m[k] for k in SAME_VALUE},
        )
        for m in markers
    }


def test_restart_then_success_matches_torchrun(launcher, tmp_path):
    env = dict(TRAIN_FAIL_RANK="0", TRAIN_FAIL_ATTEMPT="0", TRAIN_FAIL_MODE="exit", TRAIN_STEPS="20", TRAIN_STEP_SECONDS="0.1",
               TRAIN_FAIL_AFTER_MARKERS="1")  # both ranks record attempt 0 under either launcher (no start race)
    ours = _run(launcher, tmp_path, "elastic-run", **env)
    theirs = _run(launcher, tmp_path, "torchrun", **env)
    assert ours[0] == theirs[0] == 0, (ours[1][-3000:], theirs[1][-3000:])
    assert _view(ours[2]) == _view(theirs[2])
    assert {k[1] for k in _view(ours[2])} == {"0", "1"}


def test_exhausted_restarts_match_torchrun_exit_code_and_report(launcher, tmp_path):
    env = dict(TRAIN_FAIL_RANK="1", TRAIN_FAIL_MODE="raise", TRAIN_FAIL_AFTER_MARKERS="1")
    ours = _run(launcher, tmp_path, "elastic-run", **env)
    theirs = _run(launcher, tmp_path, "torchrun", **env)
    assert ours[0] == theirs[0] == 1
    assert _view(ours[2]) == _view(theirs[2])
    for err in (ours[1], theirs[1]):
        assert "Root Cause" in err and "InjectedFailure" in err and "rank" in err, err[-3000:]


_SAYS_RANK = """
import os, sys
print("stdout of local rank", os.environ["LOCAL_RANK"], flush=True)
print("stderr of local rank", os.environ["LOCAL_RANK"], file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("extra", [[], ["--tee", "3"]], ids=["no-tee", "tee"])
def test_local_ranks_filter_shows_the_same_ranks_as_torchrun(launcher, tmp_path, extra):
    # Without --tee, torchrun sends the filtered-out ranks' console output to /dev/null (ours used to print it).
    script = tmp_path / "says_rank.py"
    script.write_text(_SAYS_RANK)
    shown = {}
    for tool in ("elastic-run", "torchrun"):
        proc = launcher.start(["--standalone", "--nproc-per-node", "2", "--local-ranks-filter", "0", *extra,
                               str(script)], tool=tool, name=tool)
        assert launcher.wait(proc, 120) == 0, launcher.output(proc)
        out, err = launcher.output(proc)
        shown[tool] = (
            [line for line in out.splitlines() if "of local rank" in line],
            [line for line in err.splitlines() if "of local rank" in line],
        )
    assert shown["elastic-run"] == shown["torchrun"]
    assert [line.endswith("rank 0") for line in shown["torchrun"][0]] == [True]
