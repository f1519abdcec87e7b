"""Rows 20, 25, 26 of README's differences table, under one launcher (``torchrun`` or ``ours``).

row 25: a 1-node job of an empty script with one out-of-range ``--rdzv-conf`` option: exit code, seconds, lines;
row 26: a node of a ``--nnodes 2`` job waiting alone for 6 s: how many ``[c10d]`` lines it prints;
row 20: the endpoint is an HTTP server: how long until the launcher says so (or still nothing after 60 s).
"""
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
tool = sys.argv[1]
cmd = ["torchrun"] if tool == "torchrun" else [sys.executable, "-m", "elastic_impl.run"]
d = tempfile.mkdtemp(prefix="probe_")
script = os.path.join(d, "noop.py")
open(script, "w").write("pass\n")
env = dict(os.environ, PYTHONPATH=REPO)


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, limit, stop_after=None):
    out = open(os.path.join(d, "out"), "w+")
    start = time.monotonic()
    p = subprocess.Popen(cmd + args + [script], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        rc = p.wait(stop_after or limit)
    except subprocess.TimeoutExpired:
        p.terminate() if stop_after else p.kill()
        p.wait()
        rc = "stopped" if stop_after else f"still running after {limit} s"
    took = round(time.monotonic() - start, 2)
    out.seek(0)
    text = out.read()
    return rc, took, text


one_node = ["--nnodes", "1", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
for conf in ["heartbeat=inf", "join_timeout=inf", "missed_heartbeats=0", "missed_heartbeats=-1", "heartbeat=1e-9",
             "close_timeout=nan", "last_call_timeout=nan", "keep_alive_interval=inf", "keep_alive_max_attempt=0"]:
    rc, took, text = run(one_node + ["--rdzv-endpoint", f"127.0.0.1:{port()}", "--rdzv-conf", conf], 60)
    lines = text.splitlines()
    print(json.dumps({"row": 25, "conf": conf, "rc": rc, "s": took, "lines": len(lines), "last": (lines or [""])[-1][:200]}))

# the 6 s are measured while the process waits, the lines printed after the stop signal are not counted
rc, took, text = run(["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                      f"127.0.0.1:{port()}", "--rdzv-id", "alone"], 60, stop_after=6)
print(json.dumps({"row": 26, "c10d_lines": text.count("[c10d]"), "waitForInput": text.count("waitForInput")}))

class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
for conf in (["--rdzv-conf", "connect_timeout=5"], []):
    rc, took, text = run(one_node + ["--rdzv-endpoint", f"127.0.0.1:{server.server_address[1]}", *conf], 90)
    print(json.dumps({"row": 20, "conf": conf, "rc": rc, "s": took, "last": (text.splitlines() or [""])[-1][:200]}))
server.shutdown()
