"""torchrun 2.13's newer options, run side by side under torchrun and elastic-run: --duplicate-std*-filters,
--virtual-local-rank, --signals-to-handle, --logs-specs, --numa-binding (as far as a machine without GPUs allows)."""

from __future__ import annotations

import glob
import os
import signal
import textwrap

import pytest

from tests.launcher.conftest import needs_runtime, wait_for

pytestmark = [pytest.mark.slow, needs_runtime]

TOOLS = ("elastic-run", "torchrun")

# Each line is one write(2) (atomic on a pipe): under torchrun both workers share the launcher's stdout, and print()
# in an unbuffered interpreter writes a line in pieces, which interleaved across ranks ('apple pie from rankENV 0 ...').
_WORKER = """
import os, sys, time
rank = os.environ["RANK"]
def say(fd, *words):
    os.write(fd, (" ".join(str(w) for w in words) + "\\n").encode())
say(1, "apple pie from rank", rank)
say(1, "banana from rank", rank)
say(2, "orange, on stderr from rank", rank)
say(2, "lemon on stderr from rank", rank)
say(1, "ENV", rank, os.environ["LOCAL_RANK"], os.environ.get("CUDA_VISIBLE_DEVICES"))
if os.environ.get("PID_DIR"):
    open(os.path.join(os.environ["PID_DIR"], str(os.getpid())), "w").close()
    time.sleep(120)
"""


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(_WORKER)
    return str(path)


def _run(launcher, argv, tool, timeout=120, **env):
    proc = launcher.start(argv, tool=tool, name=tool, **env)
    rc = launcher.wait(proc, timeout)
    return rc, *launcher.output(proc)


def _lines(text: str, needle: str) -> list[str]:
    return sorted(line for line in text.splitlines() if needle in line)


def test_duplicate_filters_copy_the_same_teed_lines_as_torchrun(launcher, tmp_path, worker):
    copied = {}
    for tool in TOOLS:
        log_dir = tmp_path / f"logs-{tool}"
        rc, out, err = _run(launcher, ["--standalone", "--nproc-per-node", "2", "--tee", "3", "--log-dir",
                                       str(log_dir), "--duplicate-stdout-filters", "apple,orange",
                                       "--duplicate-stderr-filters", "orange,,", worker], tool)
        assert rc == 0, err[-3000:]
        files = {}
        for stream in ("stdout", "stderr"):
            [path] = glob.glob(str(log_dir / "*" / "attempt_0" / f"filtered_{stream}.log"))
            with open(path) as f:
                files[stream] = sorted(f.read().splitlines())
        copied[tool] = files
    assert copied["elastic-run"] == copied["torchrun"]
    # 'apple' and 'orange' on stdout: only the apple lines; 'orange,' (',,' = a comma) on stderr: only that line.
    assert copied["torchrun"] == {
        "stdout": ["[default0]:apple pie from rank 0", "[default1]:apple pie from rank 1"],
        "stderr": ["[default0]:orange, on stderr from rank 0", "[default1]:orange, on stderr from rank 1"],
    }


def test_duplicate_filters_without_tee_copy_nothing_as_torchrun(launcher, tmp_path, worker):
    # The filters copy what is teed; without --tee the files exist and stay empty under both (our default stderr
    # capture must not tee stderr into them unasked).
    for tool in TOOLS:
        log_dir = tmp_path / f"logs-{tool}"
        rc, _, err = _run(launcher, ["--standalone", "--nproc-per-node", "1", "--log-dir", str(log_dir),
                                     "--duplicate-stderr-filters", "orange", worker], tool)
        assert rc == 0, err[-3000:]
        [path] = glob.glob(str(log_dir / "*" / "attempt_0" / "filtered_stderr.log"))
        assert os.path.getsize(path) == 0, (tool, open(path).read())
        assert _lines(err, "orange, on stderr") == ["orange, on stderr from rank 0"], (tool, err[-2000:])


@pytest.mark.parametrize("visible", [None, "5,7"], ids=["no-CUDA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES=5,7"])
def test_virtual_local_rank_gives_the_same_env_as_torchrun(launcher, worker, visible):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    seen = {}
    for tool in TOOLS:
        rc, out, err = _run(launcher, ["--standalone", "--nproc-per-node", "2", "--virtual-local-rank", worker],
                            tool, **env)
        assert rc == 0, err[-3000:]
        seen[tool] = _lines(out, "ENV")
    assert seen["elastic-run"] == seen["torchrun"]
    expected = ["ENV 0 0 5", "ENV 1 0 7"] if visible else ["ENV 0 0 0", "ENV 1 0 1"]
    assert seen["torchrun"] == expected


def test_virtual_local_rank_with_too_few_visible_devices_fails_as_torchrun(launcher, worker):
    for tool in TOOLS:
        rc, _, err = _run(launcher, ["--standalone", "--nproc-per-node", "2", "--virtual-local-rank", worker],
                          tool, CUDA_VISIBLE_DEVICES="3")
        assert rc == 1, (tool, err[-3000:])
        assert "CUDA_VISIBLE_DEVICES" in err and ("'3'" in err or "=3" in err), (tool, err[-3000:])


def _pids(pid_dir) -> set[int]:
    return {int(name) for name in os.listdir(pid_dir)} if os.path.isdir(pid_dir) else set()


def _alive(pid: int) -> bool:
    from fault_injection.processes import is_alive

    return is_alive(pid)


