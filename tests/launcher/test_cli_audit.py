"""elastic-run, a new user's hostile inputs and endings (the launcher audit): each bad input is one line naming the
value and what is allowed, exit 2; a signal ends the run with 128 + its number whatever the agent was doing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.launcher.conftest import REPO, free_port, needs_runtime

pytestmark = needs_runtime


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elastic-run: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


OK_SCRIPT = "import os\nprint('rank', os.environ['RANK'], flush=True)\n"


def _run(launcher, argv, timeout: float = 60, **env) -> tuple[int, str, str]:
    proc = launcher.start(argv, **env)
    rc = launcher.wait(proc, timeout)
    out, err = launcher.output(proc)
    return rc, out, err


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_peers_exits_with_its_code(launcher, tmp_path, sig):
    """Before: 'elastic-run: error: RendezvousGracefulExitError: rendezvous node ... left run' and exit 1 (the
    rendezvous the agent left on the signal broke off the join; the signal was forgotten). torchrun dies of it."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    port = free_port()
    proc = launcher.start(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                           "--rdzv-id", "audit", "--rdzv-conf", "join_timeout=60", script])
    deadline = time.monotonic() + 30
    while not _listening(port):  # this node hosts the store: listening means it is in the rendezvous
        assert proc.poll() is None, launcher.output(proc)
        assert time.monotonic() < deadline, "the store never came up"
        time.sleep(0.1)
    time.sleep(1.0)  # inside the join, waiting for the second node
    proc.send_signal(sig)
    rc = launcher.wait(proc, 30)
    err = launcher.output(proc)[1]
    assert rc == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"elastic-run: agent stopped by {sig.name}; workers stopped", err


@pytest.mark.parametrize("log_dir, fragment", [
    ("afile", "it is a file; expected a directory"),
    ("afile/sub", "afile' is a file"),
    ("/proc/nope", "cannot be made a directory"),
    ("/proc/self", "is not writable"),  # a directory nothing can be written to (root or not)
])
def test_a_log_dir_that_cannot_be_used_is_one_line_exit_2(launcher, tmp_path, log_dir, fragment):
    """Before: 'elastic-run: error: LogDirNotADirectoryError: log_dir: afile is a file' / 'NotADirectoryError: [Errno
    20] Not a directory: ...' / 'FileNotFoundError: ...', exit 1 (torchrun: a traceback, exit 1); an existing folder
    that takes no files failed only after the rendezvous, when the first attempt's folder was made (the agent's
    traceback, exit 1)."""
    (tmp_path / "afile").write_text("the user's file\n")
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    path = log_dir if log_dir.startswith("/") else str(tmp_path / log_dir)
    rc, out, err = _run(launcher, ["--standalone", "--log-dir", path, script])
    line = _one_line_error(err)
    assert rc == 2, err
    assert f"--log-dir value {path!r}" in line and fragment in line, line
    assert "rank 0" not in out  # nothing started
    assert (tmp_path / "afile").read_text() == "the user's file\n"


@pytest.mark.parametrize("env, dest", [
    ("PET_STANDALONE", "standalone"),
    ("PET_MODULE", "module"),
    ("PET_NO_PYTHON", "no_python"),
    ("PET_RUN_PATH", "run_path"),
    ("PET_VIRTUAL_LOCAL_RANK", "virtual_local_rank"),
])
def test_torchruns_flag_environment_variables_set_the_flags(monkeypatch, env, dest):
    """torchrun reads every flag from PET_<FLAG> as an integer (nonzero: on). Before: only PET_VIRTUAL_LOCAL_RANK
    was read here, so PET_MODULE=1 ran the module name as a script ('training script ... not found') and
    PET_STANDALONE=1 used the static backend."""
    from elastic_impl.run import parse_args

    monkeypatch.setenv(env, "1")
    assert getattr(parse_args(["x.py"]), dest) is True
    monkeypatch.setenv(env, "0")
    assert getattr(parse_args(["x.py"]), dest) is False


