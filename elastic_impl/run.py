"""``elastic-run`` / ``python -m elastic_impl.run``: a torchrun-compatible launcher.

Accepts torchrun's options (dash and underscore spellings). Invalid options produce ONE line on stderr
(``elastic-run: error: ...``) and exit code 2. A failed job prints the failure report (root cause first) and exits
with code 1; an agent stopped by a signal exits with 128 + the signal number.

Extensions:

- ``--shutdown-grace`` (alias ``--shutdown-timeout``; env ``TORCHELASTIC_SHUTDOWN_GRACE``) = seconds between SIGTERM
  and SIGKILL when stopping workers (default 30).
- ``--rdzv-conf heartbeat=S,missed_heartbeats=N``: spellings of torchrun's ``keep_alive_interval`` /
  ``keep_alive_max_attempt``. A node whose agent stops heartbeating is dropped after S x N seconds (the failure
  detection window; default 5 x 3 = 15 s) and the survivors re-form without it.
- Workers' stderr is captured to a log file by default (shown on the console unchanged, as without capture), so a
  failure report can quote its last lines even when the script has no ``@record``. ``--redirects``/``--tee``
  override it; ``ELASTIC_IMPL_CAPTURE_STDERR=0`` turns it off.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import runpy
import shutil
import signal
import socket
import sys
import traceback
import uuid
from argparse import REMAINDER, ArgumentParser
from contextlib import closing
from typing import Any, NoReturn

from elastic_impl.launcher.api import LaunchConfig, LaunchConfigError, elastic_launch
from elastic_impl.multiprocessing.api import parse_signals_to_handle
from elastic_impl.multiprocessing.prewarm import (
    close_early,
    entry_imports_torch,
    prewarm_setting_from_env,
    start_early,
)
from elastic_impl.rendezvous.options import canonical_rdzv_configs

# torchrun's entry point group for --logs-specs plugins (a plugin for us subclasses our LogsSpecs).
LOGS_SPECS_GROUP = "torchrun.logs_specs"

__all__ = ["main", "run", "get_args_parser", "parse_args", "config_from_args", "parse_min_max_nnodes"]

logger = logging.getLogger(__name__)

PROG = "elastic-run"


class _OneLineArgumentParser(ArgumentParser):
    """argparse that reports usage errors as a single line (no usage dump) with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env_default(name: str, default: Any) -> Any:
    # torchrun lets every option default from PET_<OPTION> in the environment.
    return os.environ.get(f"PET_{name.upper()}", default)


# torchrun's flags read PET_<FLAG> as an integer, nonzero meaning on (its check_env action).
_ENV_FLAGS = {"standalone": "--standalone", "module": "--module", "no_python": "--no-python",
              "run_path": "--run-path", "virtual_local_rank": "--virtual-local-rank"}


def _env_flag(name: str) -> bool:
    """PET_<NAME> as torchrun reads a flag's variable: an integer, nonzero for on (unset or empty: off). A value
    that is not an integer reads as off here; parse_args reports it."""
    value = os.environ.get(f"PET_{name.upper()}", "").strip()
    try:
        return int(value) != 0 if value else False
    except ValueError:
        return False


def _check_env_flags(parser: ArgumentParser) -> None:
    for name, option in _ENV_FLAGS.items():
        variable = f"PET_{name.upper()}"
        value = os.environ.get(variable, "").strip()
        if value:
            try:
                int(value)
            except ValueError:
                parser.error(f"invalid {variable} value {os.environ[variable]!r}: expected 0 or 1 (an integer; "
                             f"nonzero turns {option} on, as torchrun reads it)")


# Options whose value came from a PET_* variable in the last parse_args, not from the command line: the error
# for a bad value names the variable ({'--nproc-per-node': 'PET_NPROC_PER_NODE'}).
_from_env: dict[str, str] = {}
# The options (dests) given on the command line in the last parse_args.
_given_on_command_line: set[str] = set()


