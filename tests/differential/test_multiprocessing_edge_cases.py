"""Differential edge cases of ``multiprocessing`` (start_processes, the PContexts, RunProcsResult, the LogsSpecs).

Each case runs on both implementations (see ``harness.py``). Paths are observed relative to the case's directory,
with the random part of the per-run log folder (``<run_id>_<random>``) replaced by ``*``. Function workers are defined
at module level so that spawn could import them, but the cases fork: upstream's spawned worker imports torch (~6 s).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

from tests.differential.harness import case, module, outcome, same_behaviour_test

# ---------------------------------------------------------------------------------------------- workers (fork/spawn)


def mp_double(x):
    return 2 * x


def mp_raise(msg):
    raise ValueError(msg)


def mp_kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def mp_sleep(seconds):
    time.sleep(seconds)
    return seconds


def mp_fail_after(seconds):
    time.sleep(seconds)
    raise ValueError(f"failed after {seconds}")


def mp_exit(code):
    sys.exit(code)


def mp_return_unpicklable():
    return lambda: None


def mp_read_env(name):
    return os.environ.get(name)


# ---------------------------------------------------------------------------------------------- helpers


def _rel(path, tmp: Path):
    """``path`` relative to the case directory with the per-run folder's random part as ``*``; other values as is."""
    if not isinstance(path, str) or not path.startswith(str(tmp)):
        return path
    rel = os.path.relpath(path, tmp)
    # tempfile.mkdtemp(prefix=f"{run_id}_") appends 8 characters of [a-z0-9_]
    return re.sub(r"(^|/)([^/]*_)[a-z0-9_]{8}(?=/|$)", r"\1\2*", rel, count=1)


def _rel_map(d: dict, tmp: Path) -> dict:
    return {k: _rel(v, tmp) for k, v in sorted(d.items())}


def _dest(dest, tmp: Path) -> tuple:
    return (_rel_map(dest.stdouts, tmp), _rel_map(dest.stderrs, tmp), _rel_map(dest.tee_stdouts, tmp),
            _rel_map(dest.tee_stderrs, tmp), _rel_map(dest.error_files, tmp), _rel(dest.filtered_stdout, tmp),
            _rel(dest.filtered_stderr, tmp))


