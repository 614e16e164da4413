"""Which modules of a model PTQ quantizes (PTQ.md §2): one forward pass of sample input, watched by hooks.

A module is quantizable when its class is exactly one of the five types, its padding is
zeros (convolutions), a Conv3d has `dilation[0] == 1`, it runs exactly once in the
forward pass, its weight is not shared with another Linear/Conv module, and a
convolution receives a batched input. Every other Linear/Conv/AvgPool module is
reported with its reasons. The model is left exactly as it was: parameters, buffers
(values included), the train/eval flag of every module, its hooks, and the CPU RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from kvcal.errors import ConfigError
from kvcal.messages import did_you_mean, first_line

__all__ = [
    "LAYER_TYPES",
    "Discovery",
    "ExcludedModule",
    "LayerType",
    "a_type",
    "discover_layers",
    "missing_name",
    "module_classes",
    "split_input",
]

LayerType = Literal["Linear", "Conv2d", "Conv3d", "ConvTranspose2d", "AvgPool2d"]

# The five quantizable classes; subclasses are not quantizable.
LAYER_TYPES: dict[LayerType, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "AvgPool2d": nn.AvgPool2d,
}
_TYPE_OF_CLASS: dict[type[nn.Module], LayerType] = {cls: name for name, cls in LAYER_TYPES.items()}
# Modules reported when excluded: anything that looks like one of the five.
_REPORTED = (nn.Linear, _ConvNd, nn.AvgPool2d)
# Modules whose weight must not be shared with another one of them.
_WEIGHTED = (nn.Linear, _ConvNd)
# Convolutions need a batched input of this many dimensions.
_BATCHED_NDIM: dict[LayerType, int] = {"Conv2d": 4, "ConvTranspose2d": 4, "Conv3d": 5}
_TYPE_LIST = ", ".join(LAYER_TYPES)


@dataclass(frozen=True)
class ExcludedModule:
    """A Linear/Conv/AvgPool module that is not quantized, and why."""

    name: str
    type_name: str
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class Discovery:
    """What one forward pass of the sample input showed.

    Attributes:
        layers: the quantizable layers and their types, in `named_modules()` order.
        excluded: the other Linear/Conv/AvgPool modules, in `named_modules()` order.
        modules: every module name of the model and its class, in `named_modules()` order.
    """

    layers: Mapping[str, LayerType]
    excluded: tuple[ExcludedModule, ...]
    modules: Mapping[str, type[nn.Module]]

    def why_not_quantizable(self, name: str) -> str:
        """Why `name`, a module of the model that is not a quantizable layer, is not one."""
        for module in self.excluded:
            if module.name == name:
                return f"is {a_type(module.type_name)} that is not quantizable: {module.reason}"
        return f"is {a_type(self.modules[name].__name__)}, not one of the quantizable types ({_TYPE_LIST})"

    def missing(self, name: str) -> str:
        """`'name' does not exist in the model` with the closest names, quantizable layers first."""
        return missing_name(name, self.modules, self.layers)


def module_classes(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Every module name of `model` and its class, in `named_modules()` order (no forward pass)."""
    return {name: type(module) for name, module in model.named_modules()}


def missing_name(name: str, modules: Mapping[str, type[nn.Module]], preferred: Iterable[str] | None = None) -> str:
    """`'name' does not exist in the model; did you mean ...?`, the closest `preferred` names first.

    `preferred` defaults to the modules whose class is one of the five quantizable types.
    """
    if preferred is None:
        preferred = [n for n, cls in modules.items() if cls in _TYPE_OF_CLASS]
    hint = did_you_mean(name, list(preferred), cutoff=0.5) or did_you_mean(name, [n for n in modules if n], cutoff=0.4)
    return f"{name!r} does not exist in the model{hint}"


def a_type(name: str) -> str:
    """`a Linear`, `an AvgPool2d`: a class name with its article."""
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


