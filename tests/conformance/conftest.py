"""Fixtures for the conformance-suite tests: planted (deliberately broken) implementations and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE = REPO_ROOT / "conformance" / "support_table.md"


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def planted_impl(tmp_path: Path) -> Path:
    """A package mirroring torch.distributed.elastic whose RendezvousParameters.get_as_int is off by one."""
    write_package(tmp_path, {
        "planted_impl/__init__.py": "",
        "planted_impl/rendezvous/__init__.py": """
            from torch.distributed.elastic.rendezvous import *  # noqa: F401,F403
            from torch.distributed.elastic.rendezvous import RendezvousParameters as _Upstream


            class RendezvousParameters(_Upstream):
                def get_as_int(self, key, default=None):
                    value = super().get_as_int(key, default)
                    return None if value is None else value + 1  # the planted bug
        """,
    })
    return tmp_path


def run_cli(args: list[str], extra_path: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``elastic-conformance`` entry point in a fresh interpreter."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, "-m", "conformance.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO_ROOT))
