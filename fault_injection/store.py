"""Store faults: restart the rendezvous store.

The store must outlive any node, so it runs in a process the simulator controls, never inside an agent:

- :class:`TCPStoreServer`: a ``torch.distributed.TCPStore`` server in its own process
  (``python -m fault_injection._store_host``). Its data is in memory: a restart loses every key, like a store host
  that reboots.
- :class:`EtcdStoreServer`: the real ``etcd`` binary with a data directory and ports that survive restarts (etcd
  comes back with its keys on the same endpoint).

:class:`RestartStore` stops the server (SIGKILL: a crash, not a clean shutdown) and starts it again, right away or
when healed (``downtime``). ``on_restarted(host, port)`` tells the caller where the store is now (the simulator
re-points its proxies).

:class:`FreezeStore` SIGSTOPs every process of the store (a host that hangs: connections stay open, nothing is
answered) until healed (SIGCONT). :class:`KillStoreLeader` SIGKILLs the member of an :class:`EtcdCluster` that leads
now (the others elect a new leader); healing starts that member again on its data dir, so it rejoins.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from fault_injection.base import Fault, FaultError
from fault_injection.processes import kill_session

__all__ = ["TCPStoreServer", "EtcdStoreServer", "EtcdCluster", "RestartStore", "FreezeStore", "KillStoreLeader"]

logger = logging.getLogger(__name__)


class _ServerProcess:
    """A store server in its own process session: where it listens, whether it runs, crash and restart."""

    host = "127.0.0.1"
    port = 0
    proc: subprocess.Popen | None = None
    restarts = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        """SIGKILL the server's whole session (a crash, not a clean shutdown) and reap it."""
        if self.proc is not None:
            kill_session(self.proc)

    def restart(self):
        """Stop, then start on the same port (what survives is the server's business: see the subclasses)."""
        self.stop()
        self.restarts += 1
        return self.start()


