"""BN fusion on the calibration copy (PTQ.md §5): which Conv→BatchNorm pairs qualify, and fusing them.

A pair qualifies when a Conv1d/Conv2d/Conv3d (exact class, `padding_mode` zeros, not in
`skip_fusion_layers`) runs once and its output goes **only** into a BatchNorm1d/2d/3d
(exact class, `affine`, `track_running_stats`, eval mode) that runs once. Consumers are
found by watching one forward pass: module hooks see which module received the
convolution's output, and a `TorchFunctionMode` sees every other torch operation that
reads it (`bn(y) + y`, `torch.cat`, a view...) — any such use, or the tensor being part
of the model's output, means the pair is not fused. Shape queries do not count. Fusion
uses torch's own `fuse_conv_bn_weights`; a pair whose fused weight or bias is not
finite is left as it is. The BatchNorm is then replaced by `nn.Identity` on the copy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

from kvcal.ptq.plan import FUSION_CLASSES

__all__ = ["BN_CLASSES", "FusedPair", "FusionWatch", "fuse_pairs"]

BN_CLASSES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Operations that only read a tensor's metadata: they do not consume its values.
_METADATA = frozenset({
    "dim", "size", "numel", "ndimension", "nelement", "stride", "is_contiguous", "is_floating_point",
    "is_complex", "element_size", "get_device", "__len__", "data_ptr", "storage_offset",
})
_METADATA_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse", "is_quantized",
    "is_meta", "names", "is_leaf", "grad_fn", "output_nr", "_version", "is_nested", "itemsize", "nbytes",
})


@dataclass(frozen=True)
class FusedPair:
    """A convolution and the BatchNorm folded into it."""

    conv: str
    bn: str


def _is_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") in _METADATA_ATTRIBUTES
    return name in _METADATA


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside nested lists, tuples and dicts."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


class _UseCounter(TorchFunctionMode):
    """Counts the torch operations that read a watched tensor outside a BatchNorm."""

    def __init__(self, watch: FusionWatch) -> None:
        super().__init__()
        self._watch = watch

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self._watch.bn_depth and not _is_metadata(func):
            self._watch.count_uses((args, kwargs))
        return func(*args, **kwargs)


def _fusable_conv(module: nn.Module) -> bool:
    return type(module) in FUSION_CLASSES and getattr(module, "padding_mode", "zeros") == "zeros"


def _fusable_bn(module: nn.Module) -> bool:
    return (
        type(module) in BN_CLASSES
        and bool(getattr(module, "affine", False))
        and bool(getattr(module, "track_running_stats", False))
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
        and not module.training
    )


class FusionWatch:
    """Watches one forward pass of a model for Conv→BatchNorm pairs (a context manager).

    Idle (no hooks, no torch function mode) when the model has no fusable convolution or
    no fusable BatchNorm.
    """

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_modules())
        self._convs = {name: m for name, m in named if _fusable_conv(m)}
        self._bns = {name: m for name, m in named if _fusable_bn(m)}
        self.active = bool(self._convs and self._bns)
        self._model = model
        # id → (conv, a weak reference): ids of freed tensors are reused, the reference tells.
        self._outputs: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
        self._runs: dict[str, int] = {}
        self._other_uses: dict[str, int] = {}
        self._bn_inputs: dict[str, list[str | None]] = {}
        self.bn_depth = 0
        self._handles: list[Any] = []
        self._mode: _UseCounter | None = None

    def count_uses(self, value: Any) -> None:
        """Count a use of each watched convolution output inside `value`."""
        for tensor in _tensors(value):
            hit = self._outputs.get(id(tensor))
            if hit is not None and hit[1]() is tensor:
                self._other_uses[hit[0]] = self._other_uses.get(hit[0], 0) + 1

    def _conv_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._runs[name] = self._runs.get(name, 0) + 1
            if isinstance(output, Tensor):
                self._outputs[id(output)] = (name, weakref.ref(output))

        return hook

    def _bn_pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            hit = self._outputs.get(id(x)) if isinstance(x, Tensor) else None
            self._bn_inputs.setdefault(name, []).append(hit[0] if hit is not None and hit[1]() is x else None)
            self.bn_depth += 1

        return hook

    def _bn_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.bn_depth -= 1

    def _model_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.count_uses(output)  # returned from the model: a consumer the BN does not replace

    def __enter__(self) -> FusionWatch:
        if not self.active:
            return self
        for name, conv in self._convs.items():
            self._handles.append(conv.register_forward_hook(self._conv_hook(name)))
        for name, bn in self._bns.items():
            self._handles.append(bn.register_forward_pre_hook(self._bn_pre_hook(name)))
            self._handles.append(bn.register_forward_hook(self._bn_hook, always_call=True))
        self._handles.append(self._model.register_forward_hook(self._model_hook))
        self._mode = _UseCounter(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()

    def pairs(self, skip: Collection[str] = ()) -> list[tuple[str, str]]:
        """(conv, bn) names of the pairs that qualify, in model order; `skip`: convolutions not fused."""
        found = []
        for bn, inputs in self._bn_inputs.items():
            if len(inputs) != 1 or inputs[0] is None:
                continue
            conv = inputs[0]
            if conv in skip or self._runs.get(conv) != 1 or self._other_uses.get(conv, 0):
                continue
            if getattr(self._convs[conv], "out_channels", None) != getattr(self._bns[bn], "num_features", None):
                continue
            found.append((conv, bn))
        order = {name: index for index, name in enumerate(self._convs)}
        return sorted(found, key=lambda pair: order[pair[0]])


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered as a child."""
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new


def fuse_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> tuple[FusedPair, ...]:
    """Fold each BatchNorm into its convolution on `model` (a copy) and replace it with `nn.Identity`.

    Returns the pairs fused: a pair whose fused weight or bias is not finite is skipped.
    """
    modules = dict(model.named_modules())
    fused = []
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            bias = None if conv.bias is None else conv.bias.detach()
            weight, new_bias = fuse_conv_bn_weights(
                conv.weight.detach(), bias, bn.running_mean, bn.running_var, bn.eps,
                bn.weight.detach(), bn.bias.detach(),
            )
            if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(new_bias).all())):
                continue
            conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
            conv.bias = nn.Parameter(new_bias.detach(), requires_grad=False)
            _replace_module(model, bn, nn.Identity())
            fused.append(FusedPair(conv_name, bn_name))
    return tuple(fused)
