"""The pre-warmed interpreter ("zygote") that ``elastic_impl.multiprocessing.prewarm`` forks workers from.

Runs in its own interpreter, started by the agent as ``python <flags> -c <bootstrap>``; loaded as a module that is
NOT in ``sys.modules`` and imports only the standard library, so a worker forked from here sees no trace of it
besides the preloaded modules. Protocol on the unix socket inherited as fd ``ZYGOTE_FD`` (one request at a time):

* zygote -> agent, once: ``{"ready": true}`` after the preload, or ``{"ready": false, "error": "..."}``.
* agent -> zygote: a length-prefixed JSON request (argv, env, cwd, agent pid, cpus) with the worker's stdin, stdout
  and stderr descriptors attached (SCM_RIGHTS).
* zygote -> agent: ``{"pid": <worker pid>}`` or ``{"error": "..."}``.

A worker is started with a double fork: the zygote forks a helper that forks the worker and exits, so the worker is
re-parented to the agent (a child subreaper) and the agent waits for it, gets its exit status and signals it like
any child it started itself.
"""

from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import os
import signal
import socket
import struct
import sys
import time
import types

ZYGOTE_FD_ENV = "ELASTIC_IMPL_ZYGOTE_FD"
# Room in the zygote's initial environment block for a worker's whole environment (see _show_environment).
ENV_ROOM_ENV = "ELASTIC_IMPL_ZYGOTE_ENV_ROOM"
ENV_ROOM_BYTES = 8192
_PR_SET_MM, _PR_SET_MM_ENV_END = 35, 11
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1


def send_message(sock: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    framed = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [framed], fds)
        framed = framed[sent:]
    if framed:
        sock.sendall(framed)


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One framed message and the descriptors that came with it; (None, []) when the peer closed the socket."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, max_fds) if max_fds else (sock.recv(1 << 16), [], 0, 0)
    except ConnectionResetError:  # the peer closed with our last reply unread
        return None, []
    if not data:
        return None, list(fds)
    while len(data) < _HEADER.size:
        more = sock.recv(1 << 16)
        if not more:
            return None, list(fds)
        data += more
    (length,) = _HEADER.unpack_from(data)
    while len(data) < _HEADER.size + length:
        more = sock.recv(1 << 16)
        if not more:
            return None, list(fds)
        data += more
    return json.loads(data[_HEADER.size:_HEADER.size + length]), list(fds)