def split_input(input_data: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of `input_data`: a tensor, a tuple, or a dict.

    Raises:
        TypeError: any other type, or a dict with a key that is not a str.
    """
    if isinstance(input_data, Tensor):
        return (input_data,), {}
    if isinstance(input_data, tuple):
        return input_data, {}
    if isinstance(input_data, dict):
        bad = [key for key in input_data if not isinstance(key, str)]
        if bad:
            raise TypeError(f"input_data dict keys must be argument names (str), got {bad[0]!r}")
        return (), dict(input_data)
    raise TypeError(
        "input_data must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(input_data).__name__}"
    )


def discover_layers(model: nn.Module, input_data: Any, *, source: str = "input_data") -> Discovery:
    """Run `input_data` once through `model` (eval mode, no grad) and classify its modules.

    Args:
        model: the user's model; it is left exactly as it was, also when the forward pass raises.
        input_data: a tensor (`model(x)`), a tuple (`model(*x)`) or a dict (`model(**x)`).
        source: what the input is called in error messages (a data file, `input_data`).

    Raises:
        TypeError: `model` is not a module, or `input_data` of another type.
        ConfigError: the forward pass raised (its first line is given).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_input(input_data)
    named = list(model.named_modules())
    watched = [(name, module) for name, module in named if isinstance(module, _REPORTED)]
    calls: dict[str, list[int | None]] = {name: [] for name, _ in watched}
    with _unchanged(model), _watch(watched, calls), torch.no_grad():
        model.eval()
        try:
            model(*args, **kwargs)
        except Exception as exc:
            raise ConfigError(f"{source}: the model's forward pass raised {first_line(exc)}") from exc
    shared = _shared_weights(named)
    layers: dict[str, LayerType] = {}
    excluded: list[ExcludedModule] = []
    for name, module in watched:
        reasons = _static_reasons(module) + shared.get(name, ()) + _run_reasons(module, calls[name])
        if reasons:
            excluded.append(ExcludedModule(name, type(module).__name__, reasons))
        else:
            layers[name] = _TYPE_OF_CLASS[type(module)]
    return Discovery(layers=layers, excluded=tuple(excluded), modules={name: type(m) for name, m in named})


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Restore every module's train flag, parameter/buffer slots and buffer values, and the CPU RNG."""
    modules = list(model.modules())
    flags = [module.training for module in modules]
    parameters = [dict(module._parameters) for module in modules]
    buffers = [dict(module._buffers) for module in modules]
    values = [{k: b.detach().clone() for k, b in slots.items() if b is not None} for slots in buffers]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for module, flag, params, bufs, saved in zip(modules, flags, parameters, buffers, values):
                module.training = flag
                module._parameters.clear()
                module._parameters.update(params)
                module._buffers.clear()
                module._buffers.update(bufs)
                for key, value in saved.items():
                    bufs[key].copy_(value)  # type: ignore[union-attr]


@contextlib.contextmanager
def _watch(watched: list[tuple[str, nn.Module]], calls: dict[str, list[int | None]]) -> Iterator[None]:
    """Record, for each watched module, the number of dimensions of its input at every call."""
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            calls[name].append(x.dim() if isinstance(x, Tensor) else None)

        return hook

    try:
        for name, module in watched:
            handles.append(module.register_forward_pre_hook(hook_for(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _static_reasons(module: nn.Module) -> tuple[str, ...]:
    """Reasons visible without running: the class, padding_mode, Conv3d dilation."""
    layer_type = _TYPE_OF_CLASS.get(type(module))
    if layer_type is None:
        base = next((name for name, cls in LAYER_TYPES.items() if isinstance(module, cls)), None)
        if base is not None:
            return (f"a subclass of torch.nn.{base} (only the exact class is quantizable)",)
        return (f"{type(module).__name__} is not a quantizable type (only {_TYPE_LIST})",)
    reasons: list[str] = []
    padding_mode = getattr(module, "padding_mode", "zeros")
    if padding_mode != "zeros":
        reasons.append(f"padding_mode {padding_mode!r} (only 'zeros' is quantizable)")
    if layer_type == "Conv3d" and next(iter(module.dilation)) != 1:  # type: ignore[arg-type]
        reasons.append(f"dilation {tuple(module.dilation)} (a Conv3d needs dilation[0] == 1)")  # type: ignore[arg-type]
    return tuple(reasons)


def _run_reasons(module: nn.Module, dims: list[int | None]) -> tuple[str, ...]:
    """Reasons seen in the forward pass: never run, run several times, an unbatched input."""
    if not dims:
        return ("never runs in the forward pass of the sample input",)
    reasons: list[str] = []
    if len(dims) > 1:
        reasons.append(f"runs {len(dims)} times in one forward pass (a reused module)")
    layer_type = _TYPE_OF_CLASS.get(type(module))
    needed = _BATCHED_NDIM.get(layer_type) if layer_type is not None else None
    if needed is not None:
        wrong = sorted({d for d in dims if d != needed}, key=lambda d: -1 if d is None else d)
        if wrong:
            got = "/".join("?" if d is None else str(d) for d in wrong)
            reasons.append(f"unbatched input: {got}-D, a {layer_type} needs {needed}-D")
    return tuple(reasons)


def _shared_weights(named: list[tuple[str, nn.Module]]) -> dict[str, tuple[str, ...]]:
    """For each Linear/Conv module whose weight tensor another one also holds: the reason naming them."""
    holders: dict[int, list[str]] = {}
    for name, module in named:
        weight = getattr(module, "weight", None) if isinstance(module, _WEIGHTED) else None
        if isinstance(weight, Tensor):
            holders.setdefault(id(weight), []).append(name)
    reasons: dict[str, tuple[str, ...]] = {}
    for names in holders.values():
        if len(names) > 1:
            for name in names:
                others = ", ".join(repr(other) for other in names if other != name)
                reasons[name] = (f"its weight is shared with {others}",)
    return reasons
