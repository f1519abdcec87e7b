"""What a check gets: the implementation under test, the device, a private temp dir and shared real resources.

Shared resources (one TCPStore server, one etcd server) are started lazily on first use and stopped by
:meth:`SuiteResources.close`, so the whole suite pays for each only once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from conformance.adapters import Adapter
from conformance.device import Device
from conformance.registry import CheckFailed, CheckSkipped

REPO_ROOT = Path(__file__).resolve().parent.parent
ETCD_BINARY = os.environ.get("ETCD_BINARY", "/usr/bin/etcd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ppid_and_start(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])  # ppid, starttime (clock ticks after boot)
    except (OSError, IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> int:
    info = _ppid_and_start(pid)
    return info[1] if info else 0


def descendants(root: int, started_after: int = 0) -> list[int]:
    """Live descendants of ``root`` started at or after ``started_after`` (multiprocessing helpers excluded)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_start(int(entry))
            if info:
                parents.setdefault(info[0], []).append(int(entry))
                starts[int(entry)] = info[1]
    found, stack = [], list(parents.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(parents.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if b"resource_tracker" in cmdline or b"forkserver" in cmdline or not cmdline:
            continue
        if starts.get(pid, 0) >= started_after:
            found.append(pid)
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_process_group(cmd: list[str], timeout: float, env: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill it and everything it started, then raise TimeoutExpired."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_pids(descendants(proc.pid))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class EtcdProcess:
    """A real etcd server on loopback (v2 API enabled), in its own session so it can be reaped as a group."""

    def __init__(self, workdir: Path) -> None:
        if not (os.path.isfile(ETCD_BINARY) and os.access(ETCD_BINARY, os.X_OK)):
            raise CheckSkipped(f"etcd binary {ETCD_BINARY} not found (install etcd-server or set ETCD_BINARY)")
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.host, self.port, peer = "127.0.0.1", free_port(), free_port()
            data_dir = workdir / f"etcd-{uuid.uuid4().hex[:8]}"
            self._log = open(workdir / f"{data_dir.name}.log", "wb")  # noqa: SIM115 (closed in stop)
            self.proc = subprocess.Popen(
                [
                    ETCD_BINARY, "--name", "conformance", "--data-dir", str(data_dir),
                    "--listen-client-urls", f"http://{self.host}:{self.port}",
                    "--advertise-client-urls", f"http://{self.host}:{self.port}",
                    "--listen-peer-urls", f"http://{self.host}:{peer}",
                    "--initial-advertise-peer-urls", f"http://{self.host}:{peer}",
                    "--initial-cluster", f"conformance=http://{self.host}:{peer}",
                    "--enable-v2=true",
                ],
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://{self.host}:{self.port}/v2/keys", timeout=1) as resp:
                        json.load(resp)
                    return
                except OSError as exc:
                    last_error = str(exc)
                    time.sleep(0.1)
            self.stop()
        raise CheckSkipped(f"etcd did not start on loopback: {last_error}")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self):
        import etcd  # python-etcd: the documented v2 client, independent of the implementation under test

        return etcd.Client(host=self.host, port=self.port, protocol="http", read_timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()


class SuiteResources:
    """Real servers shared by all checks of one certification run."""

    def __init__(self, adapter: Adapter, device: Device, workdir: Path) -> None:
        self.adapter = adapter
        self.device = device
        self.workdir = workdir
        self._store: Any = None
        self._etcd: EtcdProcess | None = None
        self.cache: dict[str, Any] = {}  # results of expensive real runs shared by several rows
        self._cleanups: list[Callable[[], None]] = []

    def tcp_store(self):
        """The shared master TCPStore (torch primitive, used by both implementations)."""
        if self._store is None:
            from torch.distributed import TCPStore

            self._store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        return self._store

    def tcp_store_client(self):
        from torch.distributed import TCPStore

        master = self.tcp_store()
        return TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=30))

    def etcd(self) -> EtcdProcess:
        if self._etcd is None:
            self._etcd = EtcdProcess(self.workdir)
        return self._etcd

    def shared(self, key: str, produce: Callable[[], Any]) -> Any:
        """Run an expensive real scenario once per certification; later rows get its result or its failure."""
        if key not in self.cache:
            try:
                self.cache[key] = ("ok", produce())
            except CheckSkipped:
                raise
            except BaseException as exc:
                self.cache[key] = ("error", exc)
                raise
        status, value = self.cache[key]
        if status == "error":
            raise CheckFailed(f"shared scenario {key!r} failed: {type(value).__name__}: {value}")
        return value

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:  # cleanup must go on for the rest
                pass
        self._cleanups.clear()
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        self._store = None


class CheckContext:
    """Handed to each check: resolve documented names in the implementation under test, assert, clean up."""

    def __init__(self, api: str, resources: SuiteResources) -> None:
        self.api = api
        self.resources = resources
        self.adapter = resources.adapter
        self.device = resources.device
        self.tmpdir = Path(tempfile.mkdtemp(prefix="check-", dir=resources.workdir))
        self._cleanups: list[Callable[[], None]] = []
        # Every expectation this check evaluated, in order: {"name", "status": PASS|FAIL, "message"} (the
        # per-assertion results, written as the subtests of wpt.json).
        self.assertions: list[dict[str, str]] = []

    # -- names -------------------------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        """The implementation's object for a documented path (relative to torch.distributed.elastic or full)."""
        full = path if path.startswith("torch.") else f"torch.distributed.elastic.{path}"
        return self.adapter.resolve(full)

    @property
    def impl_root(self) -> str:
        return self.adapter.root

    def run_id(self, tag: str) -> str:
        return f"conf-{tag}-{uuid.uuid4().hex[:8]}"

    # -- assertions --------------------------------------------------------------------------------------------
    def record(self, name: str, passed: bool, message: str = "") -> None:
        """Note one evaluated expectation (the expect* helpers do; a check may for one it evaluates itself)."""
        self.assertions.append({"name": name, "status": "PASS" if passed else "FAIL", "message": message})

    def expect(self, condition: Any, message: str) -> None:
        self.record(message, bool(condition), "" if condition else message)
        if not condition:
            raise CheckFailed(message)

    def expect_equal(self, actual: Any, expected: Any, what: str) -> None:
        failed = actual != expected
        message = f"{what}: got {actual!r}, documented {expected!r}" if failed else ""
        self.record(what, not failed, message)
        if failed:
            raise CheckFailed(message)

    def expect_failed_ranks(self, failures: dict, rank: int, exitcode: int, what: str) -> None:
        """``rank`` failed with ``exitcode``; any other rank reported is one the group stop killed by a signal.

        torch >= 2.x books the peers it SIGTERMs while stopping a failed group (a peer may still be exiting when
        ``rank`` fails), so a peer may appear, but only as killed by a signal -- never with an exit code of its own.
        """
        self.expect(rank in failures, f"{what}: {sorted(failures)} do not include rank {rank}")
        self.expect_equal(failures[rank].exitcode, exitcode, f"{what}: exit code of rank {rank}")
        others = {r: f.exitcode for r, f in failures.items() if r != rank}
        self.expect(all(code is not None and code < 0 for code in others.values()),
                    f"{what}: ranks other than {rank} reported with an exit code of their own: {others}")

    def expect_raises(self, exc_types: type | tuple, fn: Callable, *args: Any, what: str, **kwargs: Any) -> BaseException:
        names = exc_types.__name__ if isinstance(exc_types, type) else "/".join(t.__name__ for t in exc_types)
        try:
            fn(*args, **kwargs)
        except exc_types as exc:
            self.record(f"{what} raises {names}", True)
            return exc
        except Exception as exc:
            message = f"{what}: raised {type(exc).__name__}: {exc}, documented {names}"
            self.record(f"{what} raises {names}", False, message)
            raise CheckFailed(message) from exc
        message = f"{what}: returned normally, documented to raise {names}"
        self.record(f"{what} raises {names}", False, message)
        raise CheckFailed(message)

    @staticmethod
    def skip(reason: str) -> None:
        raise CheckSkipped(reason)

    # -- processes ---------------------------------------------------------------------------------------------
    def worker_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for child processes: they must import ``conformance`` and the implementation."""
        paths = [str(REPO_ROOT)] + [p for p in sys.path if p and os.path.isdir(p)]
        env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "CONFORMANCE_IMPL_ROOT": self.impl_root}
        env.update(extra or {})
        return env

    def worker_command(self, *args: str) -> tuple[str, tuple[str, ...]]:
        """(entrypoint, args) running ``python -m conformance.workers ARGS``."""
        return sys.executable, ("-m", "conformance.workers", *args)

    def run_python(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env.update(self.worker_env(env))
        return subprocess.run(
            [sys.executable, "-m", "conformance.workers", *args],
            capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(self.tmpdir),
        )

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)
