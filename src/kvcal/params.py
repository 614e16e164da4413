"""IFMR/HFMG parameters and their one rule table, shared by every config path of both modes.

The `.cfg` parsers, the JSON config readers and the `quant_algo_params` dict of
`QuantCalibrationOp` all build their parameters here, so each rule of FORMATS.md §1-§3
exists once. Value checks raise `ValueError` and type checks `TypeError`, each naming the
key and what is accepted; callers that read files wrap them into a `ConfigError` that
names the file and layer.
"""

from __future__ import annotations

import math
from decimal import Decimal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from kvcal.errors import ConfigError
from kvcal.quant import Granularity

__all__ = [
    "NUM_BITS",
    "VALID_NUM_OF_BINS",
    "ALGOS",
    "ALGO_KEYS",
    "Algo",
    "IfmrParams",
    "HfmgParams",
    "AlgoParams",
    "QuantSettings",
    "checked",
    "only_key",
    "check_act_algo",
    "check_batch_num",
    "check_bool",
    "algo_params",
    "settings_from_params",
]

NUM_BITS = 8
VALID_NUM_OF_BINS = (1024, 2048, 4096, 8192)

Algo = Literal["ifmr", "hfmg"]
ALGOS: tuple[Algo, ...] = ("ifmr", "hfmg")

# The rule table: the keys each algorithm takes, in the order the JSON config writes them.
ALGO_KEYS: dict[Algo, tuple[str, ...]] = {
    "ifmr": ("max_percentile", "min_percentile", "search_range", "search_step"),
    "hfmg": ("num_of_bins",),
}


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


def checked(where: str, check: Callable[[Any], Any], value: Any) -> Any:
    """`check(value)`, its TypeError/ValueError (which names the key) as a ConfigError prefixed with `where`."""
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def only_key(mapping: Any, key: str, what: str, *, container: str = "an object") -> Any:
    """The value of a mapping whose one accepted key is `key`.

    Raises:
        TypeError: `mapping` is not a mapping.
        ValueError: another key, or `key` missing.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be {container} {{{key!r}: ...}}, got {type(mapping).__name__}")
    unknown = [k for k in mapping if k != key]
    if unknown:
        raise ValueError(f"{what} has unknown key {unknown[0]!r}; the only accepted key is {key!r}")
    if key not in mapping:
        raise ValueError(f"{what} must have the key {key!r}")
    return mapping[key]


def check_bool(key: str, value: Any) -> bool:
    """`value` must be a bool."""
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


def check_act_algo(value: Any) -> Algo:
    """Validate `act_algo`: 'ifmr' or 'hfmg'."""
    if not isinstance(value, str):
        raise TypeError(f"act_algo must be a str, 'ifmr' or 'hfmg', got {value!r}")
    if value not in ALGOS:
        raise ValueError(f"act_algo must be 'ifmr' or 'hfmg', got {value!r}")
    return value  # type: ignore[return-value]


def _check_num_bits(value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"num_bits must be the int 8, got {value!r}")
    if value != NUM_BITS:
        raise ValueError(f"num_bits must be 8 (only INT8 is supported), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class IfmrParams:
    """IFMR search parameters, as Python floats (the search ranges over their float64 values)."""

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
        # Also compared as the decimals written in a config: 0.2 <= 1.0 - 0.8 holds there, not in binary.
        within = step <= end - start or Decimal(repr(step)) <= Decimal(repr(end)) - Decimal(repr(start))
        if not (0.0 < step and within):
            raise ValueError(
                f"search_step must be in (0, search_range end - start] = (0, {end - start!r}], got {step!r}"
            )
        object.__setattr__(self, "search_step", step)

    @property
    def algo(self) -> Algo:
        return "ifmr"


@dataclass(frozen=True)
class HfmgParams:
    """HFMG histogram parameters."""

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
_PARAM_CLASSES: dict[Algo, type[IfmrParams] | type[HfmgParams]] = {"ifmr": IfmrParams, "hfmg": HfmgParams}


def algo_params(algo: Algo, values: Mapping[str, Any], *, common_keys: tuple[str, ...] = ()) -> AlgoParams:
    """The parameters of `algo` from a mapping that may also hold `common_keys`.

    Missing keys take their defaults.

    Raises:
        TypeError: a value of the wrong type.
        ValueError: a bad value, an unknown key, or a key of the other algorithm.
    """
    own = ALGO_KEYS[algo]
    for key in values:
        if key in own or key in common_keys:
            continue
        other = next((name for name, keys in ALGO_KEYS.items() if key in keys), None)
        if other is not None:
            raise ValueError(f"{key} is a parameter of {other}, not of act_algo {algo!r}")
        accepted = ", ".join(common_keys + own)
        raise ValueError(f"unknown key {key!r}; accepted keys for {algo}: {accepted}")
    return _PARAM_CLASSES[algo](**{key: values[key] for key in own if key in values})


@dataclass(frozen=True)
class QuantSettings:
    """Everything one observer needs, fully resolved.

    `granularity` accepts what `Granularity.parse` accepts and is kept as a `Granularity`.
    """

    params: AlgoParams
    granularity: Granularity = Granularity.PER_TENSOR
    asymmetric: bool = True
    batch_num: int = 1
    num_bits: int = NUM_BITS

    def __post_init__(self) -> None:
        check_batch_num(self.batch_num)
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        check_bool("asymmetric", self.asymmetric)
        _check_num_bits(self.num_bits)

    @property
    def algo(self) -> Algo:
        return self.params.algo


_COMMON_KEYS = ("act_algo", "num_bits", "with_offset", "asymmetric", "batch_num", "quant_granularity")


def settings_from_params(params: Mapping[str, Any] | None) -> QuantSettings:
    """Validate a `quant_algo_params` dict (FORMATS.md §3) and resolve it.

    Raises:
        TypeError: a value of the wrong type.
        ValueError: a bad value, an unknown key, or a key of the other algorithm.
    """
    params = dict(params or {})
    if not all(isinstance(key, str) for key in params):
        raise TypeError(f"quant_algo_params keys must be strings, got {list(params)!r}")
    algo = check_act_algo(params.get("act_algo", "ifmr"))
    try:
        parsed = algo_params(algo, params, common_keys=_COMMON_KEYS)
    except ValueError as exc:
        if str(exc).startswith("unknown key"):
            raise ValueError(f"{exc} (in quant_algo_params)") from None
        raise
    with_offset = check_bool("with_offset", params.get("with_offset", True))
    return QuantSettings(
        params=parsed,
        granularity=Granularity.parse(params.get("quant_granularity", Granularity.PER_TENSOR)),
        asymmetric=check_bool("asymmetric", params.get("asymmetric", with_offset)),
        batch_num=check_batch_num(params.get("batch_num", 1)),
        num_bits=_check_num_bits(params.get("num_bits", NUM_BITS)),
    )
