"""The calibration plan: typed per-layer settings and every parameter rule, in one place.

Both the `.cfg` parser and the JSON config reader produce a `CalibrationPlan`; the
`quant_algo_params` dict of `QuantCalibrationOp` produces a `QuantSettings`. The rules of
FORMATS.md §1-§3 live here only. Value checks raise `ValueError` and type checks
`TypeError`, each naming the key and what is accepted; callers that read files wrap
them into a `ConfigError` that names the file and layer.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import nn

from kvcal.errors import ConfigError

__all__ = [
    "NUM_BITS",
    "VALID_NUM_OF_BINS",
    "IfmrParams",
    "HfmgParams",
    "AlgoParams",
    "QuantSettings",
    "LayerPlan",
    "CalibrationPlan",
    "check_batch_num",
    "parse_granularity",
    "settings_from_params",
    "check_layers_in_model",
]

NUM_BITS = 8
VALID_NUM_OF_BINS = (1024, 2048, 4096, 8192)
PER_TENSOR = 0
PER_CHANNEL = 1
_GRANULARITY_NAMES = {"per_tensor": PER_TENSOR, "per_channel": PER_CHANNEL}

Algo = Literal["ifmr", "hfmg"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(key: str, value: Any) -> float:
    """Accept int or float (never bool) and return a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float range (JSON allows any integer)
        digits = len(str(abs(value)))
        raise ValueError(f"{key} must be a finite number, got an integer of {digits} digits") from None
    if not math.isfinite(result):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return result


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def check_batch_num(value: Any) -> int:
    """Validate `batch_num`: an int >= 1."""
    if not _is_int(value):
        raise TypeError(f"batch_num must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"batch_num must be an integer >= 1, got {value!r}")
    return int(value)


def parse_granularity(value: Any) -> int:
    """Map 0, 1, "0", "1", "per_tensor", "per_channel" to 0 (per-tensor) or 1 (per-channel)."""
    accepted = "accepted: 0, 1, '0', '1', 'per_tensor', 'per_channel'"
    if _is_int(value):
        if value in (PER_TENSOR, PER_CHANNEL):
            return int(value)
        raise ValueError(f"quant_granularity must be 0 or 1, got {value!r}; {accepted}")
    if isinstance(value, str):
        text = value.strip()
        if text in ("0", "1"):
            return int(text)
        if text in _GRANULARITY_NAMES:
            return _GRANULARITY_NAMES[text]
        raise ValueError(f"quant_granularity {value!r} is not valid; {accepted}")
    raise TypeError(f"quant_granularity must be an int or str, got {value!r} ({type(value).__name__}); {accepted}")


@dataclass(frozen=True)
class IfmrParams:
    """IFMR search parameters (ALGORITHMS.md "IFMR")."""

    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01

    def __post_init__(self) -> None:
        for key in ("max_percentile", "min_percentile"):
            value = _as_float(key, getattr(self, key))
            if not 0.5 < value <= 1.0:
                raise ValueError(f"{key} must be in (0.5, 1], got {value!r}")
            object.__setattr__(self, key, value)
        rng = self.search_range
        if isinstance(rng, (str, bytes)) or not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise TypeError(f"search_range must be a list of two numbers [start, end], got {rng!r}")
        start = _as_float("search_range start", rng[0])
        end = _as_float("search_range end", rng[1])
        if not 0.0 < start < end:
            raise ValueError(f"search_range must satisfy 0 < start < end, got [{start!r}, {end!r}]")
        object.__setattr__(self, "search_range", (start, end))
        step = _as_float("search_step", self.search_step)
        if not 0.0 < step <= end - start:
            raise ValueError(
                f"search_step must be in (0, search_range end - start] = (0, {end - start!r}], got {step!r}"
            )
        object.__setattr__(self, "search_step", step)

    @property
    def algo(self) -> Algo:
        return "ifmr"


@dataclass(frozen=True)
class HfmgParams:
    """HFMG histogram parameters (ALGORITHMS.md "HFMG")."""

    num_of_bins: int = 4096

    def __post_init__(self) -> None:
        if not _is_int(self.num_of_bins):
            raise TypeError(
                f"num_of_bins must be an integer in {list(VALID_NUM_OF_BINS)}, got {self.num_of_bins!r}"
            )
        if self.num_of_bins not in VALID_NUM_OF_BINS:
            raise ValueError(f"num_of_bins must be one of {list(VALID_NUM_OF_BINS)}, got {self.num_of_bins!r}")

    @property
    def algo(self) -> Algo:
        return "hfmg"


AlgoParams = Union[IfmrParams, HfmgParams]


@dataclass(frozen=True)
class QuantSettings:
    """Everything one observer needs, fully resolved.

    `granularity` 0 (per-tensor): any input shape -> scale shape [1];
    1 (per-channel): input [..., C] -> scale shape [C].
    """

    params: AlgoParams
    granularity: int = PER_TENSOR
    asymmetric: bool = True
    batch_num: int = 1
    num_bits: int = NUM_BITS

    def __post_init__(self) -> None:
        check_batch_num(self.batch_num)
        parse_granularity(self.granularity)
        _check_bool("asymmetric", self.asymmetric)
        if self.num_bits != NUM_BITS or not _is_int(self.num_bits):
            raise ValueError(f"num_bits must be 8, got {self.num_bits!r}")

    @property
    def algo(self) -> Algo:
        return self.params.algo


@dataclass(frozen=True)
class LayerPlan:
    """One configured layer. `asymmetric` None means: follow the plan's activation_offset."""

    name: str
    params: AlgoParams
    granularity: int = PER_TENSOR
    asymmetric: bool | None = None


@dataclass(frozen=True)
class CalibrationPlan:
    """The whole calibration: globals plus the configured layers, in config order."""

    batch_num: int
    activation_offset: bool
    layers: tuple[LayerPlan, ...]

    def __post_init__(self) -> None:
        check_batch_num(self.batch_num)
        _check_bool("activation_offset", self.activation_offset)
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


_COMMON_KEYS = ("act_algo", "num_bits", "with_offset", "asymmetric", "batch_num", "quant_granularity")
_IFMR_KEYS = ("max_percentile", "min_percentile", "search_range", "search_step")
_HFMG_KEYS = ("num_of_bins",)


def settings_from_params(params: Mapping[str, Any] | None) -> QuantSettings:
    """Validate a `quant_algo_params` dict (FORMATS.md §3) and resolve it.

    Raises:
        TypeError: a value of the wrong type.
        ValueError: a bad value, an unknown key, or a key of the other algorithm.
    """
    params = dict(params or {})
    if not all(isinstance(key, str) for key in params):
        raise TypeError(f"quant_algo_params keys must be strings, got {list(params)!r}")
    algo = params.get("act_algo", "ifmr")
    if not isinstance(algo, str):
        raise TypeError(f"act_algo must be a str, 'ifmr' or 'hfmg', got {algo!r}")
    if algo not in ("ifmr", "hfmg"):
        raise ValueError(f"act_algo must be 'ifmr' or 'hfmg', got {algo!r}")
    own, other = (_IFMR_KEYS, _HFMG_KEYS) if algo == "ifmr" else (_HFMG_KEYS, _IFMR_KEYS)
    for key in params:
        if key in other:
            raise ValueError(f"{key} is a parameter of {'hfmg' if algo == 'ifmr' else 'ifmr'}, not of act_algo {algo!r}")
        if key not in _COMMON_KEYS and key not in own:
            accepted = ", ".join(_COMMON_KEYS + own)
            raise ValueError(f"unknown key {key!r} in quant_algo_params; accepted keys for {algo}: {accepted}")
    num_bits = params.get("num_bits", NUM_BITS)
    if not _is_int(num_bits):
        raise TypeError(f"num_bits must be the int 8, got {num_bits!r}")
    if num_bits != NUM_BITS:
        raise ValueError(f"num_bits must be 8 (only INT8 is supported), got {num_bits!r}")
    with_offset = _check_bool("with_offset", params.get("with_offset", True))
    asymmetric = _check_bool("asymmetric", params.get("asymmetric", with_offset))
    algo_params: AlgoParams
    if algo == "ifmr":
        algo_params = IfmrParams(**{key: params[key] for key in _IFMR_KEYS if key in params})
    else:
        algo_params = HfmgParams(**{key: params[key] for key in _HFMG_KEYS if key in params})
    return QuantSettings(
        params=algo_params,
        granularity=parse_granularity(params.get("quant_granularity", PER_TENSOR)),
        asymmetric=asymmetric,
        batch_num=check_batch_num(params.get("batch_num", 1)),
    )


def check_layers_in_model(names: Iterable[str], model: nn.Module, source: str) -> None:
    """Every name must be a `torch.nn.Linear` of `model`; else a ConfigError naming `source`.

    A missing name comes with the closest existing Linear names.
    """
    modules = dict(model.named_modules())
    linear_names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    for name in names:
        module = modules.get(name) if name else None
        if module is None:
            close = difflib.get_close_matches(name, linear_names, n=3, cutoff=0.5)
            if not close:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{source}: layer {name!r} does not exist in the model{hint}")
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{source}: layer {name!r} is a {type(module).__name__}, not a torch.nn.Linear; "
                "only Linear layers (k_proj/v_proj style) can be calibrated"
            )