class _StoreGiven(argparse._StoreAction):
    """store, and note that the option was given on the command line (see _from_env)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        given = set(getattr(namespace, "_given_on_command_line", ()))
        given.add(self.dest)
        namespace._given_on_command_line = given


_EPILOG = """\
environment (beyond torchrun's options):
  TORCHELASTIC_SHUTDOWN_GRACE=S      default for --shutdown-grace (seconds; default 30)
  TORCHELASTIC_ENABLE_FILE_TIMER=1   run a worker timer server; workers find its pipe in TORCHELASTIC_TIMER_FILE and
                                     are SIGKILLed when they overrun timer.expires(after=...)
  ELASTIC_IMPL_CAPTURE_STDERR=0      do not tee workers' stderr to log files (reports then cannot quote it)
  ELASTIC_IMPL_EVENTS_FILE=PATH      append the agent's structured events (JSON lines)
"""


def get_args_parser() -> ArgumentParser:
    """The launcher's argument parser (torchrun's options plus --shutdown-grace)."""
    parser = _OneLineArgumentParser(
        prog=PROG,
        description="Elastic training launcher (torchrun-compatible)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )

    env_options: dict[str, tuple[str, list[str]]] = {}
    parser._env_options = env_options  # type: ignore[attr-defined]  (dest -> option, its PET_* variables)

    def opt(*names: str, env: str, env_alias: str | None = None, **kwargs):
        kwargs.setdefault("default", None)
        if env_alias is not None:  # a second spelling of the variable, read when the first is not set
            kwargs["default"] = _env_default(env_alias, kwargs["default"])
        kwargs["default"] = _env_default(env, kwargs["default"])
        action = parser.add_argument(*names, action=_StoreGiven, **kwargs)
        option = next(n for n in names if n.startswith("--"))
        env_options[action.dest] = (option, [f"PET_{e.upper()}" for e in (env, env_alias) if e])

    opt("--nnodes", env="nnodes", type=str, default="1:1", help="Number of nodes, or MIN:MAX.")
    opt("--nproc-per-node", "--nproc_per_node", env="nproc_per_node", type=str, default="1",
        help="Workers per node: an int, or cpu, gpu, xpu, auto, or a device plugin's name (e.g. npu).")
    opt("--rdzv-backend", "--rdzv_backend", env="rdzv_backend", type=str, default="static",
        help="Rendezvous backend (c10d, etcd, etcd-v2, etcd-v3, static, ...).")
    opt("--rdzv-endpoint", "--rdzv_endpoint", env="rdzv_endpoint", type=str, default="",
        help="Rendezvous endpoint, host[:port].")
    opt("--rdzv-id", "--rdzv_id", env="rdzv_id", type=str, default="none", help="Job id shared by all nodes.")
    opt("--rdzv-conf", "--rdzv_conf", env="rdzv_conf", type=str, default="",
        help="Extra rendezvous settings: key1=value1,key2=value2 (join_timeout, last_call_timeout, close_timeout, "
             "read_timeout, is_host, heartbeat=S (= keep_alive_interval), missed_heartbeats=N "
             "(= keep_alive_max_attempt); a silent node is dropped after S x N seconds).")
    parser.add_argument("--standalone", action="store_true", default=_env_flag("standalone"),
                        help="Single-node job: local c10d rendezvous on a free port (ignores --rdzv-*).")
    opt("--max-restarts", "--max_restarts", env="max_restarts", type=str, default="0",
        help="Worker group restarts allowed before the job fails.")
    opt("--monitor-interval", "--monitor_interval", env="monitor_interval", type=str, default="0.1",
        help="Seconds between worker health checks.")
    opt("--start-method", "--start_method", env="start_method", type=str, default="spawn",
        help="Start method for function entrypoints: spawn, fork, forkserver.")
    opt("--event-log-handler", "--event_log_handler", env="event_log_handler", type=str, default="null",
        help="Registered event handler name.")
    opt("--role", env="role", type=str, default="default", help="Worker role name.")
    parser.add_argument("-m", "--module", action="store_true", default=_env_flag("module"), help="Run the script as a module (python -m).")
    parser.add_argument("--no-python", "--no_python", action="store_true", default=_env_flag("no_python"),
                        help="Execute the script directly instead of with python.")
    parser.add_argument("--run-path", "--run_path", action="store_true", default=_env_flag("run_path"),
                        help="Run the script with runpy.run_path in the worker interpreter.")
    opt("--log-dir", "--log_dir", env="log_dir", type=str, default=None, help="Base directory for worker logs.")
    opt("-r", "--redirects", env="redirects", type=str, default="0",
        help="Redirect std streams to files: 0-3 or local_rank:value,...")
    opt("-t", "--tee", env="tee", type=str, default="0", help="Tee std streams to files and console.")
    opt("--local-ranks-filter", "--local_ranks_filter", env="local_ranks_filter", type=str, default="",
        help="Only show console output of these local ranks (comma separated).")
    opt("--node-rank", "--node_rank", env="node_rank", type=str, default="0",
        help="Node rank (static rendezvous only).")
    opt("--master-addr", "--master_addr", env="master_addr", type=str, default="127.0.0.1",
        help="Master address (static rendezvous only).")
    opt("--master-port", "--master_port", env="master_port", type=str, default="29500",
        help="Master port (static rendezvous only).")
    opt("--local-addr", "--local_addr", env="local_addr", type=str, default=None,
        help="Address of this node as seen by peers.")
    opt("--shutdown-grace", "--shutdown_grace", "--shutdown-timeout", "--shutdown_timeout", env="shutdown_grace",
        env_alias="shutdown_timeout", type=str, default=None, dest="shutdown_grace",
        help="Seconds between SIGTERM and SIGKILL when stopping workers (default: $TORCHELASTIC_SHUTDOWN_GRACE or 30).")
    opt("--log-line-prefix-template", "--log_line_prefix_template", env="log_line_prefix_template", type=str,
        default=None, help="Per-line prefix template for worker output (${role_name}, ${rank}, ${local_rank}).")
    opt("--duplicate-stdout-filters", "--duplicate_stdout_filters", env="duplicate_stdout_filters", type=str,
        default=None, help="Also copy the teed stdout lines that contain any of these strings (comma separated; "
                           "',,' is a literal comma) to filtered_stdout.log in the attempt's log folder.")
    opt("--duplicate-stderr-filters", "--duplicate_stderr_filters", env="duplicate_stderr_filters", type=str,
        default=None, help="As --duplicate-stdout-filters, for stderr (filtered_stderr.log).")
    parser.add_argument("--logs-specs", "--logs_specs", type=str, default=None,
                        help="Name of an entry point in group 'torchrun.logs_specs': a LogsSpecs subclass (of "
                             "elastic_impl.multiprocessing.LogsSpecs) that decides where worker logs go.")
    from elastic_impl.multiprocessing.numa_binding import AFFINITY_MODES

    parser.add_argument("--numa-binding", "--numa_binding", type=str, choices=AFFINITY_MODES, default=None,
                        help="Bind each worker to CPUs near the GPU of its local rank (needs CUDA GPUs).")
    opt("--signals-to-handle", "--signals_to_handle", env="signals_to_handle", type=str,
        default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        help="Signals that make the agent stop its workers and leave (comma-separated names, e.g. add SIGUSR1).")
    parser.add_argument("--virtual-local-rank", "--virtual_local_rank", action="store_true",
                        default=_env_flag("virtual_local_rank"),
                        help="Every worker gets LOCAL_RANK=0 and sees only its own GPU, as device 0 "
                             "(CUDA_VISIBLE_DEVICES).")
    parser.add_argument("--prewarm", action="store_true", default=None,
                        help="Beyond torchrun: start Python workers as forks of an interpreter that already imported "
                             "torch (ELASTIC_IMPL_PREWARM_PRELOAD lists the modules); also ELASTIC_IMPL_PREWARM=1. "
                             "Default: on when the script (or -m module) imports torch itself. Anything it cannot "
                             "start faithfully gets a fresh interpreter (logged once).")
    parser.add_argument("--no-prewarm", "--no_prewarm", dest="prewarm", action="store_false",
                        help="Start every worker as a fresh interpreter, as torchrun does (also ELASTIC_IMPL_PREWARM=0).")
    parser.add_argument("training_script", type=str, help="The training program (and its arguments after it).")
    parser.add_argument("training_script_args", nargs=REMAINDER)
    return parser


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    _check_env_flags(parser)
    parsed = parser.parse_args(args)
    given = getattr(parsed, "_given_on_command_line", set())
    if hasattr(parsed, "_given_on_command_line"):
        del parsed._given_on_command_line
    _given_on_command_line.clear()
    _given_on_command_line.update(given)
    _from_env.clear()
    for dest, (option, variables) in parser._env_options.items():  # type: ignore[attr-defined]
        variable = next((v for v in variables if v in os.environ), None)
        if variable is not None and dest not in given:
            _from_env[option] = variable
    return parsed


def _bad(option: str, value: Any, allowed: str) -> LaunchConfigError:
    origin = f" (from {_from_env[option]})" if option in _from_env else ""
    return LaunchConfigError(f"invalid {option} value {value!r}{origin}: {allowed}")


def _parse_int(option: str, value: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _bad(option, value, f"expected an integer >= {minimum}") from None
    if number < minimum:
        raise _bad(option, value, f"expected an integer >= {minimum}")
    return number


def _parse_float(option: str, value: str, minimum: float, inclusive: bool) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    ok = number >= minimum if inclusive else number > minimum
    if not ok:  # also false for nan
        relation = ">=" if inclusive else ">"
        raise _bad(option, value, f"expected a number of seconds {relation} {minimum:g}")
    return number


def parse_min_max_nnodes(nnodes: str) -> tuple[int, int]:
    """``"N"`` -> (N, N); ``"MIN:MAX"`` -> (MIN, MAX) with 1 <= MIN <= MAX."""
    allowed = "expected N or MIN:MAX with 1 <= MIN <= MAX"
    parts = str(nnodes).split(":")
    if len(parts) not in (1, 2):
        raise _bad("--nnodes", nnodes, allowed)
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        raise _bad("--nnodes", nnodes, allowed) from None
    min_nodes, max_nodes = values[0], values[-1]
    if min_nodes < 1 or max_nodes < min_nodes:
        raise _bad("--nnodes", nnodes, allowed)
    return min_nodes, max_nodes


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def determine_local_world_size(nproc_per_node: str) -> int:
    """``--nproc-per-node``: an integer, ``cpu`` (usable CPUs), ``gpu`` (CUDA devices), ``xpu``, the name of the
    accelerator a device plugin registered (``npu`` with torch_npu loaded), or ``auto`` (the current accelerator's
    devices, else the usable CPUs)."""
    value = str(nproc_per_node).strip()
    allowed = "expected an integer >= 1, or one of cpu, gpu, xpu, auto or a device plugin's name (e.g. npu)"
    if value.lstrip("-").isdigit():
        number = int(value)
        if number < 1:
            raise _bad("--nproc-per-node", nproc_per_node, allowed)
        return number
    if value == "cpu":
        return _usable_cpus()
    if not value.isidentifier():
        raise _bad("--nproc-per-node", nproc_per_node, allowed)
    _quiet_store_waits()
    import torch  # only here: importing torch costs ~1 s

    def count(kind: str, module) -> int:
        if module is None or not module.is_available() or module.device_count() < 1:
            raise _bad("--nproc-per-node", nproc_per_node, f"no {kind} device is available on this machine")
        return module.device_count()

    if value == "gpu":
        return count("CUDA", torch.cuda)
    if value == "xpu":
        return count("XPU", getattr(torch, "xpu", None))
    if value == "auto":
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and accelerator.is_available():
            return accelerator.device_count()
        if torch.cuda.is_available():
            return torch.cuda.device_count()
        return _usable_cpus()
    plugin = torch._C._get_privateuse1_backend_name()
    if value == plugin:
        return count(plugin, getattr(torch, plugin, None))
    if value in ("npu", "hpu", "mlu", "musa"):  # a vendor's device whose plugin is not loaded here
        raise _bad("--nproc-per-node", nproc_per_node,
                   f"no {value} device plugin is loaded (the registered plugin device is {plugin!r}); {allowed}")
    raise _bad("--nproc-per-node", nproc_per_node, allowed)


def _parse_rdzv_conf(conf: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` as options under their canonical names (the options module's one alias table);
    their values are checked where the launcher builds the rendezvous options."""
    pairs: list[tuple[str, str]] = []
    for item in (conf or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _bad("--rdzv-conf", conf, f"entry {item!r} is not key=value (expected key1=value1,key2=value2)")
        pairs.append((key.strip(), value.strip()))
    try:
        return canonical_rdzv_configs(pairs)
    except ValueError as e:
        raise _bad("--rdzv-conf", conf, str(e)) from None


def _comma_separated(value: str | None) -> list[str]:
    """torchrun's filter list: items split at ',', where ',,' is a comma inside an item."""
    if value is None:
        return []
    return [item.replace("\0", ",") for item in str(value).replace(",,", "\0").split(",")]


def _logs_specs_class(name: str | None) -> type:
    """The LogsSpecs class registered as entry point ``name`` in group ``torchrun.logs_specs`` (default: ours)."""
    from elastic_impl.multiprocessing import DefaultLogsSpecs, LogsSpecs

    if name is None:
        return DefaultLogsSpecs
    from importlib import metadata

    registered = {ep.name: ep for ep in metadata.entry_points(group=LOGS_SPECS_GROUP)}
    if name not in registered:
        raise _bad("--logs-specs", name, f"expected the name of an entry point in group {LOGS_SPECS_GROUP!r} "
                   f"(installed: {', '.join(sorted(registered)) or 'none'})")
    cls = registered[name].load()
    if not (isinstance(cls, type) and issubclass(cls, LogsSpecs)):
        raise _bad("--logs-specs", name, f"entry point {registered[name].value!r} is {cls!r}, expected a subclass "
                   "of elastic_impl.multiprocessing.LogsSpecs")
    return cls


def _parse_std(option: str, value: str):
    from elastic_impl.multiprocessing import Std

    try:
        return Std.from_str(str(value))
    except (ValueError, KeyError, TypeError):
        raise _bad(option, value, "expected 0-3 (none, out, err, all) or local_rank:value,...") from None


def _parse_local_ranks_filter(value: str | None, nproc_per_node: int) -> set[int] | None:
    """--local-ranks-filter: the local ranks whose console output is shown (empty: all). A rank no worker has would
    hide that output silently (torchrun shows nothing for '9' on a one-worker node)."""
    if value is None or not str(value).strip():
        return None
    ranks_allowed = f"local ranks: 0..{nproc_per_node - 1} with --nproc-per-node {nproc_per_node}"
    ranks: set[int] = set()
    for item in str(value).split(","):
        try:
            rank = int(item.strip())
        except ValueError:
            raise _bad("--local-ranks-filter", value,
                       f"expected comma-separated local ranks, e.g. 0,1 ({ranks_allowed})") from None
        if not 0 <= rank < nproc_per_node:
            raise _bad("--local-ranks-filter", value, f"local rank {rank} does not exist ({ranks_allowed})")
        ranks.add(rank)
    return ranks


def _warn_filters_without_tee(tee, nproc_per_node: int, stdout_filters: list[str], stderr_filters: list[str]) -> None:
    """The duplicate filters copy teed lines only: without a tee of their stream their file stays empty (torchrun
    says nothing)."""
    from elastic_impl.multiprocessing.api import Std, to_map

    teed = to_map(tee, nproc_per_node).values()
    for option, filters, stream, flag in (("--duplicate-stdout-filters", stdout_filters, "stdout", Std.OUT),
                                          ("--duplicate-stderr-filters", stderr_filters, "stderr", Std.ERR)):
        if filters and not any(std & flag for std in teed):
            logger.warning("%s copies teed %s lines only, and no local rank tees %s: filtered_%s.log will stay "
                           "empty (add --tee %d or --tee 3)", option, stream, stream, stream, int(flag))


def _check_log_dir(log_dir: str | None) -> None:
    """A --log-dir that names a file, or lies under one, is one line before anything starts (torchrun: a
    traceback)."""
    if not log_dir or log_dir == os.devnull:
        return
    allowed = "expected a directory for the workers' logs (made if missing)"
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise _bad("--log-dir", log_dir, f"it is a file; {allowed}")
    ancestor = os.path.dirname(os.path.abspath(log_dir))
    while not os.path.exists(ancestor) and ancestor != os.path.dirname(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise _bad("--log-dir", log_dir, f"{ancestor!r} is a file; {allowed}")


def _check_log_dir_writable(log_dir: str) -> None:
    """Each run's logs go in a new folder inside --log-dir, made after the rendezvous: a folder that takes no files
    would fail the agent only then (with its peers waiting on it). Probed with an unnamed temporary file."""
    if log_dir == os.devnull or not os.path.isdir(log_dir):
        return  # a custom LogsSpecs may use the value otherwise
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as e:
        raise _bad("--log-dir", log_dir, f"is not writable: {e.strerror or e}") from None


def _is_std_none(value) -> bool:
    if isinstance(value, dict):
        return all(int(v) == 0 for v in value.values())
    return int(value) == 0


def _get_free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_script_path(training_script: str, *training_script_args: str) -> None:
    """Worker entrypoint for --run-path: run the script in this interpreter as ``__main__``."""
    sys.argv = [training_script, *training_script_args]
    runpy.run_path(training_script, run_name="__main__")


def config_from_args(args: argparse.Namespace) -> tuple[LaunchConfig, Any, list[str]]:
    """Validate the parsed options; return (LaunchConfig, entrypoint command or function, its arguments)."""
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    nproc_per_node = determine_local_world_size(args.nproc_per_node)
    max_restarts = _parse_int("--max-restarts", args.max_restarts, 0)
    monitor_interval = _parse_float("--monitor-interval", args.monitor_interval, 0.0, inclusive=False)
    if args.start_method not in ("spawn", "fork", "forkserver"):
        raise _bad("--start-method", args.start_method, "expected one of spawn, fork, forkserver")
    if not args.role or not args.role.strip():
        raise _bad("--role", args.role, "expected a non-empty name")
    if args.module and args.no_python:
        raise LaunchConfigError("--module and --no-python cannot be used together")
    for flag, given in (("--no-python", args.no_python), ("--module", args.module)):
        if args.run_path and given:
            raise LaunchConfigError(f"--run-path and {flag} cannot be used together (--run-path runs a Python script "
                                    "file in the worker's interpreter)")
    if not args.rdzv_backend or not args.rdzv_backend.strip():
        raise _bad("--rdzv-backend", args.rdzv_backend, "expected a backend name such as c10d, etcd or static")
    from elastic_impl.rendezvous import rendezvous_handler_registry

    # The registry's own error keeps upstream's wording for API users; on the command line, name what is allowed.
    if args.rdzv_backend not in rendezvous_handler_registry.names():
        raise _bad("--rdzv-backend", args.rdzv_backend,
                   f"registered backends: {', '.join(rendezvous_handler_registry.names())}")
    if args.rdzv_backend != "static" and max_nodes > 1 and args.rdzv_id == "":
        # torchrun gives an empty id a random one: each node would wait in a run of its own until the join timeout
        raise _bad("--rdzv-id", args.rdzv_id, "expected the job's id, the same on every node (with an empty one each "
                   "node would get a random id of its own and the nodes would never meet)")
    rdzv_configs: dict[str, Any] = _parse_rdzv_conf(args.rdzv_conf)
    shutdown_grace = (
        _parse_float("--shutdown-grace", args.shutdown_grace, 0.0, inclusive=True)
        if args.shutdown_grace is not None
        else None
    )
    if shutdown_grace is None:
        from elastic_impl.agent.server.local_elastic_agent import shutdown_grace_from_env

        try:
            shutdown_grace = shutdown_grace_from_env()
        except ValueError as e:
            raise LaunchConfigError(str(e)) from None
    node_rank = _parse_int("--node-rank", args.node_rank, 0)
    master_port = _parse_int("--master-port", args.master_port, 0)
    if master_port > 65535:
        raise _bad("--master-port", args.master_port, "expected an integer in 0..65535")

    rdzv_endpoint = args.rdzv_endpoint
    if args.rdzv_backend == "static":
        if node_rank >= max_nodes:
            raise _bad("--node-rank", args.node_rank, f"expected 0 <= node rank < nnodes ({max_nodes})")
        if min_nodes != max_nodes:
            raise _bad("--nnodes", args.nnodes, "the static backend needs a fixed node count N, not MIN:MAX")
        rdzv_configs["rank"] = node_rank
        if not rdzv_endpoint:
            master_addr = args.master_addr.strip()
            if not master_addr:
                raise _bad("--master-addr", args.master_addr, "expected the host name or IP address of node rank 0")
            # torchrun documents IPv6 as [addr]; a bare IPv6 address gets its brackets here
            bare_ipv6 = ":" in master_addr and not master_addr.startswith("[")
            rdzv_endpoint = f"[{master_addr}]:{master_port}" if bare_ipv6 else f"{master_addr}:{master_port}"
    redirects = _parse_std("--redirects", args.redirects)
    tee = _parse_std("--tee", args.tee)
    duplicate_stdout_filters = _comma_separated(args.duplicate_stdout_filters)
    duplicate_stderr_filters = _comma_separated(args.duplicate_stderr_filters)
    try:
        parse_signals_to_handle(args.signals_to_handle)
    except ValueError as e:
        raise LaunchConfigError(f"invalid --signals-to-handle value: {e}") from None
    numa_options = None
    if args.numa_binding is not None:
        from torch.numa.binding import (  # torch's options type, as LaunchConfig takes it
            AffinityMode,
            NumaOptions,
        )

        numa_options = NumaOptions(affinity_mode=AffinityMode(args.numa_binding))
    _warn_filters_without_tee(tee, nproc_per_node, duplicate_stdout_filters, duplicate_stderr_filters)
    capture_stderr = False
    # (Not with stderr filters: they copy what the user tees, and the capture would tee stderr unasked.)
    if (_is_std_none(redirects) and _is_std_none(tee) and not duplicate_stderr_filters
            and os.environ.get("ELASTIC_IMPL_CAPTURE_STDERR", "1") != "0"):
        # Tee stderr to a file and print it unprefixed: the console looks as without it, and a failure report
        # can quote the worker's last stderr lines even without @record (upstream prints "<N/A>" there).
        from elastic_impl.multiprocessing import Std

        tee = Std.ERR
        capture_stderr = True
    ranks_filter = _parse_local_ranks_filter(args.local_ranks_filter, nproc_per_node)
    logs_specs_class = _logs_specs_class(args.logs_specs)
    _check_log_dir(args.log_dir)
    try:
        logs_specs = logs_specs_class(log_dir=args.log_dir, redirects=redirects, tee=tee, local_ranks_filter=ranks_filter)
    except OSError as e:  # the folder could not be made (the checks above cover the common causes)
        raise _bad("--log-dir", args.log_dir, f"cannot be made a directory: {e.strerror or e}") from None
    if args.log_dir:
        _check_log_dir_writable(args.log_dir)

    if nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Like torchrun: N workers each using every core would oversubscribe the machine.
        os.environ["OMP_NUM_THREADS"] = "1"
        logger.warning("Setting OMP_NUM_THREADS=1 for each worker to avoid overloading the system.")

    config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc_per_node,
        run_id=args.rdzv_id,
        role=args.role,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_backend=args.rdzv_backend,
        rdzv_configs=rdzv_configs,
        max_restarts=max_restarts,
        monitor_interval=monitor_interval,
        start_method=args.start_method,
        log_line_prefix_template=args.log_line_prefix_template,
        local_addr=args.local_addr,
        event_log_handler=args.event_log_handler,
        logs_specs=logs_specs,
        shutdown_timeout=shutdown_grace,
        numa_options=numa_options,
        signals_to_handle=args.signals_to_handle,
        duplicate_stdout_filters=duplicate_stdout_filters,
        duplicate_stderr_filters=duplicate_stderr_filters,
        virtual_local_rank=args.virtual_local_rank,
        prewarm=args.prewarm,
    )
    if capture_stderr and args.log_line_prefix_template is None:
        config.log_line_prefix_template = ""  # the teed stderr shows as the worker wrote it

    cmd: Any
    cmd_args: list[str] = []
    if args.run_path:
        cmd = _run_script_path
        cmd_args.append(args.training_script)
    elif args.no_python:
        cmd = args.training_script
    else:
        cmd = os.getenv("PYTHON_EXEC", sys.executable)
        cmd_args.append("-u")
        if args.module:
            cmd_args.append("-m")
        cmd_args.append(args.training_script)
    cmd_args.extend(args.training_script_args)
    return config, cmd, cmd_args


def run(args: argparse.Namespace) -> None:
    """Launch the job described by parsed ``args`` (raises on failure; see ``main`` for exit codes)."""
    if args.standalone:
        _check_standalone(args)
        args.rdzv_backend = "c10d"
        args.rdzv_endpoint = f"localhost:{_get_free_port()}"
        args.rdzv_id = str(uuid.uuid4())
        logger.info("standalone: c10d rendezvous at %s, run id %s", args.rdzv_endpoint, args.rdzv_id)
    config, cmd, cmd_args = config_from_args(args)
    _check_training_program(args)
    if config.numa_options is not None and isinstance(cmd, str):
        # The agent chooses each binary worker's CPUs when it starts it: find out now, before this node joins the
        # rendezvous, whether it can (one line, exit 1 -- not a failed agent's traceback after the job formed).
        from elastic_impl.multiprocessing.numa_binding import worker_cpus

        for local_rank in range(config.nproc_per_node):
            worker_cpus(config.numa_options, local_rank)
    if config.prewarm is None:
        config.prewarm = _default_prewarm(cmd, cmd_args)
    if config.prewarm:
        # The pool's interpreter imports torch while this one does (next line) and while the rendezvous handler is
        # set up: the workers' environment is final by now (OMP_NUM_THREADS above).
        start_early(cmd, cmd_args)
    _quiet_store_waits()
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    finally:
        close_early()


def _check_standalone(args: argparse.Namespace) -> None:
    """--standalone hosts the rendezvous on a free local port that no other node is told of: one node only, and the
    --rdzv-* options it replaces are named (torchrun drops them silently)."""
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    if max_nodes > 1:
        raise _bad("--nnodes", args.nnodes, "--standalone runs a single node on a private local rendezvous (expected "
                   "1; for several nodes drop --standalone and give --rdzv-backend and --rdzv-endpoint)")
    ignored = [f"{option} {getattr(args, dest)!r}"
               for dest, option in (("rdzv_backend", "--rdzv-backend"), ("rdzv_endpoint", "--rdzv-endpoint"),
                                    ("rdzv_id", "--rdzv-id"))
               if dest in _given_on_command_line or option in _from_env]
    if ignored:
        logger.warning("--standalone ignores %s: it hosts its own c10d rendezvous on a free local port",
                       ", ".join(ignored))


def _check_training_program(args: argparse.Namespace) -> None:
    """A training script or binary that is not there is one line before this node joins anything.

    torchrun starts the workers anyway: a missing script fails every worker (after the rendezvous, with a failure
    report per rank), and a missing --no-python binary fails the agent with a traceback. Modules (-m) are left to
    the interpreter: finding one without importing its parent packages is not reliable.
    """
    program = args.training_script
    if args.module:
        return
    if args.no_python:
        if os.sep in program:
            if not os.path.isfile(program):
                raise LaunchConfigError(f"training program {program!r} not found (no such file; cwd {os.getcwd()})")
            if not os.access(program, os.X_OK):
                raise LaunchConfigError(f"training program {program!r} is not executable (--no-python runs it "
                                        "directly: chmod +x, or drop --no-python for a Python script)")
        elif shutil.which(program) is None:
            raise LaunchConfigError(f"training program {program!r} not found on PATH (--no-python runs it directly)")
        return
    if not os.path.exists(program):
        raise LaunchConfigError(f"training script {program!r} not found (cwd {os.getcwd()}; "
                                "-m runs a module, --no-python a binary)")


def _default_prewarm(cmd: Any, cmd_args: list[str]) -> bool:
    """Neither --prewarm nor --no-prewarm: ELASTIC_IMPL_PREWARM if set, else on for a script that imports torch.

    Pre-warming is what makes a restart take a fraction of a second instead of an interpreter start plus
    ``import torch`` per worker (issue 15's benchmarks); for any other command it would only cost the pool's memory.
    """
    setting = prewarm_setting_from_env()
    if setting is not None:
        return setting
    if isinstance(cmd, str) and entry_imports_torch(cmd, cmd_args):
        logger.info("prewarm: on by default (the workers' script imports torch); --no-prewarm starts fresh "
                    "interpreters instead")
        return True
    return False


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def _quiet_store_waits() -> None:
    """Load torch with its C++ log level at FATAL for this process only.

    A node waiting for its peers waits on the TCPStore with short timeouts, and every timed-out wait makes torch's
    C++ socket code print two ``[c10d] waitForInput ... timed out`` warnings (about 3 lines a second, for as long
    as the wait lasts). A node whose store does not answer yet (its host not up, a wrong port) retries it, and each
    try logs a C++ error with its stack (some 20 ``frame #N`` lines). The agent's only C++ is the store, whose
    failures reach Python as exceptions the launcher words itself, so nothing below FATAL is kept. The level is read
    once, when torch loads, so the variable is set around the import and then removed again: the workers inherit
    the user's environment unchanged. A level the user set wins.
    """
    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "WARNING").upper(),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    parsed = parse_args(args)
    try:
        run(parsed)
    except LaunchConfigError as e:
        _fail(str(e), 2)
    except Exception as e:
        sigval = getattr(e, "sigval", None)
        if sigval is not None:
            sigval = signal.Signals(sigval)
            sys.stderr.write(f"{PROG}: agent stopped by {sigval.name}; workers stopped\n")
            sys.exit(128 + int(sigval))
        from elastic_impl.multiprocessing.errors import ChildFailedError

        if isinstance(e, ChildFailedError):
            sys.stderr.write(e.format_msg() + "\n")  # type: ignore[attr-defined]
            sys.exit(1)
        detail = str(e).strip().splitlines()
        _fail(f"{type(e).__name__}: {detail[0]}" if detail else type(e).__name__, 1)


