"""Pre-warmed worker interpreters: start workers as forks of an interpreter that already imported torch.

A restarted worker spends most of its start in the interpreter's own start-up and ``import torch`` (about a second of
CPU here). With a :class:`WorkerPool` the agent keeps one "zygote" interpreter (``_zygote.py``) that has imported the
preload list (``torch`` by default; never initialising CUDA/NPU, so forking stays safe) and starts each worker as a
fork of it, set up like a fresh ``python [-u] script.py args`` / ``python [-u] -m module args``: argv, ``__main__``,
``sys.path[0]``, environment, working directory, stdio (the same files a fresh worker would get, passed as
descriptors over a unix socket), its own session and process group, parent-death signal, CPU binding, signal
dispositions, exit status. The worker is the agent's child (double fork + child subreaper), so waiting, signalling
and stopping it go through the same code as for a fresh one.

Anything the pool cannot reproduce exactly starts a fresh interpreter instead, logged once per reason: an
entrypoint that is not the pool's interpreter (binaries, ``--no-python``), interpreter options other than the
pool's, a script that is not a plain source file (directory, zip), an environment that differs from the pool's in a
variable the launcher does not set per worker (it may matter at import time), or a pool that failed to start or to
preload. Known, documented differences: the forked worker has the preloaded modules in ``sys.modules`` already (so a
script that sets a variable torch reads while it loads -- e.g. ``TORCH_CPP_LOG_LEVEL`` -- in ``os.environ`` before its
``import torch`` gets torch as the pool loaded it; set such variables in the launcher's environment instead), shares
the zygote's string-hash secret, and the objects the preload created are frozen for the garbage collector
(``gc.freeze``: not in ``gc.get_objects()``, never collected). ``/proc/<pid>/environ`` shows the worker's own
environment: it is written over the zygote's initial one, which has room for it.

``elastic-run`` turns the pool on by default for workers that run this interpreter on a script or module that imports
torch itself (:func:`entry_imports_torch`); ``--prewarm`` turns it on for any Python entrypoint, ``--no-prewarm`` (or
``ELASTIC_IMPL_PREWARM=0``) off. The API (``LocalElasticAgent(..., prewarm=None)``) keeps upstream's fresh
interpreters unless ``prewarm=True`` or ``ELASTIC_IMPL_PREWARM=1``. The preload list is ``ELASTIC_IMPL_PREWARM_PRELOAD``
(comma-separated module names, default ``torch``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elastic_impl.multiprocessing import _zygote
from elastic_impl.multiprocessing.subprocess_handler.subprocess_handler import (
    IS_LINUX,
    SubprocessHandler,
    die_with_parent,
)

__all__ = ["PREWARM_ENV", "PRELOAD_ENV", "WorkerPool", "ForkedProcess", "prewarm_from_env", "prewarm_setting_from_env",
           "entry_imports_torch", "serving", "current_pool", "start_early", "pool_for", "close_early"]

logger = logging.getLogger(__name__)

PREWARM_ENV = "ELASTIC_IMPL_PREWARM"
PRELOAD_ENV = "ELASTIC_IMPL_PREWARM_PRELOAD"
DEFAULT_PRELOAD = ("torch",)
# Interpreter options the agent gives Python workers (run.py: ``python -u script``); the zygote is started with them.
DEFAULT_FLAGS = ("-u",)
# Options a pool's interpreter can be started with, so that workers forked from it run under the same ones: flags
# without a value that only set ``sys.flags`` or stdio buffering. (Not -P/-I: the pool sets ``sys.path[0]`` itself.)
POOL_FLAGS = frozenset({"-u", "-B", "-O", "-OO", "-s", "-E", "-b", "-bb", "-q"})
# How long a worker start waits for a zygote still preloading before starting a fresh interpreter instead.
READY_TIMEOUT_S = 120.0

# Variables the launcher sets per worker. They are read by the script at run time (never while importing torch), so
# a worker whose environment differs from the zygote's only in these is still a faithful fork.
PER_WORKER_ENV = frozenset({
    "LOCAL_RANK", "RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_TIMER_FILE",
    "ELASTIC_IMPL_WORKER_GROUP",
    # Set in the agent's own environment by the launcher once the agent is configured (possibly after the pool
    # started, see start_early), and read only when a worker starts processes of its own.
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
})

_PR_GET_CHILD_SUBREAPER = 37
_PR_SET_CHILD_SUBREAPER = 36
_BOOTSTRAP = (
    "import os, sys; sys.path[0] = os.environ.pop('ELASTIC_IMPL_ZYGOTE_PATH0'); "
    "import importlib.util as _u; _s = _u.spec_from_file_location('_elastic_impl_zygote', {path!r}); "
    "_m = _u.module_from_spec(_s); _s.loader.exec_module(_m); del _u, _s; _m.main()"
)


def prewarm_from_env() -> bool:
    raw = os.environ.get(PREWARM_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"invalid {PREWARM_ENV}: {raw!r} (allowed: 1/true/yes/on or 0/false/no/off)")


def prewarm_setting_from_env() -> bool | None:
    """``ELASTIC_IMPL_PREWARM`` as on/off, or None when it is not set (the caller's default applies)."""
    if not os.environ.get(PREWARM_ENV, "").strip():
        return None
    return prewarm_from_env()


# A line of the entry script that imports torch itself (``import torch``, ``import os, torch.nn``, ``from torch...``).
_IMPORTS_TORCH = re.compile(r"^[ \t]*(?:import[ \t]+(?:[\w.]+[ \t]*,[ \t]*)*torch\b|from[ \t]+torch\b)", re.MULTILINE)
_SCAN_BYTES = 1 << 20


def _module_source(name: str) -> Path | None:
    """The file ``python -m name`` would run, found without importing anything (finding a spec would import the
    parent packages, running user code in the launcher)."""
    parts = name.split(".")
    for base in [os.getcwd(), *sys.path[1:]]:
        if not base or not os.path.isdir(base):
            continue
        stem = Path(base, *parts)
        for candidate in (stem.with_suffix(".py"), stem / "__main__.py"):
            if candidate.is_file():
                return candidate
    return None


def _split_pool_flags(args: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(the leading interpreter options a pool can start with, the rest) of a worker's arguments."""
    words = [str(a) for a in args]
    count = next((i for i, w in enumerate(words) if w not in POOL_FLAGS), len(words))
    return words[:count], words[count:]


def entry_imports_torch(entrypoint: Any, args: Sequence[Any]) -> bool:
    """Whether workers ``entrypoint *args`` are this interpreter running a script or module that imports torch
    itself: the launcher's default turns the pool on for those (the pool then saves each start its ``import torch``)
    and leaves every other command to fresh interpreters, which a pool would not speed up."""
    if entrypoint != sys.executable:
        return False
    _, rest = _split_pool_flags(args)
    if not rest:
        return False
    if rest[0] == "-m":
        source = _module_source(rest[1]) if len(rest) > 1 else None
    else:
        source = Path(rest[0]) if not rest[0].startswith("-") else None
    if source is None:
        return False
    try:
        with open(source, "rb") as fh:
            text = fh.read(_SCAN_BYTES).decode("utf-8", "replace")
    except OSError:
        return False
    return _IMPORTS_TORCH.search(text) is not None


def preload_from_env() -> tuple[str, ...]:
    raw = os.environ.get(PRELOAD_ENV)
    if raw is None:
        return DEFAULT_PRELOAD
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    bad = [n for n in names if not all(part.isidentifier() for part in n.split("."))]
    if bad:
        raise ValueError(f"invalid {PRELOAD_ENV}: {bad[0]!r} is not a module name (expected e.g. 'torch,numpy')")
    return names


class ForkedProcess:
    """The agent's handle on a worker forked from the zygote: the part of ``subprocess.Popen`` the runtime uses."""

    def __init__(self, pid: int, args: Sequence[str]):
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere (the context's tree reaper): what Popen reports too
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def _is_subreaper() -> bool:
    from elastic_impl.multiprocessing.redirects import libc

    flag = ctypes.c_int(0)
    try:
        if libc is None or libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return flag.value == 1


class WorkerPool:
    """One pre-warmed interpreter that workers of ``interpreter [flags] script|-m module`` are forked from."""

    def __init__(self, interpreter: str = sys.executable, flags: Sequence[str] = DEFAULT_FLAGS,
                 preload: Sequence[str] | None = None, path0: str | None = None):
        self.interpreter = interpreter
        self.flags = tuple(flags)
        self.preload = tuple(preload_from_env() if preload is None else preload)
        self._path0 = path0 or os.getcwd()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._env: dict[str, str] = {}
        self._env_room = 0  # bytes of the zygote's initial environment block, which a worker's must fit
        self._ready: bool | None = None
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self.forked = 0  # workers started as forks (for tests and the benchmark's report)

    @classmethod
    def for_entrypoint(cls, entrypoint: Any, args: Sequence[Any], preload: Sequence[str] | None = None
                       ) -> WorkerPool | None:
        """A pool for an agent whose workers run ``entrypoint *args``; None (logged) when they cannot be forks.

        The pool's interpreter gets the workers' own leading interpreter options (``-u`` from elastic-run; none for
        ``python -m module`` from the API)."""
        options, _ = _split_pool_flags(args)
        probe = cls(flags=options, preload=preload)
        reason = probe._command_doubt(entrypoint, [str(a) for a in args])
        if reason:
            probe._log_fallback(reason)
            return None
        rest = [str(a) for a in args][len(probe.flags):]
        probe._path0 = os.getcwd() if rest[0] == "-m" else os.path.dirname(os.path.realpath(rest[0]))
        return probe

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the zygote (it preloads in the background; ``spawn`` waits for it when it must)."""
        if self._proc is not None:
            return
        if not IS_LINUX or not hasattr(socket, "send_fds"):
            self._broken = "pre-warmed workers need Linux and socket.send_fds"
            return
        if not _is_subreaper():
            self._broken = "cannot make the agent a child subreaper, so forked workers could not be its children"
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._env = dict(os.environ)
        env = dict(self._env)
        env.update({_zygote.ZYGOTE_FD_ENV: str(theirs.fileno()), "ELASTIC_IMPL_ZYGOTE_PRELOAD": ",".join(self.preload),
                    "ELASTIC_IMPL_ZYGOTE_PATH0": self._path0, _zygote.ENV_ROOM_ENV: "x" * _zygote.ENV_ROOM_BYTES})
        self._env_room = len(_zygote.env_block(env))
        parent = os.getpid() if threading.current_thread() is threading.main_thread() else None
        try:
            self._proc = subprocess.Popen(
                [self.interpreter, *self.flags, "-c", _BOOTSTRAP.format(path=_zygote.__file__)],
                env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=(lambda: die_with_parent(parent)) if parent else None)
        except OSError as e:
            self._broken = f"cannot start the pre-warmed interpreter: {e}"
            ours.close()
            return
        finally:
            theirs.close()
        self._sock = ours
        logger.info("prewarm: interpreter pid %s preloading %s", self._proc.pid, ", ".join(self.preload) or "nothing")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            # Killed, not asked to exit: an interpreter that has imported torch takes about a second to finalise (one
            # still importing finishes that first, then fails on the closed socket with a traceback on the agent's
            # stderr), and the agent's run() would return that much later. The zygote owns nothing by now: its
            # workers are the agent's children, in sessions of their own.
            proc.kill()
            proc.wait()

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str | None:
        """None once the zygote has preloaded; else why it cannot serve."""
        if self._broken:
            return self._broken
        if self._sock is None:
            return "the pool is not started"
        if self._ready is None:
            self._sock.settimeout(timeout)
            try:
                reply, _ = _zygote.recv_message(self._sock)
            except (TimeoutError, OSError) as e:
                self._broken = f"the pre-warmed interpreter did not get ready ({type(e).__name__}: {e})"
                return self._broken
            finally:
                if self._sock is not None:
                    self._sock.settimeout(None)
            if reply is None or not reply.get("ready"):
                why = (reply or {}).get("error", "it exited")
                self._broken = f"the pre-warmed interpreter could not preload {list(self.preload)}: {why}"
                return self._broken
            self._ready = True
        return None

    # ------------------------------------------------------------------ decisions

    def _command_doubt(self, entrypoint: Any, args: list[str]) -> str | None:
        if not isinstance(entrypoint, str):
            return f"entrypoint {entrypoint!r} is a function, not a Python command"
        if entrypoint != self.interpreter:
            return f"entrypoint {entrypoint!r} is not the pool's interpreter {self.interpreter!r}"
        if tuple(args[:len(self.flags)]) != self.flags:
            return f"interpreter options {args[:len(self.flags)]} differ from the pool's {list(self.flags)}"
        rest = args[len(self.flags):]
        if rest and rest[0].startswith("-") and rest[0] != "-m":
            return (f"interpreter option {rest[0]!r} is not one a pool can start with "
                    f"(allowed: {', '.join(sorted(POOL_FLAGS))})")
        if not rest:
            return f"arguments {args} are not [options] script|-m module ..."
        if rest[0] == "-m":
            return None if len(rest) > 1 else "-m without a module name"
        path = Path(rest[0])
        if not path.is_file():
            return f"script {rest[0]!r} is not a regular file"
        if zipfile.is_zipfile(path):
            return f"script {rest[0]!r} is a zip archive"
        return None

    def _env_doubt(self, env: dict[str, str]) -> str | None:
        for key in sorted(set(env) | set(self._env)):
            if key not in PER_WORKER_ENV and env.get(key) != self._env.get(key):
                return f"the worker's environment differs from the pool's in {key!r} (it may be read at import)"
        needed = len(_zygote.env_block(env))
        if needed > self._env_room:
            return f"the worker's environment ({needed} bytes) is larger than the pool's room for it ({self._env_room})"
        return None

    def _log_fallback(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("prewarm: starting a fresh interpreter instead of a pre-warmed one: %s", reason)

    # ------------------------------------------------------------------ starting a worker

    def spawn(self, entrypoint: str, args: Sequence[str], env: dict[str, str], stdout: Any, stderr: Any,
              cpus: set[int] | None = None) -> ForkedProcess | None:
        """Start ``entrypoint *args`` as a fork of the zygote; None (logged once per reason) to start it fresh."""
        args = [str(a) for a in args]
        reason = self._command_doubt(entrypoint, args) or self._env_doubt(env)
        fds = [0, stdout.fileno() if stdout else 1, stderr.fileno() if stderr else 2]
        try:
            for fd in fds:
                os.fstat(fd)
        except OSError:
            reason = reason or f"descriptor {fd} is not open in the agent"
        if reason is None:
            with self._lock:
                reason = self.wait_ready()
                if reason is None:
                    try:
                        return self._request(entrypoint, args, env, fds, cpus)
                    except (OSError, ValueError) as e:
                        self._broken = reason = f"the pre-warmed interpreter failed: {type(e).__name__}: {e}"
        self._log_fallback(reason)
        return None

    def _request(self, entrypoint: str, args: list[str], env: dict[str, str], fds: list[int],
                 cpus: set[int] | None) -> ForkedProcess:
        rest = args[len(self.flags):]
        module = rest[0] == "-m"
        request = {
            "argv": rest,
            "script": None if module else os.path.abspath(rest[0]),
            "orig_argv": [entrypoint, *args],
            "path0": os.getcwd() if module else os.path.dirname(os.path.realpath(rest[0])),
            "env": env,
            "cwd": os.getcwd(),
            "agent_pid": os.getpid(),
            # Linux's parent-death signal follows the thread: only workers started from the main thread get it.
            "die_with_agent": threading.current_thread() is threading.main_thread(),
            "cpus": sorted(cpus) if cpus else None,
            # (-E: a fresh interpreter ignores PYTHONUNBUFFERED)
            "unbuffered": "-u" in self.flags or ("-E" not in self.flags and bool(env.get("PYTHONUNBUFFERED"))),
        }
        assert self._sock is not None
        _zygote.send_message(self._sock, request, fds)
        reply, _ = _zygote.recv_message(self._sock)
        if reply is None:
            raise OSError("the pre-warmed interpreter exited")
        if "pid" not in reply:
            raise OSError(reply.get("error", "no pid in the reply"))
        self.forked += 1
        return ForkedProcess(int(reply["pid"]), [entrypoint, *args])


# ------------------------------------------------------------------------------- a pool started before the agent
# The launcher knows the workers' command as soon as it has parsed its options, long before the agent runs: its own
# ``import torch`` and the rendezvous handler's set-up come first. A pool started then preloads alongside all that.
_early: dict[tuple, WorkerPool | None] = {}
_early_lock = threading.Lock()


def _early_key(entrypoint: Any, args: Sequence[Any]) -> tuple:
    return (entrypoint, tuple(str(a) for a in args))


def start_early(entrypoint: Any, args: Sequence[Any]) -> WorkerPool | None:
    """Start the pool for an agent that this process will run with workers ``entrypoint *args``; the agent takes it
    with :func:`pool_for`. Call it once the environment the workers inherit is set (the zygote imports under it)."""
    if not isinstance(entrypoint, str):
        return None  # a function is never forked from the pool: the agent says so when it runs
    key = _early_key(entrypoint, args)
    with _early_lock:
        if key not in _early:
            pool = WorkerPool.for_entrypoint(entrypoint, args)
            if pool is not None:
                pool.start()
            _early[key] = pool
        return _early[key]


def pool_for(entrypoint: Any, args: Sequence[Any]) -> WorkerPool | None:
    """A started pool for workers ``entrypoint *args`` (the one :func:`start_early` started, if any), or None when
    they cannot be forks (logged). The caller closes it."""
    if isinstance(entrypoint, str):
        key = _early_key(entrypoint, args)
        with _early_lock:
            if key in _early:
                return _early.pop(key)
    pool = WorkerPool.for_entrypoint(entrypoint, args)
    if pool is not None:
        pool.start()
    return pool


def close_early() -> None:
    """Close the pools started early that no agent took (e.g. the launch failed before the agent ran)."""
    with _early_lock:
        pools = [pool for pool in _early.values() if pool is not None]
        _early.clear()
    for pool in pools:
        pool.close()


# ---------------------------------------------------------------------------------------- who uses the pool now
_current = threading.local()


@contextmanager
def serving(pool: WorkerPool | None) -> Iterator[None]:
    """Worker starts in this thread inside the block go through ``pool`` (None: fresh interpreters)."""
    previous = getattr(_current, "pool", None)
    _current.pool = pool
    try:
        yield
    finally:
        _current.pool = previous


def current_pool() -> WorkerPool | None:
    return getattr(_current, "pool", None)


class PrewarmedSubprocessHandler(SubprocessHandler):
    """A SubprocessHandler whose process is a fork of ``pool``'s zygote when the pool can start it faithfully."""

    def __init__(self, pool: WorkerPool, **kwargs: Any):
        self._pool = pool
        super().__init__(**kwargs)

    def _popen(self, args: tuple, env: dict[str, str]) -> Any:
        proc = self._pool.spawn(args[0], args[1:], env, self._stdout, self._stderr, self._numa_cpus)
        return proc if proc is not None else super()._popen(args, env)