def test_signals_to_handle_sigusr1_stops_the_workers_as_torchrun(launcher, tmp_path, worker):
    codes = {}
    for tool in TOOLS:
        pid_dir = tmp_path / f"pids-{tool}"
        pid_dir.mkdir()
        proc = launcher.start(["--standalone", "--nproc-per-node", "2", "--signals-to-handle", "SIGTERM,SIGUSR1",
                               worker], tool=tool, name=tool, PID_DIR=pid_dir)
        wait_for(lambda d=pid_dir: len(_pids(d)) == 2, 60, f"{tool}: both workers running")
        os.kill(proc.pid, signal.SIGUSR1)
        codes[tool] = launcher.wait(proc, 60)
        assert not [p for p in _pids(pid_dir) if _alive(p)], f"{tool}: a worker outlived the agent"
    # Both handle it (without the option SIGUSR1's default action kills the agent: -10). torchrun exits 1 with a
    # SignalException traceback; ours exits 128 + the signal, as for any handled signal.
    assert codes == {"torchrun": 1, "elastic-run": 128 + signal.SIGUSR1}


def test_bad_signal_name_is_one_line_naming_it(launcher, worker):
    # (torchrun logs a warning with a traceback and runs without handling it.)
    rc, _, err = _run(launcher, ["--standalone", "--signals-to-handle", "SIGTERM,SIGFOO", worker], "elastic-run")
    assert rc == 2
    [line] = err.strip().splitlines()
    assert "'SIGFOO'" in line and "SIGUSR1" in line, line
    rc, _, err = _run(launcher, ["--standalone", "--signals-to-handle", "SIGKILL", worker], "elastic-run")
    assert rc == 2 and "'SIGKILL'" in err and len(err.strip().splitlines()) == 1, err


def test_numa_binding_choices_and_no_gpu_fail_as_torchrun(launcher, worker):
    for tool in TOOLS:
        rc, _, err = _run(launcher, ["--standalone", "--numa-binding", "bogus", worker], tool)
        assert rc == 2 and "'bogus'" in err and "core-complex" in err, (tool, err[-2000:])
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs: the no-GPU failure cannot be seen here")
    for tool in TOOLS:
        rc, _, err = _run(launcher, ["--standalone", "--numa-binding", "node", worker], tool)
        assert rc == 1, (tool, err[-2000:])
    # Ours says why on one line, before joining the rendezvous (torchrun: a traceback ending in "Torch not compiled
    # with CUDA enabled").
    assert err.strip() != ""
    rc, _, err = _run(launcher, ["--standalone", "--numa-binding", "node", worker], "elastic-run")
    [line] = err.strip().splitlines()
    assert "needs GPU 0" in line and "0 GPU(s)" in line, line


_PLUGIN = """
import os
from {base_module} import DefaultLogsSpecs, Std


class EverythingToFiles(DefaultLogsSpecs):
    # Whatever the command line says: all streams of every rank into files under $PLUGIN_LOG_DIR.
    def __init__(self, log_dir=None, redirects=Std.NONE, tee=Std.NONE, local_ranks_filter=None):
        super().__init__(log_dir=os.environ["PLUGIN_LOG_DIR"], redirects=Std.ALL, tee=Std.NONE)
"""


def test_logs_specs_entry_point_is_used_as_by_torchrun(launcher, tmp_path, worker):
    site = tmp_path / "site"
    (site / "logs_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "logs_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: logs-plugin\n"
                                                                  "Version: 1.0\n")
    (site / "logs_plugin-1.0.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [torchrun.logs_specs]
        to_files_torch = logs_plugin_torch:EverythingToFiles
        to_files_ours = logs_plugin_ours:EverythingToFiles
        """))
    (site / "logs_plugin_torch.py").write_text(_PLUGIN.format(base_module="torch.distributed.elastic.multiprocessing"))
    (site / "logs_plugin_ours.py").write_text(_PLUGIN.format(base_module="elastic_impl.multiprocessing"))
    pythonpath = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    for tool, name in (("torchrun", "to_files_torch"), ("elastic-run", "to_files_ours")):
        log_dir = tmp_path / f"plugin-logs-{tool}"
        rc, out, err = _run(launcher, ["--standalone", "--nproc-per-node", "2", "--logs-specs", name, worker], tool,
                            PYTHONPATH=pythonpath, PLUGIN_LOG_DIR=log_dir)
        assert rc == 0, (tool, err[-3000:])
        assert "apple pie" not in out, (tool, out)  # redirected by the plugin, not shown
        stdouts = sorted(glob.glob(str(log_dir / "*" / "attempt_0" / "*" / "stdout.log")))
        assert len(stdouts) == 2, (tool, stdouts)
        assert "apple pie from rank" in open(stdouts[0]).read()
    rc, _, err = _run(launcher, ["--standalone", "--logs-specs", "nope", worker], "torchrun", PYTHONPATH=pythonpath)
    assert rc == 1 and "torchrun.logs_specs[nope]" in err
    rc, _, err = _run(launcher, ["--standalone", "--logs-specs", "nope", worker], "elastic-run",
                      PYTHONPATH=pythonpath)
    [line] = err.strip().splitlines()
    assert rc == 2 and "'nope'" in line and "to_files_ours" in line, line
    # A plugin written for torchrun is not ours: said on one line.
    rc, _, err = _run(launcher, ["--standalone", "--logs-specs", "to_files_torch", worker], "elastic-run",
                      PYTHONPATH=pythonpath)
    [line] = err.strip().splitlines()
    assert rc == 2 and "elastic_impl.multiprocessing.LogsSpecs" in line, line
