"""Store faults: restart the rendezvous store.

The store must outlive any node, so it runs in a process the simulator controls, never inside an agent:

- :class:`TCPStoreServer`: a ``torch.distributed.TCPStore`` server in its own process
  (``python -m fault_injection._store_host``). Its data is in memory: a restart loses every key, like a store host
  that reboots.
- :class:`EtcdStoreServer`: the real ``etcd`` binary via ``elastic_impl.rendezvous.etcd_server.EtcdServer`` with a
  data directory that survives restarts (etcd comes back with its keys; its client port may change).

:class:`RestartStore` stops the server (SIGKILL: a crash, not a clean shutdown) and starts it again, right away or
when healed (``downtime``). ``on_restarted(host, port)`` tells the caller where the store is now (the simulator
re-points its proxies).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from fault_injection.base import Fault, FaultError

__all__ = ["TCPStoreServer", "EtcdStoreServer", "RestartStore"]


class TCPStoreServer:
    """A TCPStore server process on 127.0.0.1. ``start()`` returns once it accepts connections."""

    def __init__(self, port: int = 0, env: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        self.host = "127.0.0.1"
        self.port = int(port)
        self._env = env
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> TCPStoreServer:
        if self.is_running():
            raise FaultError(f"TCPStore server already running at {self.endpoint} (pid {self.pid})")
        env = dict(os.environ if self._env is None else self._env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fault_injection._store_host", str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self._start_timeout
        line = b""
        assert self.proc.stdout is not None
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                err = self._stop_and_read_stderr()
                why = "timed out" if remaining <= 0 else "exited"
                raise FaultError(f"TCPStore server on port {self.port} {why} before serving: {err[-500:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 64)
                if not chunk:
                    continue
                line += chunk
        self.port = int(line.strip())
        return self

    def _stop_and_read_stderr(self) -> str:
        self.stop()
        try:
            return self.proc.stderr.read().decode(errors="replace") if self.proc and self.proc.stderr else ""
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        """SIGKILL the server (a crash: clients see their connections reset) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def restart(self) -> TCPStoreServer:
        """Stop, then start on the same port (empty: the keys are gone)."""
        self.stop()
        self.restarts += 1
        return self.start()

    def __enter__(self) -> TCPStoreServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EtcdStoreServer:
    """The real etcd server with a persistent data dir; ``restart()`` keeps the keys (the port may change)."""

    def __init__(self, data_dir: str | None = None) -> None:
        try:
            from elastic_impl.rendezvous.etcd_server import EtcdServer
        except ImportError as e:
            raise FaultError(f"etcd store needs elastic_impl.rendezvous.etcd_server: {e}") from None
        self._cls = EtcdServer
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="sim-etcd-")
        self.server = None
        self.host = "127.0.0.1"
        self.port = 0
        self.restarts = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.server.pid() if self.server is not None else None

    def start(self) -> EtcdStoreServer:
        self.server = self._cls(data_dir=self.data_dir)
        self.server.start()
        self.host, self.port = self.server.get_host(), int(self.server.get_port())
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        pid = server.pid()
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)  # a crash, not a clean shutdown
            except (ProcessLookupError, PermissionError):
                pass
        server.stop()

    def restart(self) -> EtcdStoreServer:
        self.stop()
        self.restarts += 1
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.data_dir, ignore_errors=True)


class RestartStore(Fault):
    """Crash the store (``inject``: SIGKILL, recorded as ``fault_start`` the moment it is down) and bring it back
    (``heal``: start again, recorded as ``fault_end``). ``downtime`` is how long the caller means to wait in between
    (0: heal at once); it is recorded with the fault."""

    kind = "restart_store"

    def __init__(self, server, downtime: float = 0.0, on_restarted: Callable[[str, int], None] | None = None,
                 on_event=None, **labels) -> None:
        if not isinstance(downtime, (int, float)) or downtime < 0:
            raise FaultError(f"invalid restart_store downtime {downtime!r}; expected seconds >= 0")
        super().__init__(on_event, downtime=downtime, **labels)
        self.server = server
        self.downtime = float(downtime)
        self.on_restarted = on_restarted

    def _inject(self) -> None:
        self.server.stop()

    def _heal(self) -> None:
        self.server.restarts += 1
        self.server.start()
        if self.on_restarted is not None:
            self.on_restarted(self.server.host, self.server.port)

    def _result_detail(self):
        return {"endpoint": self.server.endpoint}
