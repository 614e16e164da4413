"""The calibration copy: the user's model copied once onto the target device; the model itself is never changed.

Parameters and buffers are copied straight to the target device (no second copy where
the model lives); everything else is `copy.deepcopy`'d, so hooks and plain attributes
come along, and weights shared between modules stay shared. Before copying, the
model's size is checked against the memory available on the target device.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from kvcal.errors import CalibrationError, DeviceError
from kvcal.messages import first_line
from kvcal.placement import dispatch_devices

__all__ = ["available_bytes", "calibration_copy", "model_bytes", "model_device"]

logger = logging.getLogger(__name__)

_GIB = float(1 << 30)


def model_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters and buffers, each tensor counted once."""
    seen: dict[int, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (the CPU: available RAM), or None when it cannot be known."""
    if device.type == "cpu":
        return _meminfo_available()
    backend = getattr(torch, device.type, None)
    get_info = getattr(backend, "mem_get_info", None)
    if get_info is None:
        return None
    try:
        return int(get_info(device)[0])
    except Exception:  # noqa: BLE001 - a backend that cannot tell: no check rather than a false refusal
        return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _too_large(size: int, free: int | None, device: torch.device, detail: str = "") -> CalibrationError:
    limit = "unknown" if free is None else f"{free / _GIB:.2f} GiB"
    return CalibrationError(
        f"the model is too large to copy for PTQ calibration: its calibration copy needs {size / _GIB:.2f} GiB "
        f"on {device}, where {limit} is available{detail}; free memory or use another --device "
        "(the model itself is never changed, so calibration needs room for a second copy)"
    )


def calibration_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` on `device`, every parameter frozen (`requires_grad` False).

    Raises:
        DeviceError: the model is dispatched over several devices (accelerate `device_map`).
        CalibrationError: the copy does not fit on `device` (naming the size and the limit).
    """
    dispatched = dispatch_devices(model)
    if dispatched is not None:
        where = ", ".join(sorted(str(d) for d in dispatched))
        raise DeviceError(
            f"PTQ calibration copies the model onto one device; this model is dispatched over {where} "
            "(device_map/offloading): load it on one device"
        )
    size, free = model_bytes(model), available_bytes(device)
    if free is not None and size > free:
        raise _too_large(size, free, device)
    memo: dict[int, Any] = {}
    try:
        with torch.no_grad():
            for tensor in model.parameters():
                memo.setdefault(id(tensor), nn.Parameter(_moved(tensor, device), requires_grad=False))
            for tensor in model.buffers():
                memo.setdefault(id(tensor), _moved(tensor, device))
            result = copy.deepcopy(model, memo)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise _too_large(size, free, device, f" ({first_line(exc)})") from exc
    except Exception as exc:
        raise CalibrationError(f"cannot copy the model for PTQ calibration: {first_line(exc)}") from exc
    training = [name for name, module in result.named_modules() if module.training]
    if training:
        first = "the model" if training[0] == "" else f"module {training[0]!r}"
        more = f" and {len(training) - 1} of its modules are" if len(training) > 1 else " is"
        logger.warning(
            f"{first}{more} in training mode: BatchNorm and Dropout then change the calibration "
            "(and a BatchNorm in training mode is not fused); call model.eval() first"
        )
    return result


def _moved(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.detach().to(device, copy=True)