def _accelerators_initialised() -> str | None:
    """Name of an accelerator runtime the preload initialised (forking after that is unsafe), else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    for name in ("cuda", "npu", "xpu", "hpu"):
        backend = getattr(torch, name, None)
        probe = getattr(backend, "is_initialized", None)
        try:
            if probe is not None and probe():
                return name
        except Exception:  # noqa: BLE001 - a broken probe is a doubt: refuse to serve
            return name
    return None


def serve(sock: socket.socket, preload: list[str]) -> dict | None:
    """Preload, then start workers until the agent closes the socket. Returns None in the zygote (time to exit), and
    the worker's request in a forked worker."""
    try:
        for name in preload:
            importlib.import_module(name)
        initialised = _accelerators_initialised()
        if initialised:
            raise RuntimeError(f"preloading {preload} initialised {initialised}; forking would not be safe")
        # What CPython's docs advise before forking without exec: the garbage collector leaves the preloaded objects
        # alone in the workers. Their pages stay shared with the zygote, and a worker's exit does not walk them:
        # finalising an interpreter that holds torch costs 0.4-1 s here, 0.1-0.2 s with them frozen -- time a worker
        # whose script never imports torch would otherwise add to every exit.
        gc.freeze()
    except BaseException as e:  # noqa: BLE001 - reported to the agent, which falls back to fresh interpreters
        send_message(sock, {"ready": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        return None
    send_message(sock, {"ready": True})
    while True:
        request, fds = recv_message(sock, max_fds=3)
        if request is None:
            for fd in fds:
                os.close(fd)
            return None  # the agent closed the pool (or died)
        try:
            pid = _fork_worker(sock, request, fds)
        except OSError as e:
            send_message(sock, {"error": f"{type(e).__name__}: {e}"})
            pid = -1
        if pid is None:
            return request  # this is the worker, set up: the caller runs its script (see main)
        if pid > 0:
            send_message(sock, {"pid": pid})
        for fd in fds:
            os.close(fd)


def _fork_worker(sock: socket.socket, request: dict, fds: list[int]) -> int | None:
    """Double fork. In the zygote: the worker's pid, once the helper between us has exited (so the worker has been
    re-parented to the agent). In the worker: None, with the worker's process set up.

    The worker returns up the stack instead of running the script in here, so that its SystemExit reaches the
    interpreter's top level through no ``finally`` of ours."""
    pid_read, pid_write = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(pid_read)
            ready_read, ready_write = os.pipe()
            helper_pid = os.getpid()
            worker = os.fork()
        except BaseException:  # noqa: BLE001 - the helper must never return into the zygote's loop
            os._exit(1)
        if worker == 0:
            os.close(ready_read)
            os.close(pid_write)
            _become_worker(sock, request, fds, ready_write, helper_pid)
            return None
        try:
            os.close(ready_write)
            os.read(ready_read, 1)  # the worker is in its own session: the agent may signal its group now
            os.write(pid_write, str(worker).encode())
        finally:
            os._exit(0)
    os.close(pid_write)
    try:
        raw = b""
        while chunk := os.read(pid_read, 64):
            raw += chunk
    finally:
        os.close(pid_read)
        os.waitpid(helper, 0)  # once the helper is reaped, the worker has been re-parented to the agent
    if not raw:
        raise OSError("the fork helper exited without starting a worker")
    return int(raw)


def _become_worker(sock: socket.socket, request: dict, fds: list[int], ready_fd: int, helper: int) -> None:
    try:
        os.setsid()  # own session and process group, like start_new_session=True
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        agent = int(request["agent_pid"])
        while os.getppid() == helper:  # the helper exits at once; then we belong to the agent (its subreaper)
            time.sleep(0.0005)
        if request.get("die_with_agent"):
            _die_with(agent)
        if os.getppid() != agent:
            os._exit(1)  # the agent is gone: nobody would ever wait for us
        if request.get("cpus"):
            os.sched_setaffinity(0, request["cpus"])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        sock.close()
        os.closerange(3, _max_fd())  # a fresh interpreter inherits no descriptor past stdio (close_fds=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _show_environment(request["env"])
        _reseed_after_fork()
        _reopen_stdio(unbuffered=bool(request["unbuffered"]))
    except BaseException as e:  # noqa: BLE001 - before the script runs: report on stderr, exit like a bad exec
        os.write(2, f"elastic_impl prewarm: could not start the worker: {type(e).__name__}: {e}\n".encode())
        os._exit(127)


def env_block(env: dict) -> bytes:
    """An environment as the kernel lays it out for a new program (and ``/proc/<pid>/environ`` shows it)."""
    return b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items())


def _show_environment(env: dict) -> None:
    """Write ``env`` over this process's initial environment block, the zygote's, as exec would have laid it out.

    ``/proc/<pid>/environ`` reads that block: tools that look there (and the agent, which finds a worker's
    double-forked daemons by the group mark in it) see the worker's own environment, inherited by what it forks.
    Nothing in the process points into the block any more: ``os.environ`` was rebuilt (unsetenv/putenv) above."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # field 3 onwards; env_start and env_end are fields 50 and 51
    start, end = int(fields[47]), int(fields[48])
    block = env_block(env)
    if len(block) > end - start:
        raise OSError(f"the worker's environment ({len(block)} bytes) does not fit the pool's ({end - start} bytes)")
    import ctypes

    ctypes.memmove(start, block.ljust(end - start, b"\0"), end - start)
    # Shorten the block to the environment itself where allowed (needs CAP_SYS_RESOURCE); else NULs pad it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_MM, _PR_SET_MM_ENV_END, ctypes.c_ulong(start + len(block)), 0, 0)


def _die_with(agent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent:  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 4096


def _reseed_after_fork() -> None:
    # Every fresh interpreter seeds numpy's global generator from the OS; forked workers would share the zygote's.
    # (``random`` reseeds itself after fork; torch's default generator has a fixed seed either way.)
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def _reopen_stdio(unbuffered: bool) -> None:
    """sys.std* over fds 0/1/2 as a fresh interpreter would open them (buffering depends on the new files)."""
    def text(fd: int, mode: str, old: io.TextIOWrapper | None) -> io.TextIOWrapper:
        encoding, errors = (old.encoding, old.errors) if old is not None else ("utf-8", "strict")
        raw = io.FileIO(fd, mode, closefd=False)
        writing = mode == "wb"
        buffer = raw if (writing and unbuffered) else (io.BufferedWriter(raw) if writing else io.BufferedReader(raw))
        line_buffering = writing and not unbuffered and (raw.isatty() or fd == 2)
        stream = io.TextIOWrapper(buffer, encoding=encoding, errors=errors, line_buffering=line_buffering,
                                  write_through=writing and unbuffered)
        stream.mode = mode.replace("b", "")  # type: ignore[misc]
        return stream

    sys.stdin = sys.__stdin__ = text(0, "rb", sys.__stdin__)  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = text(1, "wb", sys.__stdout__)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = text(2, "wb", sys.__stderr__)  # type: ignore[misc]


def _fresh_main() -> dict:
    main = types.ModuleType("__main__")
    main.__dict__.update({"__annotations__": {}, "__builtins__": builtins, "__loader__": None, "__spec__": None,
                          "__package__": None})
    sys.modules["__main__"] = main
    return main.__dict__


def _run_main(request: dict) -> None:
    """Run the script (or module) as ``__main__``; exit the way ``python script.py`` would."""
    argv = request["argv"]  # [script, *args] or ["-m", module, *args]
    sys.orig_argv[:] = request["orig_argv"]
    sys.path[0] = request["path0"]
    namespace = _fresh_main()
    try:
        if argv[0] == "-m":
            import runpy

            sys.argv[:] = ["-m", *argv[2:]]  # as python -m sets it; runpy puts the module's file in argv[0]
            from importlib.machinery import BuiltinImporter

            namespace["__loader__"] = BuiltinImporter
            runpy._run_module_as_main(argv[1], alter_argv=True)  # what ``python -m`` itself calls
        else:
            path = request["script"]
            sys.argv[:] = argv
            from importlib.machinery import SourceFileLoader

            namespace.update({"__file__": path, "__cached__": None,
                              "__loader__": SourceFileLoader("__main__", path)})
            with open(path, "rb") as f:
                code = compile(f.read(), path, "exec", dont_inherit=True)
            exec(code, namespace)
    except SystemExit:
        raise  # the interpreter turns it into the exit code, as for a fresh one
    except BaseException as e:  # noqa: BLE001 - report it as an uncaught exception of the script
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # our own frames are not the script's
        e.__traceback__ = tb  # the default hook prints the exception's own traceback
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, tb
        sys.excepthook(type(e), e, tb)
        if isinstance(e, KeyboardInterrupt):
            _exit_by_sigint()
        raise SystemExit(1) from None
    raise SystemExit(0)


def _exit_by_sigint() -> None:
    # An interpreter ended by an uncaught KeyboardInterrupt kills itself with SIGINT so its parent sees the signal.
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def main() -> None:
    fd = int(os.environ.pop(ZYGOTE_FD_ENV))
    sock = socket.socket(fileno=fd)
    preload = [name for name in os.environ.pop("ELASTIC_IMPL_ZYGOTE_PRELOAD", "").split(",") if name]
    os.environ.pop(ENV_ROOM_ENV, None)
    request = serve(sock, preload)
    if request is not None:
        _run_main(request)  # in a worker: raises SystemExit (or kills itself by SIGINT), as a fresh interpreter ends