class TCPStoreServer(_ServerProcess):
    """A TCPStore server process on 127.0.0.1. ``start()`` returns once it accepts connections; a restart comes
    back empty (the keys are gone)."""

    def __init__(self, port: int = 0, env: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        self.host = "127.0.0.1"
        self.port = int(port)
        self._env = env
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

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

    def __enter__(self) -> TCPStoreServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdStoreServer(_ServerProcess):
    """The real etcd binary on loopback with ONE data dir and fixed ports across restarts, so a restarted etcd comes
    back with its keys on the same endpoint (v2 API enabled; the v3 API is always on)."""

    def __init__(self, data_dir: str | None = None, binary: str | None = None, start_timeout: float = 60.0,
                 name: str = "sim") -> None:
        self.name = name
        self.initial_cluster: str | None = None  # "name=peer_url,...": set by EtcdCluster for its members
        if binary is None:
            try:
                from elastic_impl.rendezvous.etcd_server import find_etcd_binary
            except ImportError as e:
                raise FaultError(f"etcd store: cannot locate the etcd binary ({e}); pass binary=") from None
            try:
                binary = find_etcd_binary()
            except FileNotFoundError as e:
                raise FaultError(f"etcd store: {e}") from None
        self.binary = binary
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="sim-etcd-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._start_timeout = start_timeout

    @property
    def peer_url(self) -> str:
        if not self.port:
            self.port, self.peer_port = _free_port(), _free_port()
        return f"http://{self.host}:{self.peer_port}"

    def start(self) -> EtcdStoreServer:
        self._launch()
        return self._wait_healthy()

    def _launch(self) -> None:
        if self.is_running():
            raise FaultError(f"etcd already running at {self.endpoint} (pid {self.pid})")
        peer = self.peer_url
        client = f"http://{self.host}:{self.port}"
        cmd = [self.binary, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", self.initial_cluster or f"{self.name}={peer}", "--enable-v2=true"]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()

    def _wait_healthy(self) -> EtcdStoreServer:
        import urllib.request

        client = f"http://{self.host}:{self.port}"
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as reply:
                    if b"true" in reply.read():
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                exited = self.proc.poll()
                self.stop()
                # The reason goes into the error itself: the data dir (and its log) may be removed right after.
                raise FaultError(f"etcd at {self.endpoint} did not become healthy "
                                 f"({'exited ' + str(exited) if exited is not None else 'still starting'}; "
                                 f"{self.data_dir}/etcd.log ends: {self._log_tail()})")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 3) -> str:
        try:
            with open(os.path.join(self.data_dir, "etcd.log"), "rb") as fh:
                tail = fh.read()[-4000:].decode("utf-8", "replace").strip().splitlines()[-lines:]
        except OSError as e:
            return f"<unreadable: {e}>"
        return " | ".join(line.strip()[:300] for line in tail) or "<empty>"

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """A real etcd cluster of ``size`` members on loopback (each its own process, ports and data dir). Its
    ``endpoint`` lists every member (``h1:p1,h2:p2,...``), as a client configured for a cluster would."""

    # Ports are chosen free, then released for etcd to bind: another process (a parallel test) can take one in
    # between, and the member then exits ("address already in use"). A start that fails is retried on fresh ports.
    START_ATTEMPTS = 3

    def __init__(self, size: int = 3, binary: str | None = None, start_timeout: float = 60.0) -> None:
        if size < 1:
            raise FaultError(f"invalid etcd cluster size {size!r}; expected >= 1")
        self._size, self._binary, self._start_timeout = size, binary, start_timeout
        self.members = self._new_members()

    def _new_members(self) -> list[EtcdStoreServer]:
        members = [EtcdStoreServer(binary=self._binary, start_timeout=self._start_timeout, name=f"m{i}")
                   for i in range(self._size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for member in members:
            member.initial_cluster = initial
        return members

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self) -> EtcdCluster:
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                for member in self.members:  # all at once: a member is healthy only once a quorum elected a leader
                    member._launch()
                for member in self.members:
                    member._wait_healthy()
                return self
            except FaultError as e:
                self.close()
                if attempt == self.START_ATTEMPTS:
                    raise FaultError(f"etcd cluster of {self._size} did not start in {attempt} attempts: {e}") from None
                logger.warning("etcd cluster start failed (attempt %d of %d), retrying on fresh ports: %s",
                               attempt, self.START_ATTEMPTS, e)
                self.members = self._new_members()
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def leader(self) -> EtcdStoreServer:
        """The member that leads now (asked of each running member through the v3 maintenance API)."""
        import json
        import urllib.request

        for member in self.members:
            if not member.is_running():
                continue
            request = urllib.request.Request(f"http://{member.endpoint}/v3/maintenance/status", data=b"{}",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=2) as reply:
                    status = json.loads(reply.read())
            except OSError:
                continue
            if status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"):
                return member
        raise FaultError("etcd cluster has no leader right now")

    def close(self) -> None:
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


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


class FreezeStore(Fault):
    """SIGSTOP the process group of every store server in ``servers`` (all members of an etcd cluster freeze
    together, like one hung machine hosting them); heal: SIGCONT. The servers were started in sessions of their own,
    so the group is exactly the server."""

    kind = "freeze_store"

    def __init__(self, servers, on_event=None, **labels) -> None:
        self.servers = list(servers)
        if not self.servers:
            raise FaultError("freeze_store needs at least one store server, got none")
        super().__init__(on_event, **labels)

    def _inject(self) -> list[int]:
        pids = [server.pid for server in self.servers if server.is_running()]
        if not pids:
            raise FaultError(f"freeze_store: no store server is running ({', '.join(s.endpoint for s in self.servers)})")
        for pid in pids:
            os.killpg(pid, signal.SIGSTOP)
        return pids

    def _heal(self) -> None:
        for pid in self.result or []:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:  # crashed meanwhile: nothing left to thaw
                pass

    def _result_detail(self):
        return {"pids": self.result}


class KillStoreLeader(Fault):
    """SIGKILL the etcd member that leads ``cluster`` now (the survivors elect another while a quorum is left);
    heal: start the killed member again on its data dir (it rejoins as a follower)."""

    kind = "kill_store_leader"

    def __init__(self, cluster: EtcdCluster, on_event=None, **labels) -> None:
        if len(cluster.members) < 3:
            raise FaultError(f"kill_store_leader needs an etcd cluster of at least 3 members (a quorum survives), "
                             f"got {len(cluster.members)}")
        super().__init__(on_event, **labels)
        self.cluster = cluster
        self.member: EtcdStoreServer | None = None

    def _inject(self) -> str:
        self.member = self.cluster.leader()
        self.member.stop()
        return self.member.name

    def _heal(self) -> None:
        if self.member is not None and not self.member.is_running():
            self.member.restarts += 1
            self.member.start()

    def _result_detail(self):
        return {"member": self.result, "endpoint": self.member.endpoint if self.member else None}
