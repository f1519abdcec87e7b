"""Records what a worker can see of how it was started (one JSON line on stdout), then ends as argv[1] says."""
import json
import os
import re
import signal
import sys
import time

import __main__
from elastic_impl.multiprocessing.errors import record

observed = {
    "name": __name__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "file": __file__,
    "main_keys": sorted(k for k in vars(__main__) if k.startswith("__")), "spec": re.sub(" at 0x[0-9a-f]+", "", repr(__spec__)),
    "package": __package__, "cached": __cached__, "loader": type(__loader__).__name__,
    "env": {k: v for k, v in os.environ.items() if k in ("RANK", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE")},
    "signals": {s.name: str(signal.getsignal(s)) for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)},
    "orig_argv": sys.orig_argv, "stdio": [type(sys.stdout.buffer).__name__, sys.stdout.line_buffering,
                                          sys.stdout.write_through, sys.stderr.errors],
    "own_session": os.getsid(0) == os.getpid() == os.getpgid(0), "ppid": os.getppid(),
    "fds": sorted(int(f) for f in os.listdir("/proc/self/fd") if int(f) > 2),
    "stdin": os.readlink("/proc/self/fd/0"),
    "colorsys_preloaded": "colorsys" in sys.modules,  # only a pool told to preload it has it before we run
    # what tools (and the agent, looking for a worker's daemons by its group mark) read as this process's environment
    "proc_environ_is_ours": sorted(filter(None, open("/proc/self/environ", "rb").read().split(b"\0")))
    == sorted(os.fsencode(f"{k}={v}") for k, v in os.environ.items()),
}
print(json.dumps(observed), flush=True)
print("to stderr", file=sys.stderr, flush=True)


@record
def main(how: str) -> None:
    if how == "slow-raise":
        time.sleep(2)  # the other workers have printed by now: the failure stops them only after that
    if how in ("raise", "slow-raise"):
        raise RuntimeError("probe failed on purpose")
    if how == "exit3":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)


main(sys.argv[1])