def console_main(args: list[str] | None = None) -> NoReturn:
    """``main``, then end the process at once with its exit code (the ``elastic-run`` command, ``python -m``).

    Store calls abandoned on a dead or cut-off store run on daemon threads blocked in TCPStore's C++ code. One that
    returns while the interpreter tears itself down is unwound through C++ frames that forbid it, and the process
    aborts ("terminate called without an active exception"): the agent exited with SIGABRT (-6) instead of its
    own code, seen in a live scenario. So the exit handlers run (log files, temporary directories, logging), the
    output is flushed, and the process ends without the teardown, where nothing is left to do."""
    code: int | str | None = 0
    _open_closed_std_fds()
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


def _open_closed_std_fds() -> None:
    """Give a closed stdin/stdout/stderr (``elastic-run ... 2>&-``) /dev/null. Otherwise sys.stderr is None (every
    error line failed: exit 1 and an AttributeError traceback instead of exit 2), and the next file or socket opened
    would take descriptor 2 and receive what is written to stderr (torch's C++ log, the workers' stderr)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free descriptor is taken first: the closed one, unless a lower one is too
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def exit_now(code: int | str | None) -> NoReturn:
    """Run the exit handlers, flush, and end the process with ``code`` (as ``sys.exit`` reads it), skipping the
    interpreter's teardown (see ``console_main``)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status & 0xFF)


if __name__ == "__main__":
    console_main()
