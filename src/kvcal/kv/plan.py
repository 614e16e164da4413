"""The KV-cache calibration plan: typed per-layer settings, built by the `.cfg` parser and
the JSON config reader, consumed by calibration."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from kvcal.errors import ConfigError
from kvcal.messages import did_you_mean
from kvcal.params import AlgoParams, QuantSettings, check_batch_num, check_bool
from kvcal.quant import Granularity

__all__ = ["LayerPlan", "CalibrationPlan", "check_layers_in_model", "expand_pattern", "is_pattern"]


@dataclass(frozen=True)
class LayerPlan:
    """One configured layer. `asymmetric` None means: follow the plan's activation_offset."""

    name: str
    params: AlgoParams
    granularity: Granularity = Granularity.PER_TENSOR
    asymmetric: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))


@dataclass(frozen=True)
class CalibrationPlan:
    """The whole calibration: globals plus the configured layers, in config order."""

    batch_num: int
    activation_offset: bool
    layers: tuple[LayerPlan, ...]

    def __post_init__(self) -> None:
        check_batch_num(self.batch_num)
        check_bool("activation_offset", self.activation_offset)
        if not self.layers:
            raise ValueError("no layers to calibrate: the config names no quant_layers or override layers")
        names = [layer.name for layer in self.layers]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"layer {duplicated[0]!r} is configured twice")

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def settings(self, layer: LayerPlan) -> QuantSettings:
        """The resolved settings of one of this plan's layers."""
        asymmetric = self.activation_offset if layer.asymmetric is None else layer.asymmetric
        return QuantSettings(
            params=layer.params,
            granularity=layer.granularity,
            asymmetric=asymmetric,
            batch_num=self.batch_num,
        )


def check_layers_in_model(names: Iterable[str], model: nn.Module, source: str) -> None:
    """Every name must be a `torch.nn.Linear` of `model`, and not a fused query/key/value one.

    Else a ConfigError naming `source`; a missing name comes with the closest existing
    Linear names.
    """
    from kvcal.kv.layers import fused_qkv_reason

    modules = dict(model.named_modules())
    linear_names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    for name in names:
        module = modules.get(name) if name else None
        if module is None:
            hint = did_you_mean(name, linear_names, cutoff=0.5) or did_you_mean(
                name, [n for n in modules if n], cutoff=0.4
            )
            raise ConfigError(f"{source}: layer {name!r} does not exist in the model{hint}")
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{source}: layer {name!r} is a {type(module).__name__}, not a torch.nn.Linear; "
                "only Linear layers (k_proj/v_proj style) can be calibrated"
            )
        reason = fused_qkv_reason(model, name, modules)
        if reason is not None:
            raise ConfigError(f"{source}: {reason}")


_GLOB_CHARACTERS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether a configured layer name is a shell-style glob (`*`, `?`, `[...]`)."""
    return any(c in _GLOB_CHARACTERS for c in name)


def expand_pattern(pattern: str, model: nn.Module, source: str) -> list[str]:
    """The Linear layers of `model` that a glob matches, in `named_modules()` order.

    A plain name (no glob character) is returned as is, to be checked like any name.

    Raises:
        ConfigError: a glob that matches no Linear layer (naming `source`).
    """
    if not is_pattern(pattern):
        return [pattern]
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and fnmatch.fnmatchcase(name, pattern)
    ]
    if not names:
        raise ConfigError(f"{source}: the pattern {pattern!r} matches no Linear layer of the model")
    return names
