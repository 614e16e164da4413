"""The simple config (`.cfg`, protobuf text format) → `CalibrationPlan` (FORMATS.md §1).

Parsing is strict: syntax errors, unknown fields, a non-repeated field given twice and
both algorithms in one `calibration_config` are errors reported as
`FILE:LINE:COL: message`. The rules that the protobuf parser does not know (required
`layer_name`, duplicated layers, value ranges, layers of the model) are checked
afterwards and point at the line of the field at fault.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from torch import nn

from kvcal.errors import ConfigError
from kvcal.floats import f32_value
from kvcal.kv.plan import (
    CalibrationPlan,
    LayerPlan,
    check_layers_in_model,
    expand_pattern,
    is_pattern,
)
from kvcal.params import AlgoParams, HfmgParams, IfmrParams, check_batch_num
from kvcal.proto import quant_cali_config_pb2 as pb
from kvcal.quant import Granularity
from kvcal.textproto import FieldPath, Locator, parse_text, read_text

__all__ = ["load_cfg", "plan_from_layers"]


def load_cfg(path: str | os.PathLike[str], model: nn.Module | None) -> CalibrationPlan:
    """Parse and validate a `.cfg` file into a plan.

    Args:
        path: the `.cfg` file (protobuf text format, AMCTQuantCaliConfig).
        model: when given, globs are expanded and every configured layer must be one of
            its `nn.Linear` modules; None checks everything else (before a model loads).

    Raises:
        ConfigError: naming the file, the line:column where known, and the field or layer.
    """
    source = os.fspath(path)
    text = read_text(source, error=ConfigError, what="config")
    message = parse_text(text, pb.AMCTQuantCaliConfig(), source=source, error=ConfigError)
    where = Locator(source, text, pb.AMCTQuantCaliConfig.DESCRIPTOR)
    return _Builder(source, message, where, model).build()


def plan_from_layers(
    names: Sequence[str],
    model: nn.Module | None,
    *,
    batch_num: int = 1,
    activation_offset: bool = True,
    params: AlgoParams | None = None,
    granularity: Granularity = Granularity.PER_TENSOR,
) -> CalibrationPlan:
    """A plan giving every listed layer the same settings (the `--quant-layers` path).

    Names may be shell-style globs, expanded over the model's Linear layers. Every layer
    gets `params` (the IFMR defaults when None) and `granularity`.

    Raises:
        ConfigError: an empty or duplicated name, no names, a glob matching nothing, or a
            name that is not a Linear layer of `model`.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"layer names must be a list of str, got the single string {names!r}")
    layers: list[LayerPlan] = []
    seen: set[str] = set()
    for pattern in names:
        if not isinstance(pattern, str):
            raise TypeError(f"layer names must be str, got {pattern!r} ({type(pattern).__name__})")
        if not pattern:
            raise ConfigError("--quant-layers: empty layer name")
        expanded = expand_pattern(pattern, model, "--quant-layers") if model is not None else [pattern]
        for name in expanded:
            if name in seen:
                raise ConfigError(f"--quant-layers: layer {name!r} is listed twice")
            seen.add(name)
            layers.append(LayerPlan(name=name, params=params or IfmrParams(), granularity=granularity))
    if not layers:
        raise ConfigError("--quant-layers: no layers to calibrate")
    if model is not None:
        check_layers_in_model([layer.name for layer in layers], model, "--quant-layers")
    try:
        return CalibrationPlan(batch_num=batch_num, activation_offset=activation_offset, layers=tuple(layers))
    except ValueError as exc:
        raise ConfigError(f"--quant-layers: {exc}") from None


# The first word of a kvcal.params validation message names the parameter at fault.
_PARAM_FIELDS = {
    "max_percentile": ("max_percentile",),
    "min_percentile": ("min_percentile",),
    "search_range": ("search_range_start", "search_range_end"),
    "search_step": ("search_step",),
    "num_of_bins": ("num_of_bins",),
}


