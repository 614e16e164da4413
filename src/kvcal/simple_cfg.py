"""The simple config (`.cfg`, protobuf text format) → `CalibrationPlan` (FORMATS.md §1).

Parsing is strict: syntax errors, unknown fields, a non-repeated field given twice and
both algorithms in one `calibration_config` are errors reported as
`FILE:LINE:COL: message`. The rules that the protobuf parser does not know (required
`layer_name`, duplicated layers, value ranges, layers of the model) are checked
afterwards and point at the line of the field at fault.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
from google.protobuf import descriptor as _descriptor
from google.protobuf import text_format
from torch import nn

from kvcal.errors import ConfigError
from kvcal.plan import (
    AlgoParams,
    CalibrationPlan,
    HfmgParams,
    IfmrParams,
    LayerPlan,
    check_batch_num,
    check_layers_in_model,
    parse_granularity,
)
from kvcal.proto import quant_cali_config_pb2 as pb

__all__ = ["load_cfg", "plan_from_layers", "float32_value"]

FieldPath = tuple[object, ...]
"""A field path in the parsed message, e.g. ("override_layers_configs", 0, "layer_name")."""


def float32_value(value: float) -> float:
    """The shortest decimal of a float32 proto value, as a float (0.999999, not 0.99999898...)."""
    return float(str(numpy.float32(value)))


def load_cfg(path: str | os.PathLike[str], model: nn.Module | None) -> CalibrationPlan:
    """Parse and validate a `.cfg` file into a plan.

    Args:
        path: the `.cfg` file (protobuf text format, AMCTQuantCaliConfig).
        model: when given, every configured layer must be one of its `nn.Linear` modules.

    Raises:
        ConfigError: naming the file, the line:column where known, and the field or layer.
    """
    source = os.fspath(path)
    text = _read_text(source)
    message = pb.AMCTQuantCaliConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(_parse_error_message(source, exc)) from None
    where = _Locator(source, text)
    return _Builder(source, message, where, model).build()


def plan_from_layers(
    names: Sequence[str],
    model: nn.Module | None,
    *,
    batch_num: int = 1,
    activation_offset: bool = True,
) -> CalibrationPlan:
    """A plan giving every listed layer the IFMR defaults (the `--quant-layers` path).

    Raises:
        ConfigError: an empty or duplicated name, no names, or a name that is not a Linear
            layer of `model`.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"layer names must be a list of str, got the single string {names!r}")
    layers: list[LayerPlan] = []
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, got {name!r} ({type(name).__name__})")
        if not name:
            raise ConfigError("--quant-layers: empty layer name")
        if name in seen:
            raise ConfigError(f"--quant-layers: layer {name!r} is listed twice")
        seen.add(name)
        layers.append(LayerPlan(name=name, params=IfmrParams()))
    if not layers:
        raise ConfigError("--quant-layers: no layers to calibrate")
    if model is not None:
        check_layers_in_model([layer.name for layer in layers], model, "--quant-layers")
    try:
        return CalibrationPlan(batch_num=batch_num, activation_offset=activation_offset, layers=tuple(layers))
    except ValueError as exc:
        raise ConfigError(f"--quant-layers: {exc}") from None


def _read_text(source: str) -> str:
    try:
        with open(source, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror or exc}") from None


_PARSER_POSITION = re.compile(r"^\d+:\d+ : ")


def _parse_error_message(source: str, exc: text_format.ParseError) -> str:
    text = _PARSER_POSITION.sub("", str(exc), count=1)
    line, column = exc.GetLine(), exc.GetColumn()
    if line is None:
        return f"{source}: {text}"
    return f"{source}:{line}:{column}: {text}"


@dataclass(frozen=True)
class _Token:
    text: str
    offset: int


