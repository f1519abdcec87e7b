"""Redirect this process's stdout/stderr (file-descriptor level, so native code output follows) to a file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["redirect_stderr", "redirect_stdout"]


@contextmanager
def _redirect(fd: int, stream, to_file: str) -> Iterator[None]:
    stream.flush()
    saved = os.dup(fd)
    target = os.open(to_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(target, fd)
        yield
    finally:
        stream.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(target)


def redirect_stdout(to_file: str):
    return _redirect(1, sys.stdout, to_file)


def redirect_stderr(to_file: str):
    return _redirect(2, sys.stderr, to_file)
