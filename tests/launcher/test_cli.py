"""elastic-run option parsing: valid spellings map to the right config; bad values give ONE line + exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from elastic_impl.launcher.api import LaunchConfigError
from elastic_impl.run import config_from_args, main, parse_args, parse_min_max_nnodes
from tests.launcher.conftest import requires

# Std (redirects/tee) and DefaultLogsSpecs come from the multiprocessing package.
needs_mp = requires("elastic_impl.multiprocessing")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BAD_INPUTS = [
    (["--nnodes", "5:2"], "'5:2'"),
    (["--nnodes", "0"], "'0'"),
    (["--nnodes", "a:b"], "'a:b'"),
    (["--nnodes", "1:2:3"], "'1:2:3'"),
    (["--nproc-per-node", "0"], "'0'"),
    (["--nproc-per-node", "many"], "'many'"),
    (["--max-restarts", "-1"], "'-1'"),
    (["--max-restarts", "x"], "'x'"),
    (["--monitor-interval", "0"], "'0'"),
    (["--monitor-interval", "nan"], "'nan'"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:notaport"], "localhost:notaport"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:70000"], "localhost:70000"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "a:b:c"], "a:b:c"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", ":29400"], ":29400"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "[::1"], "[::1"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "join_timeout"], "join_timeout"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "heartbeat=1,keep_alive_interval=2"], "heartbeat"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "=5"], "=5"),
    (["--rdzv-backend", ""], "''"),
    (["--start-method", "teleport"], "'teleport'"),
    (["--module", "--no-python"], "--module and --no-python"),
    (["--nnodes", "2", "--node-rank", "2"], "'2'"),
    (["--nnodes", "1:2"], "'1:2'"),  # static backend needs a fixed count
    (["--shutdown-grace", "-1"], "'-1'"),
    (["--master-port", "99999"], "'99999'"),
    pytest.param(["--redirects", "7"], "'7'", marks=needs_mp),
    pytest.param(["--tee", "0:9"], "'0:9'", marks=needs_mp),
    (["--bogus-option", "1"], "--bogus-option"),
]


def _argv(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS, ids=[" ".join(_argv(c)) for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "examples/train.py"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elastic-run: error:"), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


# Rejected only when the launcher builds the rendezvous handler (the option parser cannot know the registry):
# still one line and exit 2, naming the bad value. The store is hosted on a free port (never reached otherwise).
LATE_BAD_INPUTS = [
    (["--rdzv-backend", "bogus"], "bogus"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "heartbeat=soon"], "soon"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "missed_heartbeats=many"], "many"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "join_timeout=-5"], "-5"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "store_type=carrier-pigeon"], "carrier-pigeon"),
    # values a hostile run found (issue 13): each used to pass validation and fail later, blamed on the store
    # ("no answer within 0.0 s"), as an OverflowError, or as "cannot convert float NaN to integer"
    (["--rdzv-backend", "c10d", "--rdzv-conf", "missed_heartbeats=0"], "missed_heartbeats (keep_alive_max_attempt)='0' is out of range (allowed: an integer with 1 <= value <= 1000)"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "missed_heartbeats=-1"], "missed_heartbeats (keep_alive_max_attempt)='-1' is out of range"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "heartbeat=1e-9"], "heartbeat (keep_alive_interval)='1e-9' is out of range (allowed: a number of seconds with 0.01 <= seconds <= 2592000)"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "heartbeat=inf"], "heartbeat (keep_alive_interval)='inf' is out of range"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "join_timeout=inf"], "join_timeout='inf' is out of range (allowed: a number of seconds with 0 < seconds <= 2592000)"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "close_timeout=nan"], "close_timeout='nan' is out of range"),
    (["--rdzv-backend", "c10d", "--rdzv-conf", "last_call_timeout=nan"], "last_call_timeout='nan' is out of range"),
    (["--rdzv-backend", "etcd", "--rdzv-conf", "last_call_timeout=nan"], "last_call_timeout='nan' is out of range"),
    (["--rdzv-backend", "etcd-v3", "--rdzv-conf", "lease_liveness=maybe"], "got 'maybe' (allowed: 1/0, true/false"),
]


@needs_mp
@pytest.mark.parametrize("argv, fragment", LATE_BAD_INPUTS, ids=[" ".join(c[0]) for c in LATE_BAD_INPUTS])
def test_bad_rendezvous_settings_are_one_line_and_exit_code_2(argv, fragment, capsys):
    from tests.launcher.conftest import free_port

    endpoint = ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "cli-test"]
    with pytest.raises(SystemExit) as info:
        main([*argv, *endpoint, "examples/train.py"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elastic-run: error:"), err
    assert fragment in lines[0], err


def test_rdzv_conf_options_the_backend_never_reads_are_named(tmp_path):
    """torchrun silently ignores a misspelt --rdzv-conf option (the job then runs with the default); ours runs too,
    but says which options had no effect. Options the backend read (including aliases) are not named."""
    script = tmp_path / "ok.py"
    script.write_text("print('worker ran')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "elastic_impl.run", "--standalone", "--nproc-per-node", "1",
         "--rdzv-conf", "join_timout=5,heartbeat=1,last_call_timeout=1", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "worker ran" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "does not use --rdzv-conf" in line]
    assert len(warnings) == 1, proc.stderr
    assert "'join_timout'" in warnings[0] and "have no effect" in warnings[0]
    assert "heartbeat" not in warnings[0] and "keep_alive" not in warnings[0] and "last_call" not in warnings[0]


def test_missing_training_script_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--standalone"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, line", [
    (["no_such_script.py"], "training script 'no_such_script.py' not found (cwd {cwd}; -m runs a module, "
                            "--no-python a binary)"),
    (["--no-python", "./no_such_binary"], "training program './no_such_binary' not found (no such file; cwd {cwd})"),
    (["--no-python", "no-such-program-on-path"],
     "training program 'no-such-program-on-path' not found on PATH (--no-python runs it directly)"),
    (["--no-python", "README.md"], "training program 'README.md' not found on PATH (--no-python runs it directly)"),
    (["--no-python", "./README.md"],
     "training program './README.md' is not executable (--no-python runs it directly: chmod +x, or drop "
     "--no-python for a Python script)"),
])
def test_a_training_program_that_is_not_there_is_one_line_before_joining_anything(argv, line):
    # torchrun starts the workers anyway: every worker fails (a failure report per rank) for a missing script, and a
    # missing --no-python binary fails its agent with a traceback. Here the node has not even looked for its peers:
    # the endpoint below has nothing listening, and a 2-node job would otherwise wait there for them.
    proc = subprocess.run(
        [sys.executable, "-m", "elastic_impl.run", "--nnodes", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "127.0.0.1:9", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"elastic-run: error: {line.format(cwd=REPO)}"]


def test_an_entrypoint_that_cannot_execute_is_named_without_an_errno_prefix():
    from elastic_impl.multiprocessing.api import EntrypointNotExecutableError, _entrypoint_error

    err = _entrypoint_error(OSError(8, "Exec format error"), "/data.bin")
    assert str(err) == "bad entrypoint '/data.bin': cannot execute (Exec format error)"  # was "[Errno 8] bad ..."
    assert err.errno == 8 and isinstance(err, EntrypointNotExecutableError) and isinstance(err, ValueError)


def test_real_process_bad_input_has_no_traceback():
    """The console path end to end: the interpreter prints exactly the one line and exits 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "elastic_impl.run", "--nnodes", "5:2", "examples/train.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "elastic-run: error: invalid --nnodes value '5:2': expected N or MIN:MAX with 1 <= MIN <= MAX"
    ]


