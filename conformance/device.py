"""Which accelerator device-touching checks run on: ``cpu``, ``cuda``, ``npu``, ``hpu`` or ``auto``.

A certification is of one (device, process-group backend) pair: the backend name alone is ambiguous ("hccl" is
Ascend's backend on npu and Habana's on hpu). A requested device that is not present is "not available on this
machine" with the reason; ``elastic-conformance certify`` then certifies nothing, so nothing is ever passed on a
device that was not exercised.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

DEVICE_CHOICES = ("cpu", "cuda", "npu", "hpu", "auto")
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "hpu": "hccl"}


def backend_for(kind: str) -> str:
    """The process-group backend certified with a device kind ("?" for a kind this suite does not know)."""
    return _BACKENDS.get(kind, "?")


class DeviceError(ValueError):
    """Unknown device name; one-line message."""


@dataclass(frozen=True)
class Device:
    requested: str
    kind: str  # cpu | cuda | npu | hpu
    available: bool
    reason: str  # what was found, or "<kind>: not available on this machine: <why>"
    count: int = 0

    @property
    def backend(self) -> str:
        """The process-group backend for collectives on this device."""
        return _BACKENDS[self.kind]

    @property
    def key(self) -> str:
        """What a certification is of: ``device/backend`` (e.g. ``npu/hccl``, ``hpu/hccl``)."""
        return f"{self.kind}/{self.backend}"

    def describe(self) -> str:
        state = "available" if self.available else "NOT available"
        return f"{self.kind} ({state}: {self.reason}; backend {self.backend})"


def _absent(kind: str, why: str) -> Device:
    return Device(kind, kind, False, f"{kind}: not available on this machine: {why}")


def _cuda() -> Device:
    import torch

    if not torch.cuda.is_available():
        return _absent("cuda", "torch.cuda.is_available() is False")
    count = torch.cuda.device_count()
    return Device("cuda", "cuda", True, f"{count} cuda device(s): {torch.cuda.get_device_name(0)}", count)


def _plugin_device(kind: str, package: str, plugin: str, package_label: str) -> Device:
    """A device that a vendor's plugin (``plugin``, from ``package``) registers as ``torch.<kind>``."""
    if importlib.util.find_spec(package) is None:
        return _absent(kind, f"{package_label} is not installed")
    try:
        import torch

        importlib.import_module(plugin)  # registers torch.<kind>
        module = getattr(torch, kind)
        if not module.is_available():
            return _absent(kind, f"torch.{kind}.is_available() is False")
        return Device(kind, kind, True, f"{module.device_count()} {kind} device(s)", module.device_count())
    except Exception as exc:  # a broken toolkit install is "not available", with the reason
        return _absent(kind, f"importing {plugin} failed: {' '.join(str(exc).split())}")


def _npu() -> Device:
    return _plugin_device("npu", "torch_npu", "torch_npu", "torch_npu")


def _hpu() -> Device:
    return _plugin_device("hpu", "habana_frameworks", "habana_frameworks.torch", "habana_frameworks (Habana's PyTorch bridge)")


def detect(requested: str) -> Device:
    """Resolve a ``--device`` value; ``auto`` prefers cuda, then npu, then hpu, then cpu."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cpu":
        return Device("cpu", "cpu", True, "host CPU", 1)
    if requested == "cuda":
        return _cuda()
    if requested == "npu":
        return _npu()
    if requested == "hpu":
        return _hpu()
    for probe in (_cuda, _npu, _hpu):
        found = probe()
        if found.available:
            return Device("auto", found.kind, True, found.reason, found.count)
    return Device("auto", "cpu", True, "no cuda, npu or hpu found; host CPU", 1)
