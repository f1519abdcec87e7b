"""Which accelerator device-touching checks run on: ``cpu``, ``cuda``, ``npu`` or ``auto``.

A device that is not present is reported as "not available on this machine" and the rows that need it are SKIPPED
with that reason; nothing is ever passed on a device that was not exercised.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

DEVICE_CHOICES = ("cpu", "cuda", "npu", "auto")
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class DeviceError(ValueError):
    """Unknown device name; one-line message."""


@dataclass(frozen=True)
class Device:
    requested: str
    kind: str  # cpu | cuda | npu
    available: bool
    reason: str  # why it is unavailable, or what was found
    count: int = 0

    @property
    def backend(self) -> str:
        """The process-group backend for collectives on this device."""
        return _BACKENDS[self.kind]

    def describe(self) -> str:
        state = "available" if self.available else "NOT available"
        return f"{self.kind} ({state}: {self.reason}; backend {self.backend})"


def _cuda() -> Device:
    import torch

    if not torch.cuda.is_available():
        return Device("cuda", "cuda", False, "cuda not available on this machine (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    return Device("cuda", "cuda", True, f"{count} cuda device(s): {torch.cuda.get_device_name(0)}", count)


def _npu() -> Device:
    if importlib.util.find_spec("torch_npu") is None:
        return Device("npu", "npu", False, "npu not available on this machine (torch_npu is not installed)")
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        if not torch.npu.is_available():
            return Device("npu", "npu", False, "npu not available on this machine (torch.npu.is_available() is False)")
        return Device("npu", "npu", True, f"{torch.npu.device_count()} npu device(s)", torch.npu.device_count())
    except Exception as exc:  # a broken toolkit install is "not available", with the reason
        return Device("npu", "npu", False, f"npu not available on this machine (torch_npu failed: {exc})")


def detect(requested: str) -> Device:
    """Resolve a ``--device`` value; ``auto`` prefers cuda, then npu, then cpu."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cpu":
        return Device("cpu", "cpu", True, "host CPU", 1)
    if requested == "cuda":
        return _cuda()
    if requested == "npu":
        return _npu()
    for probe in (_cuda, _npu):
        found = probe()
        if found.available:
            return Device("auto", found.kind, True, found.reason, found.count)
    return Device("auto", "cpu", True, "no cuda or npu found; host CPU", 1)
