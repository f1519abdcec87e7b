"""A throw-away etcd server on loopback, for single-machine jobs and tests.

:class:`EtcdServer` starts the real ``etcd`` binary on free loopback ports with its own data directory, with the
v2 API enabled (``--enable-v2=true``; the v3 API and its JSON gateway are always on), and waits until it answers
``/health``. ``stop()`` ends it and removes what it created.

Binary lookup: ``$TORCHELASTIC_ETCD_BINARY_PATH`` (upstream's variable), then ``$ETCD_BINARY``, then ``etcd`` on
``PATH``, then ``/usr/bin/etcd``. A variable that names a missing file is an error rather than silently ignored.

No leftover servers: the server runs in its own session and is killed as a group by ``stop()``, at interpreter exit
(``weakref.finalize``), by garbage collection of the ``EtcdServer``, and (when started from the main thread on Linux) by the kernel
when the starting process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from typing import TextIO

__all__ = ["EtcdServer", "find_etcd_binary"]

logger = logging.getLogger(__name__)

_ENV_VARS = ("TORCHELASTIC_ETCD_BINARY_PATH", "ETCD_BINARY")
_FALLBACK_BINARY = "/usr/bin/etcd"


def find_etcd_binary() -> str:
    """Where the ``etcd`` binary is (see the module docstring); FileNotFoundError (one line) if nowhere."""
    for var in _ENV_VARS:
        value = os.environ.get(var)
        if value:
            if os.path.isfile(value) and os.access(value, os.X_OK):
                return value
            raise FileNotFoundError(f"${var}={value!r} is not an executable etcd binary")
    found = shutil.which("etcd")
    if found:
        return found
    if os.path.isfile(_FALLBACK_BINARY) and os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise FileNotFoundError(
        "etcd binary not found (looked at $TORCHELASTIC_ETCD_BINARY_PATH, $ETCD_BINARY, PATH, /usr/bin/etcd); "
        "install etcd-server or set ETCD_BINARY"
    )


def _reserve_port(host: str) -> socket.socket:
    """A listening socket on a free port; the caller closes it right before etcd binds the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(1)
    return sock


def _die_with_parent_of(parent_pid: int):
    """A preexec_fn: the kernel SIGKILLs etcd when the thread that started it (the main thread) dies."""
    from elastic_impl.multiprocessing.subprocess_handler.subprocess_handler import die_with_parent

    return lambda: die_with_parent(parent_pid)


def _kill_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGCONT)  # a paused (SIGSTOPped) etcd would otherwise ignore SIGTERM
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cleanup(proc_holder: list, remove_dirs: list) -> None:
    """Shared by stop(), atexit and the GC finalizer (must not reference the EtcdServer itself)."""
    _kill_group(proc_holder[0])
    proc_holder[0] = None
    for path in remove_dirs:
        shutil.rmtree(path, ignore_errors=True)
    remove_dirs.clear()