# Comments, strings (either quote, with escapes), words/numbers, punctuation.
_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<tok>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[\w.+-]+|[{}<>:;,\[\]])""",
    re.DOTALL,
)


class _Locator:
    """Where each field of an already successfully parsed `.cfg` text starts.

    The protobuf text parser keeps no positions, so the text is scanned again with the
    schema to map field paths to 1-based (line, column). Positions are best effort: a
    path not found falls back to its closest enclosing field, then to the file alone.
    """

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self._tokens = [_Token(m.group("tok"), m.start()) for m in _TOKEN.finditer(text) if m.group("tok")]
        self._pos = 0
        self.positions: dict[FieldPath, tuple[int, int]] = {}
        try:
            self._message(pb.AMCTQuantCaliConfig.DESCRIPTOR, (), None)
        except IndexError:  # pragma: no cover - the text parsed, so the scan should not run out
            pass

    def __call__(self, path: FieldPath) -> str:
        """`FILE:LINE:COL` of `path` (or of its closest located parent), else `FILE`."""
        for end in range(len(path), 0, -1):
            position = self.positions.get(path[:end])
            if position is not None:
                return f"{self.source}:{position[0]}:{position[1]}"
        return self.source

    def line(self, path: FieldPath) -> int | None:
        position = self.positions.get(path)
        return None if position is None else position[0]

    def _where(self, token: _Token) -> tuple[int, int]:
        index = bisect.bisect_right(self._line_starts, token.offset) - 1
        return index + 1, token.offset - self._line_starts[index] + 1

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _peek(self) -> str | None:
        return self._tokens[self._pos].text if self._pos < len(self._tokens) else None

    def _message(self, desc: _descriptor.Descriptor, prefix: FieldPath, closing: str | None) -> None:
        counters: dict[str, int] = {}
        while self._peek() is not None:
            text = self._peek()
            if text == closing:
                self._pos += 1
                return
            if text in (";", ","):
                self._pos += 1
                continue
            name = self._next()
            field = desc.fields_by_name.get(name.text)
            if field is None:  # pragma: no cover - the parser accepted the text
                return
            if self._peek() == ":":
                self._pos += 1
            if self._peek() == "[":
                self._pos += 1
                while self._peek() not in ("]", None):
                    if self._peek() == ",":
                        self._pos += 1
                        continue
                    self._value(field, prefix, counters, self._tokens[self._pos])
                self._pos += 1
            else:
                self._value(field, prefix, counters, name)

    def _value(
        self, field: _descriptor.FieldDescriptor, prefix: FieldPath, counters: dict[str, int], anchor: _Token
    ) -> None:
        if field.is_repeated:
            index = counters.get(field.name, 0)
            counters[field.name] = index + 1
            path = prefix + (field.name, index)
        else:
            path = prefix + (field.name,)
        self.positions.setdefault(path, self._where(anchor))
        if field.type in (field.TYPE_MESSAGE, field.TYPE_GROUP):
            opening = self._next().text
            self._message(field.message_type, path, "}" if opening == "{" else ">")
            return
        self._next()
        # Adjacent string literals are concatenated by the text format.
        while field.type in (field.TYPE_STRING, field.TYPE_BYTES) and (self._peek() or "")[:1] in ("'", '"'):
            self._pos += 1


# The first word of a plan.py validation message names the parameter at fault.
_PARAM_FIELDS = {
    "max_percentile": ("max_percentile",),
    "min_percentile": ("min_percentile",),
    "search_range": ("search_range_start", "search_range_end"),
    "search_step": ("search_step",),
    "num_of_bins": ("num_of_bins",),
}


class _Builder:
    """Turns a parsed AMCTQuantCaliConfig into a validated plan."""

    def __init__(self, source: str, message: pb.AMCTQuantCaliConfig, where: _Locator, model: nn.Module | None):
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
        common = msg.kv_cache_quant_config
        common_path: FieldPath = ("kv_cache_quant_config", "calibration_config")
        common_settings = self._algo(
            common.calibration_config if common.HasField("calibration_config") else None,
            common_path,
            "kv_cache_quant_config.calibration_config",
        )

        layers: dict[str, LayerPlan] = {}
        paths: dict[str, FieldPath] = {}
        for index, name in enumerate(common.quant_layers):
            path: FieldPath = ("kv_cache_quant_config", "quant_layers", index)
            if name in layers:
                raise ConfigError(
                    f"{self.where(path)}: layer {name!r} is listed twice in kv_cache_quant_config.quant_layers"
                    f"{self._first_at(paths[name])}"
                )
            params, granularity, asymmetric = common_settings
            layers[name] = LayerPlan(name=name, params=params, granularity=granularity, asymmetric=asymmetric)
            paths[name] = path

        overridden: dict[str, FieldPath] = {}
        for index, override in enumerate(msg.override_layers_configs):
            block: FieldPath = ("override_layers_configs", index)
            if not override.HasField("layer_name"):
                raise ConfigError(f"{self.where(block)}: override_layers_configs has no layer_name (it is required)")
            name = override.layer_name
            path = block + ("layer_name",)
            if name in overridden:
                raise ConfigError(
                    f"{self.where(path)}: layer {name!r} is overridden twice in override_layers_configs"
                    f"{self._first_at(overridden[name])}"
                )
            overridden[name] = path
            config = override.kv_data_quant_config if override.HasField("kv_data_quant_config") else None
            params, granularity, asymmetric = self._algo(
                config, block + ("kv_data_quant_config",), f"override of layer {name!r}"
            )
            # The override replaces the layer's settings and keeps its place; a new layer goes last.
            layers[name] = LayerPlan(name=name, params=params, granularity=granularity, asymmetric=asymmetric)
            paths.setdefault(name, path)

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

    def _first_at(self, path: FieldPath) -> str:
        line = self.where.line(path)
        return "" if line is None else f" (first at line {line})"

    def _algo(
        self, config: pb.CalibrationConfig | None, path: FieldPath, what: str
    ) -> tuple[AlgoParams, int, bool | None]:
        """Algorithm parameters, granularity and asymmetric flag (None: unset) of one config."""
        which = config.WhichOneof("acts_quant_algo") if config is not None else None
        if config is None or which is None:
            return IfmrParams(), 0, None
        algo_path = path + (which,)
        algo = getattr(config, which)  # the FMRQuantize or HFMGQuantize message
        params: AlgoParams
        try:
            if which == "hfmg_quantize":
                params = HfmgParams(num_of_bins=algo.num_of_bins)
            else:
                params = IfmrParams(
                    max_percentile=float32_value(algo.max_percentile),
                    min_percentile=float32_value(algo.min_percentile),
                    search_range=(float32_value(algo.search_range_start), float32_value(algo.search_range_end)),
                    search_step=float32_value(algo.search_step),
                )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self._param_location(algo_path, str(exc))}: {what}: {which}: {exc}") from None
        granularity = parse_granularity(int(algo.quant_granularity))
        asymmetric = algo.asymmetric if algo.HasField("asymmetric") else None
        return params, granularity, asymmetric

    def _param_location(self, algo_path: FieldPath, message: str) -> str:
        first_word = re.match(r"\w+", message)
        for field in _PARAM_FIELDS.get(first_word.group(0) if first_word else "", ()):
            if algo_path + (field,) in self.where.positions:
                return self.where(algo_path + (field,))
        return self.where(algo_path)
