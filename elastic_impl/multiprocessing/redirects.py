"""Redirect this process's stdout/stderr (file-descriptor level, so native code output follows) to a file."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["redirect", "redirect_stderr", "redirect_stdout", "get_libc"]

IS_WINDOWS = sys.platform == "win32"
IS_MACOS = sys.platform == "darwin"

logger = logging.getLogger(__name__)

_STREAM_FDS = {"stdout": 1, "stderr": 2}


def get_libc():
    """The C runtime, used to flush C stdio buffers before a redirect; None on macOS (redirects unsupported there)."""
    if IS_MACOS:
        logger.warning("redirecting stdout/stderr is not supported on macOS; output stays on the console")
        return None
    if IS_WINDOWS:
        for name in ("ucrtbase", "msvcrt"):
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
        raise RuntimeError("could not load a C runtime (tried ucrtbase, msvcrt); redirects need one")
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        # Not glibc (e.g. musl): the symbols the process already has loaded include the C library.
        return ctypes.CDLL(None)


libc = get_libc()


@contextmanager
def redirect(std: str, to_file: str) -> Iterator[None]:
    """Send everything written to ``std`` ('stdout' or 'stderr') to ``to_file`` (truncated) until the block ends.

    The file descriptor itself is redirected, so C/C++ code and child processes write there too. Buffers (Python's
    and C stdio's) are flushed at both switches so that earlier output stays on the console and the block's output
    lands in the file.
    """
    if std not in _STREAM_FDS:
        raise ValueError(f"unknown standard stream {std!r}: must be one of {sorted(_STREAM_FDS)}")
    fd = _STREAM_FDS[std]
    stream = getattr(sys, std)

    def flush() -> None:
        stream.flush()
        if libc is not None:
            libc.fflush(None)  # NULL flushes every C stdio output stream

    flush()
    saved = os.dup(fd)
    target = os.open(to_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(target, fd)
        yield
    finally:
        flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(target)


def redirect_stdout(to_file: str):
    """``redirect("stdout", to_file)``."""
    return redirect("stdout", to_file)


def redirect_stderr(to_file: str):
    """``redirect("stderr", to_file)``."""
    return redirect("stderr", to_file)
