"""Device choice: an Ascend NPU when torch_npu provides one, else CUDA, else the CPU."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

import torch

from kvcal.errors import DeviceError

__all__ = ["DEVICE_CHOICES", "resolve_device", "npu_device_count"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, npu, npu:N"

_SPEC = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


def _npu_module() -> tuple[ModuleType | None, str]:
    """torch.npu when torch_npu imports, else None and the reason it is unusable."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return None, "torch_npu is not installed"
    except Exception as exc:  # torch_npu raises RuntimeError & co. when the CANN runtime is broken
        return None, f"importing torch_npu failed: {type(exc).__name__}: {exc}"
    npu = getattr(torch, "npu", None)
    if npu is None:
        return None, "torch_npu imported but did not register torch.npu"
    return npu, ""


def npu_device_count() -> int:
    """How many Ascend NPUs torch_npu reports (0 without torch_npu or without a device)."""
    npu, _ = _npu_module()
    if npu is None:
        return 0
    try:
        if not npu.is_available():
            return 0
        return int(npu.device_count())
    except Exception:  # a half-working driver counts as no device for the auto choice
        return 0


def _checked_index(kind: str, index: int | None, count: int, unavailable: str) -> torch.device:
    if count <= 0:
        raise DeviceError(f"device {kind if index is None else f'{kind}:{index}'!r} was asked for but {unavailable}")
    if index is None:
        index = 0
    if index >= count:
        listing = ", ".join(f"{kind}:{i}" for i in range(count))
        raise DeviceError(
            f"device '{kind}:{index}' does not exist: {count} {kind.upper()} device(s) available ({listing})"
        )
    return torch.device(kind, index)


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device spec into a `torch.device` that exists on this machine.

    Args:
        spec: "auto" (NPU, else CUDA, else CPU), "cpu", "cuda", "cuda:N", "npu" or "npu:N".

    Raises:
        DeviceError: an unknown spec, or a device that is absent or out of range.
    """
    if not isinstance(spec, str):
        raise DeviceError(f"device must be a string ({DEVICE_CHOICES}), got {spec!r}")
    match = _SPEC.match(spec.strip().lower())
    if match is None:
        raise DeviceError(f"unknown device {spec!r}; accepted: {DEVICE_CHOICES}")
    kind, raw_index = match.group(1), match.group(2)
    index = None if raw_index is None else int(raw_index)
    if kind in ("auto", "cpu") and index is not None:
        raise DeviceError(f"device {spec!r} takes no index; accepted: {DEVICE_CHOICES}")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if npu_device_count() > 0:
            return torch.device("npu", 0)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return _checked_index("cuda", index, count, "CUDA is not available (no GPU, or a CPU-only torch build)")
    npu, reason = _npu_module()
    count = npu_device_count() if npu is not None else 0
    if npu is not None and count == 0:
        reason = "torch_npu reports no available Ascend NPU"
    return _checked_index("npu", index, count, reason)
