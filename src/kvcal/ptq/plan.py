"""The PTQ plan: typed per-layer settings and every choice rule of PTQ.md §3, in one place.

`.cfg` parsing (`kvcal.ptq.cfg`) turns each `calibration_config` into a
`CalibrationChoice`; `resolve_layer` picks a layer's choice by priority and fills in
what it leaves unset; `LayerSettings` and `PtqPlan` hold the invariants every plan obeys,
whichever path built it (the `.cfg`, the arguments, or the JSON reader). IFMR/HFMG value
rules are `kvcal.params`'; validation raises `ValueError`/`TypeError` naming the key,
and callers that read files add the file, line and layer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import nn

from kvcal.params import AlgoParams, IfmrParams, check_batch_num, check_bool
from kvcal.ptq.layers import LAYER_TYPES, LayerType, a_type

__all__ = [
    "ADA_TYPES",
    "CHANNEL_WISE_TYPES",
    "DMQ_TYPES",
    "FORCE_FP16_QUANT",
    "FUSION_CLASSES",
    "FUSION_TYPES",
    "GLOBAL_KEYS",
    "LOW_BITS_TYPES",
    "SYMMETRIC_ONLY_TYPES",
    "WEIGHT_BITS",
    "WTS_ALGOS",
    "AdaParams",
    "ArqChoice",
    "ArqParams",
    "CalibrationChoice",
    "LayerSettings",
    "Note",
    "PtqPlan",
    "PtqWarning",
    "WeightChoice",
    "WeightParams",
    "check_layer_type",
    "check_migration_strength",
    "check_weight_bits",
    "fusion_problem",
    "override_problem",
    "resolve_layer",
]

WtsAlgo = Literal["arq_quantize", "ada_quantize"]
WTS_ALGOS: tuple[WtsAlgo, ...] = ("arq_quantize", "ada_quantize")
WEIGHT_BITS = (6, 7, 8)
FORCE_FP16_QUANT = "FORCE_FP16_QUANT"

# The rule table of layer types.
CHANNEL_WISE_TYPES: frozenset[LayerType] = frozenset({"Conv2d", "Conv3d", "ConvTranspose2d"})
ADA_TYPES: frozenset[LayerType] = frozenset({"Conv2d", "ConvTranspose2d", "Linear"})
DMQ_TYPES: frozenset[LayerType] = frozenset({"Linear", "Conv2d", "Conv3d", "ConvTranspose2d"})
LOW_BITS_TYPES: frozenset[LayerType] = frozenset({"Conv2d"})  # weight num_bits 6 and 7
SYMMETRIC_ONLY_TYPES: frozenset[LayerType] = frozenset({"Conv3d"})
# What skip_fusion_layers may name: the convolutions that BN fusion handles (exact classes).
FUSION_CLASSES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FUSION_TYPES = tuple(cls.__name__ for cls in FUSION_CLASSES)
# The global keys of the JSON config, in written order; no layer may have one of these names.
GLOBAL_KEYS = (
    "version",
    "batch_num",
    "activation_offset",
    "do_fusion",
    "fakequant_precision_mode",
    "skip_fusion_layers",
)

DMQ_RANGE = (0.2, 0.8)
_ADA_LIST = "Conv2d, ConvTranspose2d, Linear"


class PtqWarning(UserWarning):
    """Something of a PTQ config that was ignored or adjusted (an excluded module, a dropped DMQ, ...)."""


@dataclass(frozen=True)
class Note:
    """A message about the generated config: `warning` (a `PtqWarning` in the API) or `info`."""

    level: Literal["warning", "info"]
    message: str


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return result


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def check_layer_type(value: Any) -> LayerType:
    """A layer type name: one of the five quantizable classes."""
    if not isinstance(value, str) or value not in LAYER_TYPES:
        raise ValueError(f"layer type {value!r} is not quantizable; the types are {', '.join(LAYER_TYPES)}")
    return value  # type: ignore[return-value]


def check_migration_strength(value: Any) -> float:
    """DMQ `migration_strength`: a number in [0.2, 0.8]."""
    strength = _number("migration_strength", value)
    if not DMQ_RANGE[0] <= strength <= DMQ_RANGE[1]:
        raise ValueError(f"migration_strength must be in [0.2, 0.8], got {strength!r}")
    return strength


def fusion_problem(name: str, cls: type[nn.Module]) -> str | None:
    """Why module `name` of class `cls` cannot be in skip_fusion_layers, or None."""
    if cls in FUSION_CLASSES:
        return None
    return f"layer {name!r} is {a_type(cls.__name__)}; only {', '.join(FUSION_TYPES)} layers are fused with a BatchNorm"


def check_weight_bits(value: Any, key: str = "quant_bits") -> int:
    """Weight bits: 6, 7 or 8."""
    bits = _int(key, value)
    if bits not in WEIGHT_BITS:
        raise ValueError(f"{key} must be 6, 7 or 8, got {bits!r}")
    return bits


@dataclass(frozen=True)
class ArqChoice:
    """`arq_quantize` as written: unset fields are None."""

    channel_wise: bool | None = None
    quant_bits: int | None = None

    def __post_init__(self) -> None:
        if self.channel_wise is not None:
            check_bool("channel_wise", self.channel_wise)
        if self.quant_bits is not None:
            check_weight_bits(self.quant_bits)

    @property
    def algo(self) -> WtsAlgo:
        return "arq_quantize"


@dataclass(frozen=True)
class AdaParams:
    """ADA (adaptive rounding) weight parameters; as a choice, `channel_wise` None means per type."""

    num_iteration: int = 10000
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    channel_wise: bool | None = None
    num_bits: int = 8

    def __post_init__(self) -> None:
        if _int("num_iteration", self.num_iteration) < 0:
            raise ValueError(f"num_iteration must be >= 0, got {self.num_iteration!r}")
        for key in ("reg_param", "warm_start"):
            value = _number(key, getattr(self, key))
            if not 0.0 < value < 1.0:
                raise ValueError(f"{key} must be in (0, 1), got {value!r}")
            object.__setattr__(self, key, value)
        rng = self.beta_range
        if isinstance(rng, (str, bytes)) or not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise TypeError(f"beta_range must be a list of two numbers [start, end], got {rng!r}")
        start, end = _number("beta_range_start", rng[0]), _number("beta_range_end", rng[1])
        if not start > end > 0.0:
            raise ValueError(f"beta_range must satisfy beta_range_start > beta_range_end > 0, got [{start!r}, {end!r}]")
        object.__setattr__(self, "beta_range", (start, end))
        if self.channel_wise is not None:
            check_bool("channel_wise", self.channel_wise)
        check_weight_bits(self.num_bits, "num_bits")

    @property
    def algo(self) -> WtsAlgo:
        return "ada_quantize"


@dataclass(frozen=True)
class ArqParams:
    """ARQ weight parameters of one layer, resolved."""

    num_bits: int = 8
    channel_wise: bool = False

    def __post_init__(self) -> None:
        check_weight_bits(self.num_bits, "num_bits")
        check_bool("channel_wise", self.channel_wise)

    @property
    def algo(self) -> WtsAlgo:
        return "arq_quantize"


WeightChoice = Union[ArqChoice, AdaParams]
WeightParams = Union[ArqParams, AdaParams]


@dataclass(frozen=True)
class CalibrationChoice:
    """One `calibration_config` as written; None = not set (the built-in default applies)."""

    act: AlgoParams | None = None
    asymmetric: bool | None = None
    weight: WeightChoice | None = None
    dmq: float | None = None

    def __post_init__(self) -> None:
        if self.asymmetric is not None:
            check_bool("asymmetric", self.asymmetric)
        if self.dmq is not None:
            object.__setattr__(self, "dmq", check_migration_strength(self.dmq))

    @property
    def channel_wise(self) -> bool | None:
        return None if self.weight is None else self.weight.channel_wise

    @property
    def quant_bits(self) -> int | None:
        return self.weight.quant_bits if isinstance(self.weight, ArqChoice) else None


def override_problem(choice: CalibrationChoice, layer_type: LayerType) -> str | None:
    """What an override (by type or by layer) of `layer_type` may not set, or None."""
    if layer_type in SYMMETRIC_ONLY_TYPES and choice.asymmetric:
        return f"asymmetric: true is not supported on {layer_type} (its activations are always symmetric)"
    if layer_type not in DMQ_TYPES and choice.dmq is not None:
        return f"dmq_balancer is not supported on {layer_type}"
    if isinstance(choice.weight, AdaParams) and layer_type not in ADA_TYPES:
        return f"ada_quantize is supported only on {_ADA_LIST}, not on {layer_type}"
    bits = choice.quant_bits
    if bits is not None and bits != 8 and layer_type not in LOW_BITS_TYPES:
        return f"quant_bits {bits} is supported only on Conv2d, not on {layer_type}"
    return _channel_wise_problem(choice.channel_wise, layer_type)


def _channel_wise_problem(channel_wise: bool | None, layer_type: LayerType) -> str | None:
    if channel_wise and layer_type not in CHANNEL_WISE_TYPES:
        return f"channel_wise must be false on {layer_type} (per-channel weights: Conv2d, Conv3d, ConvTranspose2d)"
    return None


@dataclass(frozen=True)
class LayerSettings:
    """One quantizable layer of the JSON config, fully resolved.

    `weight` None: no `weight_quant_params` (ADA chosen for a type it does not support).
    """

    name: str
    layer_type: LayerType
    quant_enable: bool
    act: AlgoParams
    asymmetric: bool
    weight: WeightParams | None
    dmq: float | None = None

    def __post_init__(self) -> None:
        check_layer_type(self.layer_type)
        check_bool("quant_enable", self.quant_enable)
        check_bool("asymmetric", self.asymmetric)
        if self.asymmetric and self.layer_type in SYMMETRIC_ONLY_TYPES:
            raise ValueError(f"asymmetric must be false on {self.layer_type}")
        if self.dmq is not None:
            object.__setattr__(self, "dmq", check_migration_strength(self.dmq))
            if self.layer_type not in DMQ_TYPES:
                raise ValueError(f"dmq_balancer_param is not supported on {self.layer_type}")
        weight = self.weight
        if weight is None:
            return
        if isinstance(weight, AdaParams):
            if self.layer_type not in ADA_TYPES:
                raise ValueError(f"ada_quantize is supported only on {_ADA_LIST}, not on {self.layer_type}")
            if weight.channel_wise is None:
                raise ValueError("the resolved ada_quantize parameters must say channel_wise true or false")
        if weight.num_bits != 8 and self.layer_type not in LOW_BITS_TYPES:
            raise ValueError(f"weight num_bits {weight.num_bits} is supported only on Conv2d, not on {self.layer_type}")
        problem = _channel_wise_problem(weight.channel_wise, self.layer_type)
        if problem is not None:
            raise ValueError(problem)


def _weight(
    choice: WeightChoice | None, layer_type: LayerType, from_common: bool, notes: list[Note], name: str
) -> WeightParams | None:
    """The resolved weight parameters: ARQ by default, channel_wise per type unless set."""
    default_channel_wise = layer_type in CHANNEL_WISE_TYPES
    if isinstance(choice, AdaParams):
        if layer_type not in ADA_TYPES:
            notes.append(
                Note("info", f"layer {name!r} ({layer_type}): ada_quantize does not apply; no weight parameters")
            )
            return None
        channel_wise = default_channel_wise if choice.channel_wise is None else choice.channel_wise
        return AdaParams(choice.num_iteration, choice.reg_param, choice.beta_range, choice.warm_start, channel_wise)
    bits = 8 if choice is None or choice.quant_bits is None else choice.quant_bits
    if bits != 8 and layer_type not in LOW_BITS_TYPES and from_common:
        notes.append(Note("info", f"layer {name!r} ({layer_type}): quant_bits {bits} applies only to Conv2d; 8 bits"))
        bits = 8
    channel_wise = default_channel_wise if choice is None or choice.channel_wise is None else choice.channel_wise
    return ArqParams(num_bits=bits, channel_wise=channel_wise)


def resolve_layer(
    name: str,
    layer_type: LayerType,
    *,
    quant_enable: bool,
    chosen: CalibrationChoice | None,
    common: CalibrationChoice | None,
    activation_offset: bool,
    notes: list[Note],
) -> LayerSettings:
    """A layer's settings from its chosen `calibration_config` (PTQ.md §3, "How a layer's values are chosen").

    Args:
        chosen: by whole-object priority, the layer's override, else its type's, else
            `common_config`, else None; it is not merged with `common_config`.
        common: `common_config` (its act_algo and asymmetric feed the asymmetric rule).
        notes: receives what was dropped or adjusted.

    Raises:
        ValueError: a rule violated (channel_wise true on a Linear/AvgPool2d, also from
            common_config); the message does not name the layer.
    """
    from_common = chosen is not None and chosen is common
    act = chosen.act if chosen is not None and chosen.act is not None else IfmrParams()
    if layer_type in SYMMETRIC_ONLY_TYPES:
        asymmetric = False
    elif chosen is not None and chosen.asymmetric is not None:
        asymmetric = chosen.asymmetric
    elif (
        common is not None and common.act is not None and common.act.algo == act.algo and common.asymmetric is not None
    ):
        asymmetric = common.asymmetric
    else:
        asymmetric = activation_offset
    dmq = None if chosen is None else chosen.dmq
    if dmq is not None and layer_type not in DMQ_TYPES:
        notes.append(Note("warning", f"layer {name!r} ({layer_type}): dmq_balancer is not supported there; dropped"))
        dmq = None
    problem = _channel_wise_problem(None if chosen is None else chosen.channel_wise, layer_type)
    if problem is not None:
        raise ValueError(problem)
    weight = _weight(None if chosen is None else chosen.weight, layer_type, from_common, notes, name)
    return LayerSettings(name, layer_type, quant_enable, act, asymmetric, weight, dmq)


@dataclass(frozen=True)
class PtqPlan:
    """The whole PTQ config: globals, then every quantizable layer (skipped ones included), sorted by name."""

    batch_num: int
    activation_offset: bool
    layers: tuple[LayerSettings, ...]
    do_fusion: bool = True
    fakequant_precision_mode: str | None = None
    skip_fusion_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_batch_num(self.batch_num)
        check_bool("activation_offset", self.activation_offset)
        check_bool("do_fusion", self.do_fusion)
        if self.fakequant_precision_mode not in (None, FORCE_FP16_QUANT):
            raise ValueError(
                f"fakequant_precision_mode must be {FORCE_FP16_QUANT!r}, got {self.fakequant_precision_mode!r}"
            )
        layers = tuple(sorted(self.layers, key=lambda layer: layer.name))
        names = [layer.name for layer in layers]
        duplicated = next((a for a, b in itertools.pairwise(names) if a == b), None)
        if duplicated is not None:
            raise ValueError(f"layer {duplicated!r} is configured twice")
        clash = next((name for name in names if name in GLOBAL_KEYS), None)
        if clash is not None:
            raise ValueError(
                f"layer {clash!r} has the name of a global key of the JSON config; it cannot be configured"
            )
        if not any(layer.quant_enable for layer in layers):
            raise ValueError("no layer left to quantize: every quantizable layer is skipped")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "skip_fusion_layers", tuple(self.skip_fusion_layers))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def enabled_layers(self) -> tuple[LayerSettings, ...]:
        return tuple(layer for layer in self.layers if layer.quant_enable)