class _Builder:
    """Turns a parsed AMCTQuantCaliConfig into a validated plan."""

    def __init__(self, source: str, message: pb.AMCTQuantCaliConfig, where: Locator, model: nn.Module | None):
        self.source = source
        self.message = message
        self.where = where
        self.model = model

    def build(self) -> CalibrationPlan:
        msg = self.message
        try:
            batch_num = check_batch_num(msg.batch_num)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.where(('batch_num',))}: {exc}") from None
        layers: dict[str, LayerPlan] = {}
        paths: dict[str, FieldPath] = {}
        self._add_common_layers(layers, paths)
        self._apply_overrides(layers, paths)
        if not layers:
            raise ConfigError(
                f"{self.source}: no layers to calibrate: give kv_cache_quant_config.quant_layers "
                "or override_layers_configs"
            )
        if self.model is not None:
            for name, path in paths.items():
                check_layers_in_model([name], self.model, self.where(path))
        try:
            return CalibrationPlan(
                batch_num=batch_num, activation_offset=msg.activation_offset, layers=tuple(layers.values())
            )
        except (TypeError, ValueError) as exc:  # pragma: no cover - every rule is checked above
            raise ConfigError(f"{self.source}: {exc}") from None

    def _names(self, pattern: str, path: FieldPath) -> list[str]:
        """A configured name, or the Linear layers its glob matches (which needs the model)."""
        if not is_pattern(pattern) or self.model is None:
            return [pattern]  # without the model (a pre-check), a glob stays unexpanded
        return expand_pattern(pattern, self.model, self.where(path))

    def _add_common_layers(self, layers: dict[str, LayerPlan], paths: dict[str, FieldPath]) -> None:
        common = self.message.kv_cache_quant_config
        params, granularity, asymmetric = self._algo(
            common.calibration_config if common.HasField("calibration_config") else None,
            ("kv_cache_quant_config", "calibration_config"),
            "kv_cache_quant_config.calibration_config",
        )
        for index, pattern in enumerate(common.quant_layers):
            path: FieldPath = ("kv_cache_quant_config", "quant_layers", index)
            for name in self._names(pattern, path):
                if name in layers:
                    raise ConfigError(
                        f"{self.where(path)}: layer {name!r} is listed twice in kv_cache_quant_config.quant_layers"
                        f"{self._first_at(paths[name])}"
                    )
                layers[name] = LayerPlan(name=name, params=params, granularity=granularity, asymmetric=asymmetric)
                paths[name] = path

    def _apply_overrides(self, layers: dict[str, LayerPlan], paths: dict[str, FieldPath]) -> None:
        overridden: dict[str, FieldPath] = {}
        for index, override in enumerate(self.message.override_layers_configs):
            block: FieldPath = ("override_layers_configs", index)
            if not override.HasField("layer_name"):
                raise ConfigError(f"{self.where(block)}: override_layers_configs has no layer_name (it is required)")
            path = block + ("layer_name",)
            config = override.kv_data_quant_config if override.HasField("kv_data_quant_config") else None
            for name in self._names(override.layer_name, path):
                if name in overridden:
                    raise ConfigError(
                        f"{self.where(path)}: layer {name!r} is overridden twice in override_layers_configs"
                        f"{self._first_at(overridden[name])}"
                    )
                overridden[name] = path
                params, granularity, asymmetric = self._algo(
                    config, block + ("kv_data_quant_config",), f"override of layer {name!r}"
                )
                # The override replaces the layer's settings and keeps its place; a new layer goes last.
                layers[name] = LayerPlan(name=name, params=params, granularity=granularity, asymmetric=asymmetric)
                paths.setdefault(name, path)

    def _first_at(self, path: FieldPath) -> str:
        line = self.where.line(path)
        return "" if line is None else f" (first at line {line})"

    def _algo(
        self, config: pb.CalibrationConfig | None, path: FieldPath, what: str
    ) -> tuple[AlgoParams, Granularity, bool | None]:
        """Algorithm parameters, granularity and asymmetric flag (None: unset) of one config."""
        which = config.WhichOneof("acts_quant_algo") if config is not None else None
        if config is None or which is None:
            return IfmrParams(), Granularity.PER_TENSOR, None
        algo_path = path + (which,)
        algo = getattr(config, which)  # the FMRQuantize or HFMGQuantize message
        params: AlgoParams
        try:
            if which == "hfmg_quantize":
                params = HfmgParams(num_of_bins=algo.num_of_bins)
            else:
                params = IfmrParams(
                    max_percentile=f32_value(algo.max_percentile),
                    min_percentile=f32_value(algo.min_percentile),
                    search_range=(f32_value(algo.search_range_start), f32_value(algo.search_range_end)),
                    search_step=f32_value(algo.search_step),
                )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self._param_location(algo_path, str(exc))}: {what}: {which}: {exc}") from None
        granularity = Granularity(int(algo.quant_granularity))
        asymmetric = algo.asymmetric if algo.HasField("asymmetric") else None
        return params, granularity, asymmetric

    def _param_location(self, algo_path: FieldPath, message: str) -> str:
        first_word = re.match(r"\w+", message)
        for field in _PARAM_FIELDS.get(first_word.group(0) if first_word else "", ()):
            if algo_path + (field,) in self.where.positions:
                return self.where(algo_path + (field,))
        return self.where(algo_path)
