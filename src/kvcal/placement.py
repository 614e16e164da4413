"""Where the model runs: move a model that fits one device, respect one that was dispatched.

A model placed by accelerate (`from_pretrained(..., device_map=...)`, with modules on
several devices, the CPU or disk) is never moved: its hooks bring each module's weights
to its execution device and carry activations between devices. kvcal then sends the
batches to the device of the input embedding and lets each observer work on the device
where its layer's tensors are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvcal.device import resolve_device
from kvcal.errors import DeviceError
from kvcal.messages import describe

__all__ = ["dispatch_devices", "place_model"]

_CPU = torch.device("cpu")


def _accelerator() -> str:
    """The device type accelerate's integer device ids refer to here."""
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cuda"


def _as_device(value: object) -> torch.device:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device(_accelerator(), value)
    return torch.device(str(value))


def _tensor_devices(model: nn.Module) -> set[torch.device]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.device for t in tensors if t.device.type != "meta"}  # meta: offloaded, materialized by hooks


def dispatch_devices(model: nn.Module) -> set[torch.device] | None:
    """The execution devices of a dispatched or multi-device model; None for a model on one device.

    A module offloaded to disk executes on the main device, so "disk" adds no device.
    """
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        devices = {_as_device(v) for v in device_map.values() if v != "disk"}
        return devices or {_CPU}
    hooked = any(hasattr(module, "_hf_hook") for module in model.modules())
    devices = _tensor_devices(model)
    if hooked or len(devices) > 1:
        return devices or {_CPU}
    return None


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _names(devices: Iterable[torch.device]) -> str:
    return ", ".join(sorted(str(d) for d in devices))


def _input_device(model: nn.Module, devices: set[torch.device]) -> torch.device:
    """The device of the input embedding (where the first module wants the token ids)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return _as_device(execution)
    return sorted(devices, key=str)[0]


def place_model(model: nn.Module, device: torch.device | str) -> torch.device:
    """Put `model` where it runs and return the device its batches go to.

    A model on one device is moved to `device` ("auto": NPU, else CUDA, else CPU). A
    dispatched model stays where it is; `device` must then be "auto" or one of its
    execution devices.

    Raises:
        DeviceError: the device is unavailable, contradicts the dispatch, or moving failed.
    """
    dispatched = dispatch_devices(model)
    if dispatched is None:
        target = device if isinstance(device, torch.device) else resolve_device(device)
        try:
            model.to(target)
        except Exception as exc:
            raise DeviceError(f"placing the model on {target} failed: {describe(exc)}") from exc
        return target
    if device != "auto":
        target = device if isinstance(device, torch.device) else resolve_device(device)
        if not any(_same(target, d) for d in dispatched):
            raise DeviceError(
                f"the model is dispatched over {_names(dispatched)} (device_map) and is not moved; "
                f"--device {device} contradicts that placement: use --device auto to keep it"
            )
    return _input_device(model, dispatched)
