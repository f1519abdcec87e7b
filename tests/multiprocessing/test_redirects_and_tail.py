"""redirect/redirect_stdout/get_std_cm (file-descriptor level, in a real child process) and tail_logfile, run
against ours and upstream's."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import threading
import time

import pytest

IMPLS = ["elastic_impl", "torch.distributed.elastic"]

# Writes through Python, C stdio (printf: fully buffered when stdout is not a terminal, so it only reaches the file
# if the redirect flushes C's buffer before switching back) and a child shell, then prints after the redirect.
# PYTHONUNBUFFERED would make C's stdout unbuffered too (Python sets it so), hiding a missing flush: the child runs
# without it.
_CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
_CHILD = """
import ctypes, os, sys
from {impl}.multiprocessing import redirects
from {impl}.multiprocessing.api import get_std_cm
libc = ctypes.CDLL("libc.so.6")
print("before", flush=True)
with {call}:
    print("python line", flush=True)
    libc.printf(b"c line\\n")
    os.system("echo shell line")
print("after", flush=True)
"""


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "call",
    [
        'redirects.redirect("stdout", sys.argv[1])',
        "redirects.redirect_stdout(sys.argv[1])",
        "get_std_cm(sys.argv[1], redirects.redirect_stdout)",
    ],
)
def test_redirect_catches_python_c_and_child_output(impl, call, tmp_path):
    target = tmp_path / "out.log"
    target.write_text("stale content\n")  # the redirect truncates
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(impl=impl, call=call), str(target)],
        capture_output=True, text=True, timeout=60, env=_CHILD_ENV,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["before", "after"]
    assert sorted(target.read_text().splitlines()) == ["c line", "python line", "shell line"]


@pytest.mark.parametrize("impl", IMPLS)
def test_get_std_cm_without_a_file_does_not_redirect(impl, tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(impl=impl, call='get_std_cm("", redirects.redirect_stdout)'), "unused"],
        capture_output=True, text=True, timeout=60, env=_CHILD_ENV,
    )
    assert child.returncode == 0, child.stderr
    assert sorted(child.stdout.splitlines()) == ["after", "before", "c line", "python line", "shell line"]


@pytest.mark.parametrize("impl", IMPLS)
def test_redirect_rejects_an_unknown_stream(impl, tmp_path):
    redirects = importlib.import_module(f"{impl}.multiprocessing.redirects")
    with pytest.raises(ValueError, match="stdin"):
        with redirects.redirect("stdin", str(tmp_path / "x")):
            pass


def _tail_in_thread(tail_log, file: str, dst: io.StringIO, finished: threading.Event, **kwargs) -> threading.Thread:
    thread = threading.Thread(
        target=tail_log.tail_logfile, args=("[r0]:", file, dst, finished, 0.01), kwargs=kwargs, daemon=True
    )
    thread.start()
    return thread


@pytest.mark.parametrize("impl", IMPLS)
def test_tail_logfile_follows_a_file_created_later(impl, tmp_path):
    tail_log = importlib.import_module(f"{impl}.multiprocessing.tail_log")
    path = tmp_path / "stdout.log"
    dst, finished = io.StringIO(), threading.Event()
    thread = _tail_in_thread(tail_log, str(path), dst, finished, log_line_filter=lambda line: "drop" not in line)
    time.sleep(0.1)  # the file does not exist yet: the tailer waits for it
    with open(path, "w") as f:
        f.write("one\ndrop this\n")
        f.flush()
        time.sleep(0.1)  # followed while it grows
        f.write("two\n")
    finished.set()  # the rest up to end of file is still copied
    thread.join(10)
    assert not thread.is_alive()
    assert dst.getvalue() == "[r0]:one\n[r0]:two\n"


@pytest.mark.parametrize("impl", IMPLS)
def test_tail_logfile_returns_when_finished_before_the_file_exists(impl, tmp_path):
    tail_log = importlib.import_module(f"{impl}.multiprocessing.tail_log")
    dst, finished = io.StringIO(), threading.Event()
    thread = _tail_in_thread(tail_log, str(tmp_path / "never.log"), dst, finished, log_line_filter=lambda _: True)
    finished.set()
    thread.join(10)
    assert not thread.is_alive() and dst.getvalue() == ""


def test_tail_logfile_without_a_filter_keeps_every_line(tmp_path):
    # Ours only: upstream's tail_logfile writes nothing when no filter is given (its TailLog always passes one); a
    # missing filter meaning "keep everything" is what the optional parameter promises.
    from elastic_impl.multiprocessing.tail_log import tail_logfile

    path = tmp_path / "stdout.log"
    path.write_text("one\ntwo")  # the last line has no newline
    finished = threading.Event()
    finished.set()
    dst = io.StringIO()
    tail_logfile("[r1]:", str(path), dst, finished, 0.01)
    assert dst.getvalue() == "[r1]:one\n[r1]:two\n"