_STORE_CALL_RETURNS_DURING_TEARDOWN = """
import builtins, sys, threading, time
from datetime import timedelta
from torch.distributed import TCPStore
from elastic_impl.run import console_main, main
server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=1), use_libuv=True)

def abandoned_store_call():  # like a rendezvous store call abandoned on a cut-off store
    try:
        client.wait(["never"], timedelta(seconds=1))
    except Exception:
        pass

class SlowTeardown:  # keeps the interpreter's teardown going past the moment the call returns
    def __del__(self):
        time.sleep(2)

threading.Thread(target=abandoned_store_call, daemon=True).start()
builtins._slow_teardown = SlowTeardown()
(console_main if sys.argv[1] == "console_main" else main)(["--nnodes", "5:2", "examples/train.py"])
"""


def test_the_exit_code_survives_a_store_call_returning_during_teardown():
    """A daemon thread blocked in a TCPStore call that returns while the interpreter tears down aborts the process
    (SIGABRT, "terminate called without an active exception"): seen as an agent exit code of -6 instead of its own
    in a live scenario. ``console_main`` (the command's entry point) ends the process before the teardown; plain
    ``main`` (the in-process API, which raises SystemExit) aborts in the same script."""
    proc = subprocess.run([sys.executable, "-c", _STORE_CALL_RETURNS_DURING_TEARDOWN, "console_main"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    assert "elastic-run: error: invalid --nnodes value '5:2'" in proc.stderr


@pytest.mark.parametrize("value, expected", [("1", (1, 1)), ("3", (3, 3)), ("1:2", (1, 2)), ("2:2", (2, 2))])
def test_parse_min_max_nnodes(value, expected):
    assert parse_min_max_nnodes(value) == expected


def test_parse_min_max_nnodes_rejects_inverted_range():
    with pytest.raises(LaunchConfigError, match="'5:2'"):
        parse_min_max_nnodes("5:2")


@needs_mp
def test_config_from_args_c10d_with_underscore_aliases(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    args = parse_args(
        [
            "--nnodes=1:3",
            "--nproc_per_node=2",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=127.0.0.1:29400",
            "--rdzv_id=job7",
            "--rdzv_conf=join_timeout=5,heartbeat=0.5",
            "--max_restarts=2",
            "--monitor_interval=0.2",
            "--role=trainer",
            "--shutdown-grace=4",
            "train.py",
            "--lr",
            "0.1",
        ]
    )
    config, cmd, cmd_args = config_from_args(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 3, 2)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "127.0.0.1:29400", "job7")
    # "heartbeat" is our spelling of torchrun's keep_alive_interval
    assert config.rdzv_configs["join_timeout"] == "5" and config.rdzv_configs["keep_alive_interval"] == "0.5"
    assert "heartbeat" not in config.rdzv_configs
    assert config.rdzv_configs["timeout"] == 900  # torchrun's default rendezvous timeout
    assert (config.max_restarts, config.monitor_interval, config.role) == (2, 0.2, "trainer")
    assert config.shutdown_timeout == 4.0
    assert cmd == sys.executable and cmd_args == ["-u", "train.py", "--lr", "0.1"]


@needs_mp
def test_config_from_args_static_defaults_and_entrypoint_modes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_SHUTDOWN_GRACE", raising=False)
    config, cmd, cmd_args = config_from_args(parse_args(["--nproc-per-node", "2", "-m", "pkg.train"]))
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "127.0.0.1:29500"
    assert config.rdzv_configs["rank"] == 0
    assert config.shutdown_timeout == 30.0
    assert cmd_args == ["-u", "-m", "pkg.train"]
    assert os.environ["OMP_NUM_THREADS"] == "1"  # nproc > 1 and unset: like torchrun
    _, cmd, cmd_args = config_from_args(parse_args(["--no-python", "/bin/echo", "hi"]))
    assert (cmd, cmd_args) == ("/bin/echo", ["hi"])


@needs_mp
def test_shutdown_grace_from_environment(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_SHUTDOWN_GRACE", "2.5")
    config, _, _ = config_from_args(parse_args(["x.py"]))
    assert config.shutdown_timeout == 2.5
    monkeypatch.setenv("TORCHELASTIC_SHUTDOWN_GRACE", "soon")
    with pytest.raises(LaunchConfigError, match="'soon'"):
        config_from_args(parse_args(["x.py"]))


@needs_mp
def test_nproc_per_node_cpu_counts_the_cpus_this_process_may_use():
    # As torchrun 2.13 (torch._utils.cpu_count): the affinity mask (taskset, cpusets), not the machine's count.
    config, _, _ = config_from_args(parse_args(["--nproc-per-node", "cpu", "x.py"]))
    assert config.nproc_per_node == len(os.sched_getaffinity(0))
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from elastic_impl.run import determine_local_world_size as d; print(d('cpu'), d('auto'))"],
        capture_output=True, text=True, timeout=60)
    assert pinned.stdout.split() == ["1", "1"], pinned.stderr


@pytest.mark.parametrize("value, why", [
    ("gpu", "no CUDA device is available on this machine"),
    ("xpu", "no XPU device is available on this machine"),
    ("npu", "no npu device plugin is loaded (the registered plugin device is 'privateuseone')"),
])
def test_nproc_per_node_for_an_absent_accelerator_is_a_one_line_error(value, why):
    from elastic_impl.run import determine_local_world_size

    with pytest.raises(ValueError) as info:
        determine_local_world_size(value)
    assert str(info.value).startswith(f"invalid --nproc-per-node value {value!r}: {why}")
    assert "\n" not in str(info.value)


def test_nproc_per_node_names_a_device_plugin_by_its_registered_name():
    # What torch_npu does on import: rename the privateuse1 backend ("npu") and register torch.npu. Run apart:
    # the rename is process-wide and cannot be undone.
    script = """
import types, torch
torch.utils.rename_privateuse1_backend("fakedev")
torch._register_device_module("fakedev", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 3))
from elastic_impl.run import determine_local_world_size
print(determine_local_world_size("fakedev"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "3", proc.stderr
