"""Pre-warmed worker interpreters: a worker forked from the pool is indistinguishable to its script from a fresh
``python -u script.py`` (real processes, real fork server); anything the pool cannot reproduce starts fresh."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from elastic_impl.multiprocessing import DefaultLogsSpecs, Std, prewarm, start_processes
from elastic_impl.multiprocessing.api import SubprocessContext
from elastic_impl.multiprocessing.prewarm import (
    ForkedProcess,
    WorkerPool,
    close_early,
    pool_for,
    prewarm_from_env,
    serving,
    start_early,
)

SCRIPTS = Path(__file__).resolve().parent / "prewarm_scripts"
PROBE = SCRIPTS / "probe_worker.py"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pre-warmed workers are Linux only")


@pytest.fixture
def pool(monkeypatch):
    # The probe imports elastic_impl; preloading json (not torch) keeps the test fast. PYTHONPATH is set before the
    # pool starts, so the workers' environment differs from the pool's only in what the launcher sets per worker.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SCRIPTS.parents[2]), os.environ.get("PYTHONPATH")])))
    # Started by each test (``_warm``), not here: pytest changes PYTEST_CURRENT_TEST between setup and call, and a
    # worker environment that differs from the pool's in anything but per-worker variables starts fresh.
    warm = WorkerPool(preload=["json"])
    yield warm
    warm.close()


def _warm(pool: WorkerPool) -> WorkerPool:
    pool.start()
    assert pool.wait_ready(60) is None
    return pool


def _run(tmp_path: Path, args: tuple, pool: WorkerPool | None, name: str, how: str = "ok"):
    args = (*args, how, "b c")
    with serving(pool):
        ctx = start_processes(name=name, entrypoint=sys.executable, args={0: args}, envs={0: {"RANK": "5", "LOCAL_RANK": "0"}},
                              logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / name), redirects=Std.ALL))
    try:
        result = ctx.wait(60, period=0.05)
        assert result is not None, "worker did not finish"
        assert isinstance(ctx, SubprocessContext)
        proc_type = type(ctx.subprocess_handlers[0].proc)
        out = Path(result.stdouts[0]).read_text()
        err = Path(result.stderrs[0]).read_text()
        failure = result.failures.get(0)
        error_file = None
        if failure is not None and failure.error_file and os.path.exists(failure.error_file):
            error_file = json.loads(Path(failure.error_file).read_text())["message"]["message"]
        return {
            "observed": json.loads(out.splitlines()[0]),
            "stderr": err,
            "exitcode": failure.exitcode if failure else 0,
            "error_file_message": error_file,
        }, proc_type
    finally:
        ctx.close(timeout=5)


def _comparable(run: dict, tmp_path: Path, name: str) -> dict:
    # The error file is in the context's own (randomly named) log directory; compare where in it.
    observed = dict(run["observed"])
    observed["env"] = {k: "/".join(v.split("/")[-3:]) for k, v in observed["env"].items()}
    return {**run, "observed": observed}


@pytest.mark.parametrize("how", ["ok", "raise", "exit3", "interrupt", "sigterm"])
@pytest.mark.parametrize("as_module", [False, True], ids=["script", "module"])
def test_forked_worker_sees_what_a_fresh_one_sees(tmp_path, monkeypatch, pool, how, as_module):
    monkeypatch.chdir(SCRIPTS if as_module else tmp_path)
    _warm(pool)
    args = ("-u", "-m", "probe_worker") if as_module else ("-u", str(PROBE))
    fresh, fresh_type = _run(tmp_path, args, None, "fresh", how)
    forked, forked_type = _run(tmp_path, args, pool, "forked", how)
    assert (fresh_type.__name__, forked_type) == ("Popen", ForkedProcess)  # really one of each
    assert pool.forked == 1
    assert _comparable(forked, tmp_path, "forked") == _comparable(fresh, tmp_path, "fresh")
    expected = {"ok": 0, "raise": 1, "exit3": 3, "interrupt": -signal.SIGINT, "sigterm": -signal.SIGTERM}[how]
    assert forked["exitcode"] == expected
    assert forked["observed"]["ppid"] == os.getpid() and forked["observed"]["own_session"]
    if how == "raise":
        assert forked["error_file_message"] == "RuntimeError: probe failed on purpose"
        assert "_zygote" not in forked["stderr"]  # the traceback is the script's own, as in a fresh interpreter


@pytest.mark.parametrize("options", [(), ("-B", "-E")], ids=["none", "-B-E"])
def test_pool_takes_the_workers_own_interpreter_options(tmp_path, monkeypatch, options):
    # Workers started through the API often run ``python -m module`` without elastic-run's -u: a pool for them starts
    # its interpreter with their options (stdio buffering follows them), instead of never serving a fork.
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # ignored under -E, as by a fresh interpreter
    monkeypatch.chdir(SCRIPTS.parents[2])  # the repository: -m puts it first on sys.path (-E ignores PYTHONPATH)
    args = (*options, "-m", "tests.multiprocessing.prewarm_scripts.probe_worker")
    pool = WorkerPool.for_entrypoint(sys.executable, args, preload=["json"])
    assert pool is not None and pool.flags == options
    with pool:
        assert pool.wait_ready(60) is None
        fresh, fresh_type = _run(tmp_path, args, None, "fresh")
        forked, forked_type = _run(tmp_path, args, pool, "forked")
    assert (fresh_type.__name__, forked_type, pool.forked) == ("Popen", ForkedProcess, 1)
    assert _comparable(forked, tmp_path, "forked") == _comparable(fresh, tmp_path, "fresh")
    assert forked["observed"]["stdio"][2] == ("-E" not in options)  # write_through: unbuffered or not


def test_forked_worker_has_the_preloaded_modules_and_is_stopped_like_a_fresh_one(tmp_path, pool):
    script = tmp_path / "sleeper.py"
    script.write_text("import sys, time\nprint('json' in sys.modules, flush=True)\ntime.sleep(60)\n")
    _warm(pool)
    with serving(pool):
        ctx = start_processes(name="sleep", entrypoint=sys.executable, args={0: ("-u", str(script))},
                              envs={0: {"RANK": "0"}}, logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs"),
                                                                                 redirects=Std.ALL))
    try:
        assert ctx.wait(1, period=0.05) is None  # still running
        pid = ctx.pids()[0]
        assert os.getpgid(pid) == pid
    finally:
        ctx.close(timeout=5)
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped by the context, as a Popen child
    assert Path(ctx.stdouts[0]).read_text() == "True\n"


def test_the_collector_leaves_preloaded_objects_alone_and_collects_the_scripts(tmp_path, pool):
    # The zygote freezes what the preload created (CPython's advice for forking without exec): a worker's exit does
    # not walk torch's objects (0.4-1 s -> 0.1-0.2 s here), and its pages stay shared. The script's own garbage is
    # collected as usual.
    script = tmp_path / "gc_probe.py"
    script.write_text("import gc, json\ncycle = []\ncycle.append(cycle)\ndel cycle\n"
                      "print(json.dumps([gc.get_freeze_count(), gc.collect()]), flush=True)\n")
    _warm(pool)
    with serving(pool):
        ctx = start_processes(name="gc", entrypoint=sys.executable, args={0: ("-u", str(script))}, envs={0: {}},
                              logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs"), redirects=Std.ALL))
    try:
        assert ctx.wait(60, period=0.05) is not None
    finally:
        ctx.close(timeout=5)
    frozen, collected = json.loads(Path(ctx.stdouts[0]).read_text())
    assert pool.forked == 1 and frozen > 1000 and collected >= 1


def test_what_the_pool_cannot_reproduce_starts_fresh_and_is_logged_once(tmp_path, pool, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="elastic_impl.multiprocessing.prewarm")
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    _warm(pool)
    monkeypatch.setenv("PYTHONHASHSEED", "7")  # read at interpreter start: the pool's interpreter has another one
    for _ in range(2):
        assert pool.spawn(sys.executable, ["-u", str(script)], dict(os.environ), None, None) is None
    assert pool.spawn("/bin/echo", ["hi"], dict(os.environ), None, None) is None
    assert pool.spawn(sys.executable, ["-X", "dev", str(script)], dict(os.environ), None, None) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "'PYTHONHASHSEED'" in m]) == 1  # once, however often it happens
    assert any("'/bin/echo' is not the pool's interpreter" in m for m in messages)
    assert any("interpreter options ['-X'] differ from the pool's ['-u']" in m for m in messages)
    assert WorkerPool.for_entrypoint(sys.executable, ["-X", "dev", str(script)]) is None
    assert "interpreter option '-X' is not one a pool can start with (allowed: -B, -E," in caplog.text
    assert pool.forked == 0


def test_agent_skips_the_pool_for_binaries_and_functions(caplog):
    caplog.set_level(logging.WARNING, logger="elastic_impl.multiprocessing.prewarm")
    assert WorkerPool.for_entrypoint("/bin/echo", ["hi"]) is None
    assert WorkerPool.for_entrypoint(print, []) is None
    assert WorkerPool.for_entrypoint(sys.executable, ["-u", str(PROBE)]) is not None
    assert "fresh interpreter" in caplog.text


@pytest.mark.parametrize("when", ["preloading", "ready"])
def test_closing_the_pool_is_immediate_and_quiet(tmp_path, monkeypatch, capfd, when):
    # A preload that takes 3 s to import (like torch on a loaded machine) and 3 s to finalise (torch: ~1 s): the
    # agent's run() returns right after its workers, whatever state the pool's interpreter is in.
    (tmp_path / "slow_preload.py").write_text(
        "import atexit, time\ntime.sleep(3 if 'IMPORT' in __import__('os').environ['SLOW'] else 0)\n"
        "atexit.register(time.sleep, 3)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("SLOW", "IMPORT" if when == "preloading" else "EXIT")
    pool = WorkerPool(preload=["slow_preload"])
    pool.start()
    if when == "ready":
        assert pool.wait_ready(60) is None
    zygote = pool.pid
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 1.5
    assert not os.path.exists(f"/proc/{zygote}")
    time.sleep(3.5)  # had it lived on, it would have written its traceback by now
    assert "Traceback" not in capfd.readouterr().err


def test_a_preload_that_fails_makes_workers_start_fresh(tmp_path):
    with WorkerPool(preload=["no_such_module_anywhere"]) as broken:
        reason = broken.wait_ready(60)
        assert reason and "no_such_module_anywhere" in reason
        assert broken.spawn(sys.executable, ["-u", str(PROBE)], dict(os.environ), None, None) is None


def test_bad_prewarm_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("ELASTIC_IMPL_PREWARM", "maybe")
    with pytest.raises(ValueError, match=r"^invalid ELASTIC_IMPL_PREWARM: 'maybe' \(allowed: 1/true"):
        prewarm_from_env()
    monkeypatch.setenv("ELASTIC_IMPL_PREWARM_PRELOAD", "torch,no way")
    with pytest.raises(ValueError, match="'no way' is not a module name"):
        WorkerPool()


def test_the_agent_takes_the_pool_the_launcher_started_early(monkeypatch):
    monkeypatch.setenv("ELASTIC_IMPL_PREWARM_PRELOAD", "json")
    args = ["-u", str(PROBE)]
    start_early(sys.executable, args)
    start_early(sys.executable, args)  # a second call for the same workers starts nothing more
    early = pool_for(sys.executable, args)
    later = pool_for(sys.executable, args)  # taken once: the next agent gets a pool of its own
    try:
        assert early is not None and later is not None and early is not later
        assert early.pid is not None and early.pid != later.pid
        assert early.wait_ready(60) is None
    finally:
        early.close()
        later.close()
    start_early(print, [])  # a function never runs in the pool: nothing to start
    assert pool_for(print, []) is None


def test_a_pool_started_early_that_no_agent_took_is_closed(monkeypatch):
    monkeypatch.setenv("ELASTIC_IMPL_PREWARM_PRELOAD", "json")
    early = start_early(sys.executable, ["-u", str(PROBE)])  # for an agent that never ran (its launch failed)
    assert early is not None and early.wait_ready(60) is None
    zygote = early.pid
    close_early()
    assert early.pid is None and not os.path.exists(f"/proc/{zygote}")  # its interpreter exited and was reaped
    fresh = pool_for(sys.executable, ["-u", str(PROBE)])  # the next agent starts a new pool, not the closed one
    try:
        assert fresh is not None and fresh is not early and fresh.wait_ready(60) is None
    finally:
        fresh.close()


@pytest.mark.parametrize(("source", "imports_torch"), [
    ("import torch\n", True),
    ("import os, torch.distributed as dist\n", True),
    ("from torch import nn\n", True),
    ("def main():\n    import torch\n", True),
    ("import torchvision\n", False),  # not torch itself: the default leaves it to fresh interpreters
    ("# import torch\nprint('torch')\n", False),
    ("x = 'import torch'\n", False),
    ("import os\n", False),
])
def test_the_launchers_default_looks_for_a_torch_import_in_the_entry_script(tmp_path, source, imports_torch):
    script = tmp_path / "train.py"
    script.write_text(source)
    assert prewarm.entry_imports_torch(sys.executable, ["-u", str(script), "--lr", "1"]) is imports_torch
    assert prewarm.entry_imports_torch("/usr/bin/env", ["python", str(script)]) is False  # not this interpreter


def test_the_launchers_default_finds_a_modules_source_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "trainpkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit('the launcher must not import the package')\n")
    (package / "train.py").write_text("import torch\n")
    (package / "__main__.py").write_text("print('no torch here')\n")
    monkeypatch.chdir(tmp_path)
    assert prewarm.entry_imports_torch(sys.executable, ["-u", "-m", "trainpkg.train"]) is True
    assert prewarm.entry_imports_torch(sys.executable, ["-u", "-m", "trainpkg"]) is False
    assert prewarm.entry_imports_torch(sys.executable, ["-u", "-m", "no_such_module_here"]) is False
    assert prewarm.entry_imports_torch(sys.executable, ["-u", str(tmp_path / "missing.py")]) is False