@pytest.mark.parametrize("env", ["PET_STANDALONE", "PET_MODULE", "PET_VIRTUAL_LOCAL_RANK"])
def test_a_flag_environment_variable_that_is_no_integer_is_one_line_exit_2(monkeypatch, capsys, env):
    """torchrun: 'ValueError: invalid literal for int() with base 10: 'yes'' in a traceback. Before: ignored here
    (PET_VIRTUAL_LOCAL_RANK=yes turned the flag on, 'no' too)."""
    from elastic_impl.run import main

    monkeypatch.setenv(env, "yes")
    with pytest.raises(SystemExit) as info:
        main(["x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert f"invalid {env} value 'yes'" in line and "0 or 1" in line, line


def test_torchruns_pet_shutdown_timeout_sets_the_grace(monkeypatch):
    """torchrun's --shutdown-timeout reads PET_SHUTDOWN_TIMEOUT; before, only our PET_SHUTDOWN_GRACE was read."""
    from elastic_impl.run import config_from_args, parse_args

    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "7")
    config, _, _ = config_from_args(parse_args(["--standalone", "x.py"]))
    assert config.shutdown_timeout == 7.0


def test_a_bad_value_from_the_environment_names_the_variable(monkeypatch, capsys):
    """Before: PET_NPROC_PER_NODE=abc said only "invalid --nproc-per-node value 'abc'", an option the user never
    typed."""
    from elastic_impl.run import main

    monkeypatch.setenv("PET_NPROC_PER_NODE", "abc")
    with pytest.raises(SystemExit) as info:
        main(["--standalone", "x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert "invalid --nproc-per-node value 'abc' (from PET_NPROC_PER_NODE)" in line, line


def test_pet_module_runs_a_module(launcher, tmp_path):
    (tmp_path / "audit_mod_xyz.py").write_text("print('module ran', flush=True)\n")
    rc, out, err = _run(launcher, ["--standalone", "audit_mod_xyz"], PET_MODULE="1", PYTHONPATH=str(tmp_path))
    assert rc == 0, err
    assert "module ran" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--local-ranks-filter", "9"], "invalid --local-ranks-filter value '9': local rank 9 does not exist"),
    (["--local-ranks-filter", "-1"], "local rank -1 does not exist"),
    (["--nproc-per-node", "2", "--local-ranks-filter", "0,2"], "local rank 2 does not exist (local ranks: 0..1"),
    (["--local-ranks-filter", ","], "expected comma-separated local ranks"),
    (["--local-ranks-filter", "0,,1"], "expected comma-separated local ranks"),
])
def test_a_local_ranks_filter_naming_no_local_rank_is_one_line_exit_2(capsys, argv, fragment):
    """Before: '9' and '-1' ran the job with every worker's console output hidden (torchrun too), ',' showed all of
    it (torchrun: a ValueError traceback)."""
    from elastic_impl.run import main

    with pytest.raises(SystemExit) as info:
        main(["--standalone", *argv, "x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert fragment in line, line


def test_a_local_ranks_filter_of_existing_ranks_is_kept():
    from elastic_impl.run import config_from_args, parse_args

    config, _, _ = config_from_args(parse_args(["--nproc-per-node", "3", "--local-ranks-filter", " 2,0 ", "x.py"]))
    assert config.logs_specs._local_ranks_filter == {0, 2}


def test_a_store_that_does_not_answer_yet_prints_no_cpp_stack_dumps(launcher, tmp_path):
    """A node started before its store's host (or pointed at the wrong port) retries the store. Before (seen): each
    try printed torch's C++ error with its stack ('[E... TCPStore.cpp:328] [c10d] TCP client failed to connect ...',
    'Exception raised from throwTimeoutError ...', some 20 'frame #N: ...' lines): 60 lines in 3 s here, and
    torchrun's the same. The outcome is still said once, naming the endpoint."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    port = free_port()  # nothing listens there
    rc, _, err = _run(launcher, ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                 "--rdzv-id", "audit", "--rdzv-conf", "is_host=false,connect_timeout=3", script])
    assert rc == 1, err
    assert "frame #" not in err and "[c10d]" not in err and "Exception raised from" not in err, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("elastic-run: error: RendezvousConnectionError:") and f"127.0.0.1:{port}" in last, err


def test_a_rendezvous_that_times_out_is_said_without_a_traceback(launcher, tmp_path):
    """The second node never came. Before (seen): the agent logged 'the elastic agent failed: RendezvousTimeoutError:
    ...' with an 18-line Python traceback before the one-line error (torchrun: 41 lines)."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    rc, _, err = _run(launcher, ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                                 "--rdzv-id", "audit", "--rdzv-conf", "join_timeout=2", script])
    assert rc == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("elastic-run: error: RendezvousTimeoutError:") and "1 of min 2 nodes joined" in last, err
    assert len(err.strip().splitlines()) <= 3, err


@pytest.mark.parametrize("nnodes", ["2", "1:2"])
def test_standalone_with_more_than_one_node_is_one_line_exit_2(capsys, nnodes):
    """--standalone hosts its rendezvous on a free local port no other node is told of. Before (seen): --nnodes 2
    waited out the join timeout (600 s by default) for a node that could not come, and 1:2 waited the whole 30 s
    last call, silently, before starting (torchrun the same)."""
    from elastic_impl.run import main

    with pytest.raises(SystemExit) as info:
        main(["--standalone", "--nnodes", nnodes, "x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert f"invalid --nnodes value {nnodes!r}" in line and "--standalone" in line, line


def test_standalone_names_the_rendezvous_options_it_ignores(launcher, tmp_path):
    """Before: --standalone --rdzv-endpoint/--rdzv-backend were dropped without a word (torchrun too): a user who
    meant to join that endpoint got a private single-node run."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    rc, out, err = _run(launcher, ["--standalone", "--rdzv-endpoint", "otherhost:1234", "--rdzv-backend", "etcd",
                                   script])
    assert rc == 0, err
    assert "rank 0" in out
    warnings = [line for line in err.splitlines() if "--standalone" in line]
    assert len(warnings) == 1, err
    assert "--rdzv-backend 'etcd'" in warnings[0] and "--rdzv-endpoint 'otherhost:1234'" in warnings[0], err
    rc, _, err = _run(launcher, ["--standalone", script])
    assert rc == 0 and "--standalone" not in err, err


def test_an_empty_rdzv_id_for_several_nodes_is_one_line_exit_2(capsys):
    """torchrun (and ours before) generates a random run id for an empty --rdzv-id: each node then waits in a run of
    its own until the join timeout (seen: 'RendezvousTimeoutError: rendezvous run '2339...' round 0 did not complete
    ... (1 of min 2 nodes joined)', 600 s by default). One node alone keeps torchrun's random id."""
    from elastic_impl.run import main

    with pytest.raises(SystemExit) as info:
        main(["--nnodes", "1:2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-id", "",
              "x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert "invalid --rdzv-id value ''" in line and "same on every node" in line, line


def test_a_closed_stderr_keeps_the_exit_code(tmp_path):
    """elastic-run 2>&- with a bad option. Before (seen): exit 1 and, on whatever file took descriptor 2, an
    AttributeError traceback ('NoneType' object has no attribute 'flush'/'write'): sys.stderr is None."""
    proc = subprocess.run([sys.executable, "-m", "elastic_impl.run", "--nproc-per-node", "abc", "x.py"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60,
                          preexec_fn=lambda: os.close(2))
    assert proc.returncode == 2, proc.stdout
    assert b"Traceback" not in proc.stdout


STUBBORN = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(sys.argv[1], f"ready.{os.environ['LOCAL_RANK']}"), "w").write(str(os.getpid()))
time.sleep(120)
"""


def test_a_second_signal_cuts_the_shutdown_grace_short(launcher, tmp_path):
    """Ctrl-C twice: workers that ignore the stop signal get SIGKILL at the second one. Before (seen): the second
    was logged 'agent already stopping; ignoring SIGINT' and the agent waited out the whole grace (30 s here and
    with torchrun, whose second Ctrl-C adds a traceback)."""
    script = _write(tmp_path, "stubborn.py", STUBBORN)
    proc = launcher.start(["--standalone", "--nproc-per-node", "2", "--shutdown-grace", "60", script, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, launcher.output(proc)
        time.sleep(0.1)
    time.sleep(0.3)
    pids = [int((tmp_path / f"ready.{r}").read_text()) for r in (0, 1)]
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None  # still in the grace: the workers ignore SIGINT
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = launcher.wait(proc, 30)
    took = time.monotonic() - start
    err = launcher.output(proc)[1]
    assert rc == 128 + signal.SIGINT, err
    assert took < 15, f"exited {took:.1f} s after the second SIGINT (the grace is 60 s)\n{err}"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    assert err.strip().splitlines()[-1] == "elastic-run: agent stopped by SIGINT; workers stopped", err


def test_an_empty_master_addr_is_named(capsys):
    """Before: "bad rendezvous endpoint ':29500': expected host[:port] ..." -- an endpoint the user never gave."""
    from elastic_impl.run import main

    with pytest.raises(SystemExit) as info:
        main(["--master-addr", " ", "x.py"])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert "invalid --master-addr value ' '" in line, line


@pytest.mark.parametrize("flag", ["--no-python", "--module"])
def test_run_path_with_no_python_or_module_is_one_line_exit_2(capsys, tmp_path, flag):
    """--run-path runs a script file in the worker's interpreter. Before (seen): with --no-python the script was
    looked up on PATH ("training program 'exit3.py' not found on PATH"), with -m it was not checked at all and every
    worker failed in runpy; torchrun silently drops the other flag."""
    from elastic_impl.run import main

    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    with pytest.raises(SystemExit) as info:
        main(["--standalone", "--run-path", flag, script])
    line = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2
    assert f"--run-path and {flag} cannot be used together" in line, line


@pytest.mark.parametrize("argv, stream", [
    (["--duplicate-stdout-filters", "rank"], "stdout"),
    (["--duplicate-stderr-filters", "rank", "--tee", "1"], "stderr"),
])
def test_duplicate_filters_without_the_tee_they_read_are_named(launcher, tmp_path, argv, stream):
    """The filters copy teed lines only. Before (seen): without --tee for that stream the job ran and left an empty
    filtered_<stream>.log, without a word (torchrun the same)."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    rc, _, err = _run(launcher, ["--standalone", *argv, script])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if f"--duplicate-{stream}-filters" in line]
    assert len(warnings) == 1 and "--tee" in warnings[0], err
    rc, _, err = _run(launcher, ["--standalone", "--tee", "3", *argv[:2], script])
    assert rc == 0 and "--duplicate" not in err, err


def test_a_signal_while_a_static_node_waits_for_its_master_exits_with_its_code(launcher, tmp_path):
    """Static backend, node rank 1, no master yet: the join blocks in TCPStore's C++ connect (up to the 900 s
    rendezvous timeout). Before (seen): SIGTERM from 'timeout 40' was recorded and nothing more; the agent was still
    waiting 11 minutes later. Now the join runs where the agent can act on the signal."""
    script = _write(tmp_path, "ok.py", OK_SCRIPT)
    proc = launcher.start(["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), script])
    time.sleep(4)
    assert proc.poll() is None, launcher.output(proc)
    proc.send_signal(signal.SIGTERM)
    rc = launcher.wait(proc, 20)
    err = launcher.output(proc)[1]
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "elastic-run: agent stopped by SIGTERM; workers stopped", err