class EtcdServer:
    """A local etcd server on free loopback ports (upstream-compatible API).

    ``data_dir``: where etcd keeps its data (one sub-directory per start attempt). When not given, a temporary
    directory is created and removed by :meth:`stop`; a directory you pass is kept, only the attempt
    sub-directories created in it are removed.
    """

    def __init__(self, data_dir: str | None = None):
        # upstream's get_host()/get_endpoint() say "localhost"; etcd itself listens on the IPv4 loopback address,
        # which "localhost" names, so clients of either reach it
        self._host = "localhost"
        self._listen_ip = "127.0.0.1"
        self._port = -1
        self._peer_port = -1
        self._owns_base_dir = data_dir is None
        self._base_data_dir = data_dir if data_dir else tempfile.mkdtemp(prefix="elastic_etcd_")
        self._etcd_binary_path: str | None = None
        self._etcd_cmd: list[str] | None = None
        # Mutable holders so the finalizer/atexit hook can clean up without keeping ``self`` alive.
        self._proc_holder: list[subprocess.Popen | None] = [None]
        self._remove_dirs: list[str] = [self._base_data_dir] if self._owns_base_dir else []
        # Runs at garbage collection or interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _cleanup, self._proc_holder, self._remove_dirs)

    # ------------------------------------------------------------------ where it is

    def get_port(self) -> int:
        """The client port (-1 before :meth:`start`)."""
        return self._port

    def get_host(self) -> str:
        """The host the server listens on (loopback)."""
        return self._host

    def get_endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"{self._host}:{self._port}"

    def get_client(self):
        """A python-etcd (v2 API) client connected to this server."""
        import etcd

        return etcd.Client(host=self._host, port=self._port, version_prefix="/v2", read_timeout=10)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: int = 60, num_retries: int = 3, stderr: int | TextIO | None = None) -> None:
        """Start etcd and return once it is healthy.

        Each of ``num_retries`` attempts picks new ports and waits up to ``timeout`` seconds (port races with
        other processes are the usual reason to retry). Raises FileNotFoundError when there is no etcd binary,
        TimeoutError/RuntimeError when no attempt came up.
        """
        if self._proc_holder[0] is not None and self._proc_holder[0].poll() is None:
            raise RuntimeError(f"etcd server already running at {self.get_endpoint()}")
        binary = find_etcd_binary()
        self._etcd_binary_path = binary
        attempts = max(1, int(num_retries))
        last_error: Exception | None = None
        for attempt in range(attempts):
            data_dir = os.path.join(self._base_data_dir, str(attempt))
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            if not self._owns_base_dir:
                self._remove_dirs.append(data_dir)
            try:
                self._start_once(binary, data_dir, timeout, stderr)
                return
            except (RuntimeError, TimeoutError, OSError) as e:
                last_error = e
                logger.warning("etcd start attempt %d/%d failed: %s", attempt + 1, attempts, e)
                _kill_group(self._proc_holder[0])
                self._proc_holder[0] = None
                shutil.rmtree(data_dir, ignore_errors=True)
        assert last_error is not None
        raise last_error

    def _start_once(self, binary: str, data_dir: str, timeout: float, stderr) -> None:
        client_sock = _reserve_port(self._listen_ip)
        peer_sock = _reserve_port(self._listen_ip)
        self._port = client_sock.getsockname()[1]
        self._peer_port = peer_sock.getsockname()[1]
        client_url = f"http://{self._listen_ip}:{self._port}"
        peer_url = f"http://{self._listen_ip}:{self._peer_port}"
        self._etcd_cmd = [
            binary,
            "--name", "elastic-etcd",
            "--enable-v2=true",
            "--data-dir", data_dir,
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"elastic-etcd={peer_url}",
            "--logger", "zap",
            "--log-level", "error",
        ]
        logger.info("starting etcd: %s", " ".join(self._etcd_cmd))
        client_sock.close()
        peer_sock.close()
        in_main_thread = threading.current_thread() is threading.main_thread()
        self._proc_holder[0] = subprocess.Popen(
            self._etcd_cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
            start_new_session=True,
            preexec_fn=_die_with_parent_of(os.getpid()) if (in_main_thread and sys.platform.startswith("linux")) else None,
        )
        self._wait_until_healthy(timeout)

    def _wait_until_healthy(self, timeout: float) -> None:
        proc = self._proc_holder[0]
        assert proc is not None
        deadline = time.monotonic() + timeout
        url = f"http://{self._listen_ip}:{self._port}/health"
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"etcd ({self._etcd_binary_path}) exited with code {code} while starting")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if json.loads(response.read()).get("health") in ("true", True):
                        logger.info("etcd ready at %s (pid %d)", self.get_endpoint(), proc.pid)
                        return
                    last = "health check says not healthy"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.05)
        raise TimeoutError(f"etcd at {self.get_endpoint()} was not healthy within {timeout} s ({last})")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove the data it created. Idempotent."""
        _cleanup(self._proc_holder, self._remove_dirs)

    def pid(self) -> int | None:
        """The etcd process id while it runs (for tests that pause or kill it)."""
        proc = self._proc_holder[0]
        return proc.pid if proc is not None and proc.poll() is None else None


def find_free_port() -> socket.socket:
    """A socket listening on a free loopback port: it holds the port until you close it (close it right before the
    port's real user binds it)."""
    from elastic_impl.utils.distributed import get_socket_with_port

    return get_socket_with_port()


def stop_etcd(subprocess: subprocess.Popen | None, data_dir: str | None = None) -> None:
    """Terminate the etcd process ``subprocess`` (if it still runs) and wait for it, then delete ``data_dir``."""
    # The parameter is named ``subprocess`` (shadowing the module inside this function) because upstream names it so.
    if subprocess is not None and subprocess.poll() is None:
        logger.info("stopping etcd server (pid %d)", subprocess.pid)
        subprocess.terminate()
        subprocess.wait()
    if data_dir:
        logger.info("deleting etcd data dir %s", data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