def _tree(tmp: Path) -> list[str]:
    """Every file and folder under ``tmp``, relative, random parts as ``*``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames + filenames:
            out.append(_rel(os.path.join(dirpath, name), tmp))
    return sorted(out)


def _failure(f, tmp: Path) -> tuple:
    return f.local_rank, f.exitcode, f.signal_name(), _rel(f.error_file, tmp)


def _result(r, tmp: Path) -> tuple | None:
    if r is None:
        return None
    return (sorted(r.return_values.items()), {k: _failure(f, tmp) for k, f in sorted(r.failures.items())},
            _rel_map(r.stdouts, tmp), _rel_map(r.stderrs, tmp), r.is_failed())


def _envs(n: int, **extra: str) -> dict[int, dict[str, str]]:
    return {r: {"LOCAL_RANK": str(r), **extra} for r in range(n)}


def _specs(root: str, tmp: Path, **kw):
    return module(root, "multiprocessing.api").DefaultLogsSpecs(log_dir=str(tmp / "logs"), **kw)


class _Started:
    """start_processes(...) as a context manager that always closes the context (quickly) and kills leftovers."""

    def __init__(self, root: str, entrypoint, args, envs, logs_specs, **kw):
        self.mp = module(root, "multiprocessing")
        kw.setdefault("start_method", "fork")
        self.pc = self.mp.start_processes("trainer", entrypoint, args, envs, logs_specs, **kw)

    def __enter__(self):
        return self.pc

    def __exit__(self, *exc):
        pids = list(self.pc.pids().values())
        self.pc.close(timeout=1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return False


SH = "/bin/sh"

# ---------------------------------------------------------------------------------------------- LogsDest, LogsSpecs


@case("multiprocessing.api.LogsDest")
def case_mp_logs_dest_defaults_and_equality(root, tmp):
    api = module(root, "multiprocessing.api")
    dest = api.LogsDest()
    fields = tuple(api.LogsDest.__dataclass_fields__)
    return (fields, _dest(dest, tmp), dest == api.LogsDest(), dest == api.LogsDest(stdouts={0: "x"}),
            api.LogsDest({0: "a"}, {0: "b"}).stderrs)


@case("multiprocessing.api.LogsSpecs")
def case_mp_logs_specs_is_abstract(root, tmp):
    api = module(root, "multiprocessing.api")
    return outcome(api.LogsSpecs)


@case("multiprocessing.api.LogsSpecs", "multiprocessing.api.LogsSpecs.reify", "multiprocessing.start_processes")
def case_mp_logs_specs_custom_subclass_runs_workers(root, tmp):
    api = module(root, "multiprocessing.api")
    out = tmp / "out.log"

    class OneFile(api.LogsSpecs):
        def reify(self, envs):
            return api.LogsDest(stdouts={0: str(out)}, stderrs={0: ""}, error_files={0: str(tmp / "err.json")})

        @property
        def root_log_dir(self):
            return str(tmp)

    specs = OneFile()
    with _Started(root, SH, {0: ("-c", "echo hello")}, _envs(1), specs) as pc:
        result = _result(pc.wait(-1, period=0.05), tmp)
    return specs.root_log_dir == str(tmp), result, out.read_text()


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_attributes(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = api.DefaultLogsSpecs(log_dir=str(tmp / "a" / "b"), redirects=api.Std.OUT, tee={0: api.Std.ERR},
                                 local_ranks_filter={0})
    same = api.DefaultLogsSpecs(log_dir=str(tmp / "a" / "b"), redirects=api.Std.OUT, tee={0: api.Std.ERR},
                                local_ranks_filter={0})
    other = api.DefaultLogsSpecs(log_dir=str(tmp / "a" / "b"))
    return (_rel(specs.root_log_dir, tmp), (tmp / "a" / "b").is_dir(), repr(specs).replace(str(tmp), "<tmp>"),
            specs == same, specs == other, specs == object(), isinstance(specs, api.LogsSpecs))


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_log_dir_none(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = api.DefaultLogsSpecs(log_dir=None)
    path = Path(specs.root_log_dir)
    try:
        return path.name.startswith("torchelastic_"), path.is_dir(), sorted(os.listdir(path))
    finally:
        os.rmdir(path)


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_log_dir_empty_string(root, tmp):
    api = module(root, "multiprocessing.api")

    def make():
        path = Path(api.DefaultLogsSpecs(log_dir="").root_log_dir)
        try:
            return path.name.startswith("torchelastic_"), path.is_dir()
        finally:
            os.rmdir(path)

    return outcome(make)


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_log_dir_is_a_file(root, tmp):
    api = module(root, "multiprocessing.api")
    path = tmp / "file"
    path.write_text("x")
    try:
        api.DefaultLogsSpecs(log_dir=str(path))
        return "no error"
    except Exception as e:  # noqa: BLE001 - the observation
        return isinstance(e, NotADirectoryError), str(e).replace(str(tmp), "<tmp>")


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_log_dir_below_a_file(root, tmp):
    api = module(root, "multiprocessing.api")
    (tmp / "file").write_text("x")
    return outcome(lambda: api.DefaultLogsSpecs(log_dir=str(tmp / "file" / "sub")), compare_message=False)


@case("multiprocessing.api.DefaultLogsSpecs")
def case_mp_default_logs_specs_existing_non_empty_dir(root, tmp):
    api = module(root, "multiprocessing.api")
    (tmp / "logs").mkdir()
    (tmp / "logs" / "old.txt").write_text("keep me")
    specs = api.DefaultLogsSpecs(log_dir=str(tmp / "logs"))
    specs.reify(_envs(1, TORCHELASTIC_RUN_ID="job"))
    return _tree(tmp), (tmp / "logs" / "old.txt").read_text()


@case("multiprocessing.api.DefaultLogsSpecs", "multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_default_logs_specs_devnull(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = api.DefaultLogsSpecs(log_dir=os.devnull, redirects=api.Std.ALL)
    envs = _envs(2)
    dest = specs.reify(envs)
    return specs.root_log_dir, _rel_map(dest.stdouts, tmp), _rel_map(dest.stderrs, tmp), envs


@case("multiprocessing.api.DefaultLogsSpecs", "multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_default_logs_specs_devnull_error_and_tee_files(root, tmp):
    api = module(root, "multiprocessing.api")
    dest = api.DefaultLogsSpecs(log_dir=os.devnull, tee=api.Std.ALL).reify(_envs(2))
    return _dest(dest, tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify", "multiprocessing.api.LogsSpecs.reify")
def case_mp_reify_without_redirects(root, tmp):
    dest = _specs(root, tmp).reify(_envs(3, TORCHELASTIC_RUN_ID="job"))
    return _dest(dest, tmp), _tree(tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_redirects_and_tee_per_rank(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, redirects={0: api.Std.OUT, 2: api.Std.ALL}, tee={1: api.Std.ERR, 2: api.Std.OUT})
    dest = specs.reify(_envs(3, TORCHELASTIC_RUN_ID="job", TORCHELASTIC_RESTART_COUNT="2"))
    return _dest(dest, tmp), _tree(tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_tee_overlaps_redirects(root, tmp):
    api = module(root, "multiprocessing.api")
    dest = _specs(root, tmp, redirects=api.Std.ALL, tee=api.Std.ALL).reify(_envs(1, TORCHELASTIC_RUN_ID="job"))
    return _dest(dest, tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_local_ranks_filter(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, redirects={1: api.Std.OUT}, tee={0: api.Std.ALL, 2: api.Std.ALL},
                   local_ranks_filter={0})
    return _dest(specs.reify(_envs(3, TORCHELASTIC_RUN_ID="job")), tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_empty_local_ranks_filter_filters_nothing(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, tee=api.Std.OUT, local_ranks_filter=set())
    return _dest(specs.reify(_envs(2, TORCHELASTIC_RUN_ID="job")), tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_sets_error_file_in_envs(root, tmp):
    envs = _envs(2, TORCHELASTIC_RUN_ID="job")
    _specs(root, tmp).reify(envs)
    return {r: {k: _rel(v, tmp) for k, v in sorted(env.items())} for r, env in envs.items()}


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_without_run_id(root, tmp):
    return _dest(_specs(root, tmp).reify({0: {}}), tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_empty_envs(root, tmp):
    return outcome(lambda: _dest(_specs(root, tmp).reify({}), tmp)), _tree(tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_next_restart_same_run_folder(root, tmp):
    specs = _specs(root, tmp)
    first = specs.reify(_envs(1, TORCHELASTIC_RUN_ID="job", TORCHELASTIC_RESTART_COUNT="0"))
    second = specs.reify(_envs(1, TORCHELASTIC_RUN_ID="job", TORCHELASTIC_RESTART_COUNT="1"))
    return _dest(first, tmp), _dest(second, tmp), _tree(tmp)


@case("multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_reify_same_restart_twice(root, tmp):
    specs = _specs(root, tmp, redirects=module(root, "multiprocessing.api").Std.OUT)
    first = specs.reify(_envs(1, TORCHELASTIC_RUN_ID="job"))
    Path(first.stdouts[0]).write_text("first start's log")
    second = specs.reify(_envs(1, TORCHELASTIC_RUN_ID="job"))
    return _rel(second.stdouts[0], tmp), Path(first.stdouts[0]).exists()


@case("multiprocessing.api.DefaultLogsSpecs", "multiprocessing.api.DefaultLogsSpecs.reify")
def case_mp_logs_specs_redirects_given_as_int(root, tmp):
    def make():
        return _dest(_specs(root, tmp, redirects=1).reify(_envs(1)), tmp)

    return outcome(make, compare_message=False)


# ---------------------------------------------------------------------------------------------- RunProcsResult


@case("multiprocessing.api.RunProcsResult")
def case_mp_run_procs_result_defaults(root, tmp):
    api = module(root, "multiprocessing.api")
    r = api.RunProcsResult()
    return (tuple(api.RunProcsResult.__dataclass_fields__), _result(r, tmp), r == api.RunProcsResult(),
            r == api.RunProcsResult(return_values={0: None}), repr(r))


@case("multiprocessing.api.RunProcsResult")
def case_mp_run_procs_result_is_failed(root, tmp):
    api = module(root, "multiprocessing.api")
    errors = module(root, "multiprocessing.errors")
    failure = errors.ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(tmp / "none.json"))
    return (api.RunProcsResult(failures={0: failure}).is_failed(),
            api.RunProcsResult(return_values={0: 1}, failures={}).is_failed(),
            api.RunProcsResult({0: 5}, {}, {0: "o"}, {0: "e"}).stdouts)


# ---------------------------------------------------------------------------------------------- start_processes


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext", "multiprocessing.api.PContext")
def case_mp_function_return_values(root, tmp):
    with _Started(root, mp_double, {0: (1,), 1: (5,)}, _envs(2), _specs(root, tmp)) as pc:
        kind = type(pc).__name__
        pids = sorted(pc.pids())
        result = _result(pc.wait(-1, period=0.05), tmp)
    return kind, pids, result


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_sees_error_file_env(root, tmp):
    with _Started(root, mp_read_env, {0: ("TORCHELASTIC_ERROR_FILE",)}, _envs(1), _specs(root, tmp)) as pc:
        result = pc.wait(-1, period=0.05)
    return _rel(result.return_values[0], tmp)


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext", "multiprocessing.api.PContext")
def case_mp_binary_success(root, tmp):
    with _Started(root, SH, {0: ("-c", "exit 0"), 1: ("-c", "exit 0")}, _envs(2), _specs(root, tmp)) as pc:
        kind = type(pc).__name__
        result = _result(pc.wait(-1, period=0.05), tmp)
    return kind, result


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_args_cast_to_str_and_env(root, tmp):
    api = module(root, "multiprocessing.api")
    script = 'echo "$@" "$FOO"; echo err >&2'
    with _Started(root, SH, {0: ("-c", script, "sh", 1, 2.5, [3])}, _envs(1, FOO="bar"),
                  _specs(root, tmp, redirects=api.Std.ALL)) as pc:
        result = pc.wait(-1, period=0.05)
    return _result(result, tmp), Path(result.stdouts[0]).read_text(), Path(result.stderrs[0]).read_text()


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_tee_and_redirect_overlap(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, redirects=api.Std.OUT, tee=api.Std.OUT)
    with _Started(root, SH, {0: ("-c", "echo out; echo err >&2")}, _envs(1), specs) as pc:
        result = pc.wait(-1, period=0.05)
    return _result(result, tmp), Path(result.stdouts[0]).read_text()


@case("multiprocessing.start_processes", "multiprocessing.api.RunProcsResult")
def case_mp_result_stdouts_without_redirect(root, tmp):
    with _Started(root, SH, {0: ("-c", "exit 0"), 1: ("-c", "exit 0")}, _envs(2), _specs(root, tmp)) as pc:
        result = pc.wait(-1, period=0.05)
    return result.stdouts, result.stderrs


@case("multiprocessing.start_processes", "multiprocessing.api.PContext")
def case_mp_context_attributes_after_start(root, tmp):
    envs = _envs(2, TORCHELASTIC_RUN_ID="job")
    args = {0: ("-c", "exit 0"), 1: ("-c", "exit 0")}
    with _Started(root, SH, args, envs, _specs(root, tmp)) as pc:
        observed = (pc.name, pc.entrypoint, pc.nprocs, pc.args == args, pc.envs is envs,
                    {r: {k: _rel(v, tmp) for k, v in sorted(e.items())} for r, e in pc.envs.items()},
                    _rel_map(pc.stdouts, tmp), _rel_map(pc.error_files, tmp))
        pc.wait(-1, period=0.05)
    return observed


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext", "multiprocessing.api.RunProcsResult")
def case_mp_binary_exit_nonzero(root, tmp):
    with _Started(root, SH, {0: ("-c", "exit 3")}, _envs(1), _specs(root, tmp)) as pc:
        return _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_failure_stops_the_others(root, tmp):
    with _Started(root, SH, {0: ("-c", "sleep 0.3; exit 3"), 1: ("-c", "exec sleep 30")}, _envs(2),
                  _specs(root, tmp)) as pc:
        return _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_killed_by_signal(root, tmp):
    with _Started(root, SH, {0: ("-c", "kill -9 $$")}, _envs(1), _specs(root, tmp)) as pc:
        return _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.start_processes")
def case_mp_binary_missing(root, tmp):
    try:
        _Started(root, str(tmp / "no-such-binary"), {0: ()}, _envs(1), _specs(root, tmp))
        return "started"
    except Exception as e:  # noqa: BLE001 - the observation: code written against upstream catches the OSError
        return isinstance(e, FileNotFoundError), getattr(e, "errno", None)


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext", "multiprocessing.api.RunProcsResult")
def case_mp_function_raises(root, tmp):
    with _Started(root, mp_raise, {0: ("boom",)}, _envs(1), _specs(root, tmp)) as pc:
        result = pc.wait(-1, period=0.05)
    failure = result.failures[0]
    # str(): upstream's message is the record's dict here (a known difference of its own)
    return _result(result, tmp), "ValueError: boom" in str(failure.message), Path(failure.error_file).is_file()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except OSError:
        return False
    return state != "Z"


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_failure_stops_the_others(root, tmp):
    with _Started(root, mp_fail_after, {0: (0.3,), 1: (30,)}, _envs(2), _specs(root, tmp)) as pc:
        pids = pc.pids()
        result = _result(pc.wait(-1, period=0.05), tmp)
        return result, [_alive(p) for _, p in sorted(pids.items())]


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_killed_by_signal(root, tmp):
    with _Started(root, mp_kill_self, {0: ()}, _envs(1), _specs(root, tmp)) as pc:
        return _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_sys_exit_nonzero(root, tmp):
    with _Started(root, mp_exit, {0: (3,)}, _envs(1), _specs(root, tmp)) as pc:
        return _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_sys_exit_zero_without_return_value(root, tmp):
    with _Started(root, mp_exit, {0: (0,)}, _envs(1), _specs(root, tmp)) as pc:
        result = pc.wait(1, period=0.05)
        return None if result is None else (result.is_failed(), sorted(result.failures), result.return_values)


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_unpicklable_return_value(root, tmp):
    with _Started(root, mp_return_unpicklable, {0: ()}, _envs(1), _specs(root, tmp)) as pc:
        result = pc.wait(3, period=0.05)
        return None if result is None else (result.is_failed(), sorted(result.failures), result.return_values)


@case("multiprocessing.start_processes")
def case_mp_start_processes_envs_missing_a_rank(root, tmp):
    mp = module(root, "multiprocessing")
    try:
        mp.start_processes("trainer", SH, {0: ("-c", "exit 0"), 1: ("-c", "exit 0")}, _envs(1), _specs(root, tmp))
        return "started"
    except Exception as e:  # noqa: BLE001 - the observation: code written against upstream catches RuntimeError
        return isinstance(e, RuntimeError), str(e)


@case("multiprocessing.start_processes")
def case_mp_start_processes_ranks_not_from_zero(root, tmp):
    mp = module(root, "multiprocessing")
    try:
        mp.start_processes("trainer", SH, {1: ("-c", "exit 0")}, {1: {}}, _specs(root, tmp))
        return "started"
    except Exception as e:  # noqa: BLE001 - the observation
        return isinstance(e, RuntimeError), str(e)


@case("multiprocessing.start_processes")
def case_mp_start_processes_empty_args(root, tmp):
    mp = module(root, "multiprocessing")

    def run():
        pc = mp.start_processes("trainer", SH, {}, {}, _specs(root, tmp))
        try:
            return _result(pc.wait(1, period=0.05), tmp)
        finally:
            pc.close(timeout=1)

    return outcome(run, compare_message=False)


@case("multiprocessing.start_processes")
def case_mp_start_processes_bad_start_method(root, tmp):
    mp = module(root, "multiprocessing")
    return outcome(lambda: mp.start_processes("trainer", mp_double, {0: (1,)}, _envs(1), _specs(root, tmp),
                                              start_method="nope"), compare_message=False)


@case("multiprocessing.start_processes")
def case_mp_start_processes_entrypoint_not_callable(root, tmp):
    def run():
        with _Started(root, 42, {0: ()}, _envs(1), _specs(root, tmp)) as pc:
            return _result(pc.wait(3, period=0.05), tmp)

    return outcome(run, compare_message=False)


@case("multiprocessing.start_processes", "multiprocessing.api.PContext")
def case_mp_duplicate_stdout_filters(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, tee=api.Std.OUT)
    script = "echo keep 1; echo drop; echo keep 2"
    with _Started(root, SH, {0: ("-c", script), 1: ("-c", "echo keep from 1")}, _envs(2, TORCHELASTIC_RUN_ID="job"),
                  specs, duplicate_stdout_filters=["keep"]) as pc:
        result = pc.wait(-1, period=0.05)
    filtered = sorted(Path(result.stdouts[0]).parent.parent.glob("filtered_*.log"))
    return [(p.name, sorted(p.read_text().splitlines())) for p in filtered]


@case("multiprocessing.start_processes", "multiprocessing.api.PContext")
def case_mp_duplicate_filters_without_tee(root, tmp):
    with _Started(root, SH, {0: ("-c", "echo keep")}, _envs(1, TORCHELASTIC_RUN_ID="job"), _specs(root, tmp),
                  duplicate_stdout_filters=["keep"], duplicate_stderr_filters=["x"]) as pc:
        result = _result(pc.wait(-1, period=0.05), tmp)
    logs = [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files if f.endswith(".log")]
    return result, sorted((_rel(p, tmp), Path(p).read_text()) for p in logs)


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_local_ranks_filter_run(root, tmp):
    api = module(root, "multiprocessing.api")
    specs = _specs(root, tmp, redirects={1: api.Std.OUT}, local_ranks_filter={0})
    args = {r: ("-c", f"echo out{r}; echo err{r} >&2") for r in range(2)}
    with _Started(root, SH, args, _envs(2), specs) as pc:
        result = pc.wait(-1, period=0.05)
    return _result(result, tmp), Path(result.stdouts[1]).read_text()


@case("multiprocessing.start_processes", "multiprocessing.api.SubprocessContext")
def case_mp_binary_env_value_not_a_string(root, tmp):
    def run():
        with _Started(root, SH, {0: ("-c", "exit 0")}, {0: {"X": 1}}, _specs(root, tmp)) as pc:
            return _result(pc.wait(-1, period=0.05), tmp)

    return outcome(run, compare_message=False)


@case("multiprocessing.start_processes", "multiprocessing.api.MultiprocessContext")
def case_mp_function_name_with_a_slash(root, tmp):
    def run():
        mp = module(root, "multiprocessing")
        pc = mp.start_processes("role/trainer", mp_double, {0: (3,)}, _envs(1), _specs(root, tmp), start_method="fork")
        try:
            return _result(pc.wait(-1, period=0.05), tmp)
        finally:
            pc.close(timeout=1)

    return outcome(run)


# ---------------------------------------------------------------------------------------------- PContext lifecycle


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_wait_zero_and_short_timeout_while_running(root, tmp):
    with _Started(root, SH, {0: ("-c", "exec sleep 30")}, _envs(1), _specs(root, tmp)) as pc:
        start = time.monotonic()
        zero = pc.wait(0)
        short = pc.wait(0.2, period=0.05)
        took = time.monotonic() - start
    return zero, short, took < 1.5


@case("multiprocessing.api.PContext", "multiprocessing.api.MultiprocessContext")
def case_mp_function_wait_zero_while_running(root, tmp):
    with _Started(root, mp_sleep, {0: (30,)}, _envs(1), _specs(root, tmp)) as pc:
        return pc.wait(0), pc.wait(0.1, period=0.05)


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_wait_negative_blocks_until_done(root, tmp):
    with _Started(root, SH, {0: ("-c", "sleep 0.3")}, _envs(1), _specs(root, tmp)) as pc:
        start = time.monotonic()
        result = _result(pc.wait(-1, period=0.05), tmp)
        return result, time.monotonic() - start >= 0.2


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_binary_wait_again_after_result(root, tmp):
    with _Started(root, SH, {0: ("-c", "exit 2")}, _envs(1), _specs(root, tmp)) as pc:
        first = _result(pc.wait(-1, period=0.05), tmp)
        return first, _result(pc.wait(0), tmp), _result(pc.wait(-1, period=0.05), tmp)


@case("multiprocessing.api.PContext", "multiprocessing.api.MultiprocessContext")
def case_mp_function_wait_again_after_result(root, tmp):
    with _Started(root, mp_double, {0: (4,)}, _envs(1), _specs(root, tmp)) as pc:
        first = _result(pc.wait(-1, period=0.05), tmp)
        return first, _result(pc.wait(0), tmp)


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_binary_close_then_wait(root, tmp):
    with _Started(root, SH, {0: ("-c", "exec sleep 30"), 1: ("-c", "exec sleep 30")}, _envs(2),
                  _specs(root, tmp)) as pc:
        first = outcome(lambda: pc.close(timeout=1))
        second = outcome(lambda: pc.close(timeout=1))
        return first, second, _result(pc.wait(0), tmp)


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_binary_close_with_sigkill(root, tmp):
    with _Started(root, SH, {0: ("-c", "exec sleep 30")}, _envs(1), _specs(root, tmp)) as pc:
        pc.close(death_sig=signal.SIGKILL, timeout=1)
        return _result(pc.wait(0), tmp)


@case("multiprocessing.api.PContext", "multiprocessing.api.SubprocessContext")
def case_mp_binary_close_ignoring_sigterm_escalates(root, tmp):
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    api = module(root, "multiprocessing.api")
    with _Started(root, SH, {0: ("-c", script)}, _envs(1), _specs(root, tmp, redirects=api.Std.OUT)) as pc:
        out = Path(pc.stdouts[0])
        deadline = time.monotonic() + 5
        while "ready" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        pc.close(timeout=0.3)
        return _result(pc.wait(0), tmp)


@case("multiprocessing.api.PContext", "multiprocessing.api.MultiprocessContext")
def case_mp_function_close_then_wait(root, tmp):
    with _Started(root, mp_sleep, {0: (30,)}, _envs(1), _specs(root, tmp)) as pc:
        first = outcome(lambda: pc.close(timeout=0.3))
        second = outcome(lambda: pc.close(timeout=0.3))
        result = pc.wait(0)
        # the exit code depends on the forked worker's SIGTERM handler and the machine's speed: 1 or -9
        return first, second, None if result is None else (result.is_failed(), sorted(result.failures))


@case("multiprocessing.api.PContext", "multiprocessing.api.MultiprocessContext")
def case_mp_function_close_with_sigkill(root, tmp):
    with _Started(root, mp_sleep, {0: (30,)}, _envs(1), _specs(root, tmp)) as pc:
        pc.close(death_sig=signal.SIGKILL, timeout=1)
        return _result(pc.wait(0), tmp)


@case("multiprocessing.api.SubprocessContext", "multiprocessing.api.PContext")
def case_mp_subprocess_context_start_twice(root, tmp):
    api = module(root, "multiprocessing.api")
    pc = api.SubprocessContext("trainer", SH, {0: ("-c", "exit 0")}, _envs(1), _specs(root, tmp))
    try:
        pc.start()
        return outcome(pc.start), _result(pc.wait(-1, period=0.05), tmp)
    finally:
        pc.close(timeout=1)


@case("multiprocessing.api.MultiprocessContext", "multiprocessing.api.PContext")
def case_mp_multiprocess_context_start_twice(root, tmp):
    api = module(root, "multiprocessing.api")
    pc = api.MultiprocessContext("trainer", mp_double, {0: (1,)}, _envs(1), "fork", _specs(root, tmp))
    try:
        pc.start()
        return outcome(pc.start), _result(pc.wait(-1, period=0.05), tmp)
    finally:
        pc.close(timeout=1)


@case("multiprocessing.api.SubprocessContext", "multiprocessing.api.PContext")
def case_mp_subprocess_context_before_start(root, tmp):
    api = module(root, "multiprocessing.api")
    pc = api.SubprocessContext("trainer", SH, {0: ("-c", "exit 0")}, _envs(1), _specs(root, tmp))
    return outcome(pc.pids), outcome(lambda: pc.close(timeout=1))


@case("multiprocessing.api.MultiprocessContext", "multiprocessing.api.PContext")
def case_mp_multiprocess_context_close_before_start(root, tmp):
    api = module(root, "multiprocessing.api")
    pc = api.MultiprocessContext("trainer", mp_double, {0: (1,)}, _envs(1), "fork", _specs(root, tmp))
    return outcome(lambda: pc.close(timeout=1))


@case("multiprocessing.api.MultiprocessContext", "multiprocessing.api.PContext")
def case_mp_multiprocess_context_pids_before_start(root, tmp):
    api = module(root, "multiprocessing.api")
    pc = api.MultiprocessContext("trainer", mp_double, {0: (1,)}, _envs(1), "fork", _specs(root, tmp))
    try:
        return outcome(pc.pids, compare_message=False)
    finally:
        pc.close(timeout=1)


@case("multiprocessing.api.PContext")
def case_mp_pcontext_user_subclass_with_upstream_methods(root, tmp):
    api = module(root, "multiprocessing.api")

    class Done(api.PContext):
        def _start(self):
            self.started = True

        def _poll(self):
            return api.RunProcsResult(return_values=dict.fromkeys(range(self.nprocs), "done"))

        def pids(self):
            return {}

        def _close(self, death_sig, timeout=30):
            self.closed_with = death_sig.name

    def run():
        pc = Done("trainer", SH, {0: ()}, _envs(1), _specs(root, tmp))
        pc.start()
        result = _result(pc.wait(1, period=0.01), tmp)
        pc.close()
        return pc.started, result, pc.closed_with

    return outcome(run)


@case("multiprocessing.api.PContext")
def case_mp_pcontext_is_abstract(root, tmp):
    api = module(root, "multiprocessing.api")
    return outcome(lambda: api.PContext("trainer", SH, {0: ()}, _envs(1), _specs(root, tmp)))


test_same_observable_behaviour = same_behaviour_test(__name__)
