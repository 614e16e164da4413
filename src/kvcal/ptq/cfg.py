"""The PTQ simple config (`.cfg`, `AMCTConfig` protobuf text) → `PtqCfg` → `PtqPlan` (PTQ.md §1, §3).

`load_ptq_cfg` needs no model: syntax, unknown and repeated fields, two members of one
oneof, missing required fields, `dst_type: INT16`, value ranges, duplicated names or
types, unknown types and the rules of type overrides are all checked there, each error
at FILE:LINE:COL. `plan_from_cfg` then checks the names against the model's layers and
resolves every quantizable layer. A KV-cache `.cfg` given here (or a PTQ one given to the
KV path, `check_not_ptq_cfg`) is an error that says which one it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kvcal.errors import ConfigError
from kvcal.floats import f32_value
from kvcal.params import HfmgParams, IfmrParams, check_batch_num
from kvcal.proto import calibration_config_pytorch_pb2 as pb
from kvcal.proto import quant_cali_config_pb2 as kv_pb
from kvcal.ptq.layers import Discovery, LayerType, missing_name
from kvcal.ptq.plan import (
    FORCE_FP16_QUANT,
    AdaParams,
    ArqChoice,
    CalibrationChoice,
    Note,
    PtqPlan,
    WeightChoice,
    check_layer_type,
    fusion_problem,
    override_problem,
    resolve_layer,
)
from kvcal.textproto import FieldPath, Locator, parse_text, read_text

__all__ = [
    "KV_CFG_HINT",
    "PTQ_CFG_HINT",
    "Override",
    "PtqCfg",
    "check_cfg_names",
    "check_not_ptq_cfg",
    "load_ptq_cfg",
    "plan_from_cfg",
    "rule_location",
]

KV_CFG_HINT = (
    "this is a KV-cache .cfg (AMCTQuantCaliConfig schema), not a PTQ one: use it with "
    "`kvcal gen-config` without --ptq, or with create_quant_cali_config"
)
PTQ_CFG_HINT = (
    "this is a PTQ .cfg (AMCTConfig schema, whole-network quantization), not a KV-cache one: use it with "
    "`kvcal gen-config --ptq --dataset DIR`, or with create_quant_config"
)

# The first word of a validation message → the proto fields it is about, to point at their line.
_PARAM_FIELDS: dict[str, tuple[str, ...]] = {
    "max_percentile": ("max_percentile",),
    "min_percentile": ("min_percentile",),
    "search_range": ("search_range_start", "search_range_end"),
    "search_step": ("search_step",),
    "num_of_bins": ("num_of_bins",),
    "num_iteration": ("num_iteration",),
    "reg_param": ("reg_param",),
    "warm_start": ("warm_start",),
    "beta_range": ("beta_range_start", "beta_range_end"),
    "beta_range_start": ("beta_range_start",),
    "beta_range_end": ("beta_range_end",),
    "quant_bits": ("quant_bits",),
    "channel_wise": ("channel_wise",),
    "migration_strength": ("migration_strength",),
}


@dataclass(frozen=True)
class Override:
    """One override entry: its choice and where its `calibration_config` is in the file."""

    choice: CalibrationChoice
    path: FieldPath


@dataclass(frozen=True)
class PtqCfg:
    """A parsed `.cfg` whose model-independent rules hold; names are checked by `plan_from_cfg`."""

    source: str
    where: Locator
    batch_num: int
    activation_offset: bool
    do_fusion: bool
    fakequant_precision_mode: str | None
    skip_layers: dict[str, FieldPath]
    skip_layer_types: dict[LayerType, FieldPath]
    skip_fusion_layers: dict[str, FieldPath]
    common: CalibrationChoice | None
    type_overrides: dict[LayerType, Override]
    layer_overrides: dict[str, Override]


def _parses(text: str, message: Any) -> bool:
    try:
        parse_text(text, message, source="", error=ConfigError)
    except ConfigError:
        return False
    return True


def load_ptq_cfg(path: str | os.PathLike[str]) -> PtqCfg:
    """Parse a PTQ `.cfg` and check every rule that does not need the model.

    Raises:
        ConfigError: naming the file, the line:column where known, and the field, type or layer.
    """
    source = os.fspath(path)
    text = read_text(source, error=ConfigError, what="config")
    try:
        message = parse_text(text, pb.AMCTConfig(), source=source, error=ConfigError)
    except ConfigError as exc:
        if _parses(text, kv_pb.AMCTQuantCaliConfig()):
            raise ConfigError(f"{str(exc).rstrip('.')}: {KV_CFG_HINT}") from None
        raise
    return _Reader(source, message, Locator(source, text, pb.AMCTConfig.DESCRIPTOR)).read()


def check_not_ptq_cfg(path: str | os.PathLike[str]) -> None:
    """For the KV path: a `.cfg` that only the PTQ schema parses is an error saying so.

    Returns silently for a file that cannot be read, that parses as a KV-cache `.cfg`, or
    that does not parse as a PTQ one either (the KV path reports those itself).

    Raises:
        ConfigError: the KV parser's error, then which schema the file is and what to do.
    """
    source = os.fspath(path)
    try:
        text = read_text(source, error=ConfigError, what="config")
    except ConfigError:
        return
    try:
        parse_text(text, kv_pb.AMCTQuantCaliConfig(), source=source, error=ConfigError)
    except ConfigError as exc:
        if _parses(text, pb.AMCTConfig()):
            raise ConfigError(f"{str(exc).rstrip('.')}: {PTQ_CFG_HINT}") from None


class _Reader:
    """Turns a parsed AMCTConfig into a `PtqCfg`, checking as it goes."""

    def __init__(self, source: str, message: pb.AMCTConfig, where: Locator) -> None:
        self.source = source
        self.message = message
        self.where = where

    def read(self) -> PtqCfg:
        msg = self.message
        try:
            batch_num = check_batch_num(msg.batch_num)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.where(('batch_num',))}: {exc}") from None
        common = self._choice(msg.common_config, ("common_config",)) if msg.HasField("common_config") else None
        return PtqCfg(
            source=self.source,
            where=self.where,
            batch_num=batch_num,
            activation_offset=msg.activation_offset,
            do_fusion=msg.do_fusion,
            fakequant_precision_mode=FORCE_FP16_QUANT if msg.HasField("fakequant_precision_mode") else None,
            skip_layers=self._unique("skip_layers", msg.skip_layers, "layer"),
            skip_layer_types=self._types(),
            skip_fusion_layers=self._unique("skip_fusion_layers", msg.skip_fusion_layers, "layer"),
            common=common,
            type_overrides=self._type_overrides(),
            layer_overrides=self._layer_overrides(),
        )

    def _first_at(self, path: FieldPath) -> str:
        line = self.where.line(path)
        return "" if line is None else f" (first at line {line})"

    def _unique(self, field: str, values: Any, what: str) -> dict[str, FieldPath]:
        seen: dict[str, FieldPath] = {}
        for index, value in enumerate(values):
            path: FieldPath = (field, index)
            if value in seen:
                raise ConfigError(
                    f"{self.where(path)}: {field}: {what} {value!r} is listed twice{self._first_at(seen[value])}"
                )
            seen[value] = path
        return seen

    def _types(self) -> dict[LayerType, FieldPath]:
        types = self._unique("skip_layer_types", self.message.skip_layer_types, "type")
        for name, path in types.items():
            self._layer_type(name, path, "skip_layer_types")
        return types  # type: ignore[return-value]

    def _layer_type(self, name: str, path: FieldPath, field: str) -> LayerType:
        try:
            return check_layer_type(name)
        except ValueError as exc:
            raise ConfigError(f"{self.where(path)}: {field}: {exc}") from None

    def _type_overrides(self) -> dict[LayerType, Override]:
        result: dict[LayerType, Override] = {}
        first: dict[str, FieldPath] = {}
        for index, entry in enumerate(self.message.override_layer_types):
            block: FieldPath = ("override_layer_types", index)
            self._require(entry, block, ("layer_type", "calibration_config"))
            path = block + ("layer_type",)
            if entry.layer_type in first:
                raise ConfigError(
                    f"{self.where(path)}: override_layer_types: type {entry.layer_type!r} is overridden twice"
                    f"{self._first_at(first[entry.layer_type])}"
                )
            first[entry.layer_type] = path
            layer_type = self._layer_type(entry.layer_type, path, "override_layer_types")
            config_path = block + ("calibration_config",)
            choice = self._choice(entry.calibration_config, config_path)
            problem = override_problem(choice, layer_type)
            if problem is not None:
                where = self.rule_location(config_path, choice, problem)
                raise ConfigError(f"{where}: override_layer_types {layer_type!r}: {problem}")
            result[layer_type] = Override(choice, config_path)
        return result

    def _layer_overrides(self) -> dict[str, Override]:
        result: dict[str, Override] = {}
        first: dict[str, FieldPath] = {}
        for index, entry in enumerate(self.message.override_layer_configs):
            block: FieldPath = ("override_layer_configs", index)
            self._require(entry, block, ("layer_name", "calibration_config"))
            path = block + ("layer_name",)
            if entry.layer_name in first:
                raise ConfigError(
                    f"{self.where(path)}: override_layer_configs: layer {entry.layer_name!r} is overridden twice"
                    f"{self._first_at(first[entry.layer_name])}"
                )
            first[entry.layer_name] = path
            config_path = block + ("calibration_config",)
            result[entry.layer_name] = Override(self._choice(entry.calibration_config, config_path), config_path)
        return result

    def _require(self, entry: Any, block: FieldPath, fields: tuple[str, ...]) -> None:
        for field in fields:
            if not entry.HasField(field):
                raise ConfigError(f"{self.where(block)}: {block[0]} has no {field} (it is required)")

    def _choice(self, config: pb.CalibrationConfig, path: FieldPath) -> CalibrationChoice:
        """One calibration_config: values checked here, layer-type rules by the caller."""
        act_field = config.WhichOneof("acts_quant_algo")
        act, asymmetric = None, None
        if act_field is not None:
            algo = getattr(config, act_field)
            if algo.dst_type != algo.INT8:
                raise ConfigError(
                    f"{self.where(path + (act_field, 'dst_type'))}: {act_field}: dst_type INT16 is not supported; "
                    "only INT8"
                )
            act = self._checked(path + (act_field,), act_field, lambda: _act_params(algo))
            asymmetric = algo.asymmetric if algo.HasField("asymmetric") else None
        wts_field = config.WhichOneof("wts_quant_algo")
        weight = None
        if wts_field is not None:
            weight = self._checked(path + (wts_field,), wts_field, lambda: _weight_choice(getattr(config, wts_field)))
        dmq = None
        if config.HasField("dmq_balancer"):
            dmq = self._checked(
                path + ("dmq_balancer",),
                "dmq_balancer",
                lambda: CalibrationChoice(dmq=f32_value(config.dmq_balancer.migration_strength)).dmq,
            )
        return CalibrationChoice(act=act, asymmetric=asymmetric, weight=weight, dmq=dmq)

    def _checked(self, path: FieldPath, what: str, build: Any) -> Any:
        try:
            return build()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self._locate(path, str(exc))}: {what}: {exc}") from None

    def _locate(self, path: FieldPath, message: str) -> str:
        """FILE:LINE:COL of the field a message is about (its first word), else of `path`."""
        first_word = re.match(r"\w+", message)
        for field in _PARAM_FIELDS.get(first_word.group(0) if first_word else "", ()):
            if path + (field,) in self.where.positions:
                return self.where(path + (field,))
        return self.where(path)

    def rule_location(self, path: FieldPath, choice: CalibrationChoice, problem: str) -> str:
        """Where a layer-type rule (`override_problem`) points: the field it is about."""
        return rule_location(self.where, path, choice, problem)


def rule_location(where: Locator, path: FieldPath, choice: CalibrationChoice, problem: str) -> str:
    """FILE:LINE:COL of the field of a `calibration_config` at `path` that a rule message is about."""
    act = None if choice.act is None else f"{choice.act.algo}_quantize"
    wts = None if choice.weight is None else choice.weight.algo
    first_word = problem.split(maxsplit=1)[0].rstrip(":")
    fields: dict[str, FieldPath] = {
        "asymmetric": (act, "asymmetric") if act else (),
        "dmq_balancer": ("dmq_balancer",),
        "ada_quantize": ("ada_quantize",),
        "quant_bits": (wts, "quant_bits") if wts else (),
        "channel_wise": (wts, "channel_wise") if wts else (),
    }
    return where(path + fields.get(first_word, ()))


def _act_params(algo: Any) -> HfmgParams | IfmrParams:
    if isinstance(algo, pb.HFMGQuantize):
        return HfmgParams(num_of_bins=algo.num_of_bins)
    return IfmrParams(
        max_percentile=f32_value(algo.max_percentile),
        min_percentile=f32_value(algo.min_percentile),
        search_range=(f32_value(algo.search_range_start), f32_value(algo.search_range_end)),
        search_step=f32_value(algo.search_step),
    )


def _weight_choice(algo: Any) -> WeightChoice:
    channel_wise = algo.channel_wise if algo.HasField("channel_wise") else None
    if isinstance(algo, pb.ARQuantize):
        return ArqChoice(channel_wise=channel_wise, quant_bits=algo.quant_bits if algo.HasField("quant_bits") else None)
    return AdaParams(
        num_iteration=algo.num_iteration,
        reg_param=f32_value(algo.reg_param),
        beta_range=(f32_value(algo.beta_range_start), f32_value(algo.beta_range_end)),
        warm_start=f32_value(algo.warm_start),
        channel_wise=channel_wise,
    )


def plan_from_cfg(cfg: PtqCfg, discovery: Discovery) -> tuple[PtqPlan, list[Note]]:
    """Check the `.cfg`'s names against the model's layers and resolve every quantizable layer.

    Returns:
        The plan, and the notes about what was ignored, dropped or adjusted.

    Raises:
        ConfigError: a name that is not a module of the model (closest names given), a
            skipped module that is not quantizable, a skip_fusion_layers entry that is
            not a Conv1d/2d/3d, a layer override breaking its type's rules, a
            channel_wise true reaching a Linear/AvgPool2d, or no layer left to quantize.
    """
    check_cfg_names(cfg, discovery.modules, discovery.layers)
    _check_skip_layers(cfg, discovery)
    notes: list[Note] = []
    overrides = _layer_overrides(cfg, discovery, notes)
    layers = []
    for name, layer_type in discovery.layers.items():
        override = overrides.get(name) or cfg.type_overrides.get(layer_type)
        chosen, path = (override.choice, override.path) if override else (cfg.common, ("common_config",))
        enabled = name not in cfg.skip_layers and layer_type not in cfg.skip_layer_types
        try:
            layers.append(
                resolve_layer(
                    name,
                    layer_type,
                    quant_enable=enabled,
                    chosen=chosen,
                    common=cfg.common,
                    activation_offset=cfg.activation_offset,
                    notes=notes,
                )
            )
        except ValueError as exc:
            where = cfg.source if chosen is None else rule_location(cfg.where, path, chosen, str(exc))
            raise ConfigError(f"{where}: layer {name!r} ({layer_type}): {exc}") from None
    try:
        plan = PtqPlan(
            batch_num=cfg.batch_num,
            activation_offset=cfg.activation_offset,
            layers=tuple(layers),
            do_fusion=cfg.do_fusion,
            fakequant_precision_mode=cfg.fakequant_precision_mode,
            skip_fusion_layers=tuple(cfg.skip_fusion_layers),
        )
    except ValueError as exc:
        detail = " (skip_layers and skip_layer_types cover them all)" if str(exc).startswith("no layer") else ""
        raise ConfigError(f"{cfg.source}: {exc}{detail}") from None
    return plan, notes


def check_cfg_names(
    cfg: PtqCfg, modules: Mapping[str, type[nn.Module]], preferred: Iterable[str] | None = None
) -> None:
    """Every layer name of the `.cfg` is a module of the model, and every skip_fusion_layers
    entry a Conv1d/2d/3d: what can be checked before the forward pass.

    Raises:
        ConfigError: at the name's FILE:LINE:COL, with the closest names (`preferred` first).
    """
    overrides = {name: override.path[:-1] + ("layer_name",) for name, override in cfg.layer_overrides.items()}
    lists = (
        ("skip_layers", cfg.skip_layers),
        ("override_layer_configs", overrides),
        ("skip_fusion_layers", cfg.skip_fusion_layers),
    )
    for field, names in lists:
        for name, path in names.items():
            if name not in modules:
                raise ConfigError(f"{cfg.where(path)}: {field}: {missing_name(name, modules, preferred)}")
    for name, path in cfg.skip_fusion_layers.items():
        problem = fusion_problem(name, modules[name])
        if problem is not None:
            raise ConfigError(f"{cfg.where(path)}: skip_fusion_layers: {problem}")


def _check_skip_layers(cfg: PtqCfg, discovery: Discovery) -> None:
    for name, path in cfg.skip_layers.items():
        if name not in discovery.layers:
            raise ConfigError(f"{cfg.where(path)}: skip_layers: layer {name!r} {discovery.why_not_quantizable(name)}")


def _layer_overrides(cfg: PtqCfg, discovery: Discovery, notes: list[Note]) -> dict[str, Override]:
    """The layer overrides that apply: a module that is not quantizable is ignored with a warning."""
    result: dict[str, Override] = {}
    for name, override in cfg.layer_overrides.items():
        name_path = override.path[:-1] + ("layer_name",)
        layer_type = discovery.layers.get(name)
        if layer_type is None:
            notes.append(
                Note(
                    "warning",
                    f"{cfg.where(name_path)}: override_layer_configs: layer {name!r} "
                    f"{discovery.why_not_quantizable(name)}; its override is ignored",
                )
            )
            continue
        problem = override_problem(override.choice, layer_type)
        if problem is not None:
            where = rule_location(cfg.where, override.path, override.choice, problem)
            raise ConfigError(f"{where}: override_layer_configs: layer {name!r} ({layer_type}): {problem}")
        result[name] = override
    return result
