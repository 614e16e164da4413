"""`CalibrationPlan` ↔ the per-layer JSON config, in AMCT's exact layout (FORMATS.md §2).

Written as `json.dumps(..., indent=4, separators=(",", ":"))` with no trailing newline,
like AMCT's `json.dump`. Reading is strict: every key, type and value is checked and
errors name the file and the key or layer at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from kvcal.atomic import atomic_write
from kvcal.errors import ConfigError
from kvcal.floats import f32_value
from kvcal.jsonio import load_json
from kvcal.kv.plan import CalibrationPlan, LayerPlan, check_layers_in_model
from kvcal.params import (
    ALGO_KEYS,
    algo_params,
    check_act_algo,
    check_batch_num,
    checked,
    only_key,
)
from kvcal.quant import Granularity

__all__ = ["plan_to_json", "write_config", "read_config", "GLOBAL_KEYS", "LAYER_KEY"]

GLOBAL_KEYS = ("batch_num", "activation_offset")
LAYER_KEY = "kv_data_quant_config"
# The keys of a layer entry around the algorithm's own (params.ALGO_KEYS), in written order.
_LEADING_KEYS = ("act_algo",)
_TRAILING_KEYS = ("asymmetric", "quant_granularity")


def plan_to_json(plan: CalibrationPlan) -> str:
    """The JSON text of a plan: globals, then one entry per layer in plan order."""
    document: dict[str, Any] = {"batch_num": plan.batch_num, "activation_offset": plan.activation_offset}
    for layer in plan.layers:
        if layer.name in document:
            raise ConfigError(f"layer name {layer.name!r} collides with the global key of the same name")
        document[layer.name] = {LAYER_KEY: _layer_entry(layer)}
    return json.dumps(document, indent=4, separators=(",", ":"))


def _layer_entry(layer: LayerPlan) -> dict[str, Any]:
    params = layer.params
    entry: dict[str, Any] = {"act_algo": params.algo}
    for key in ALGO_KEYS[params.algo]:
        entry[key] = _json_value(getattr(params, key))
    if layer.asymmetric is not None:
        entry["asymmetric"] = layer.asymmetric
    entry["quant_granularity"] = int(layer.granularity)
    return entry


def _json_value(value: Any) -> Any:
    """Floats as their shortest float32 decimal (they are float32 fields in the .cfg schema)."""
    if isinstance(value, float):
        return f32_value(value)
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


def write_config(plan: CalibrationPlan, path: str | os.PathLike[str]) -> None:
    """Write the plan's JSON atomically: a temporary file in the same directory, fsync, rename.

    An existing file is replaced whole; on any error it is left as it was.

    Raises:
        ConfigError: the file cannot be written (the reason is given).
    """
    target = os.fspath(path)
    text = plan_to_json(plan)
    if os.path.isdir(target):
        raise ConfigError(f"cannot write config {target}: it is a directory")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ConfigError(f"cannot write config {target}: directory {directory} does not exist")
    try:
        atomic_write(Path(target), text.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot write config {target}: {exc.strerror or exc}") from None


def read_config(path: str | os.PathLike[str], model: nn.Module | None = None) -> CalibrationPlan:
    """Read and validate a JSON config into a plan.

    Missing globals take their defaults (batch_num 1, activation_offset true) and missing
    layer keys theirs (act_algo "ifmr" and the FORMATS.md §3 defaults); every key present
    must be known, of the right type and in range.

    Raises:
        ConfigError: naming the file and the key or layer at fault.
    """
    source = os.fspath(path)
    plan = _plan_from_document(load_json(source), source)
    if model is not None:
        check_layers_in_model(plan.layer_names, model, source)
    return plan


def _plan_from_document(document: Any, source: str) -> CalibrationPlan:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the config must be a JSON object, got {type(document).__name__}")
    batch_num = checked(source, check_batch_num, document.get("batch_num", 1))
    activation_offset = document.get("activation_offset", True)
    if not isinstance(activation_offset, bool):
        raise ConfigError(f"{source}: key 'activation_offset' must be true or false, got {activation_offset!r}")
    layers = tuple(
        _layer_from_entry(source, name, entry) for name, entry in document.items() if name not in GLOBAL_KEYS
    )
    if not layers:
        raise ConfigError(f"{source}: no layers to calibrate: the config has only the global keys")
    return CalibrationPlan(batch_num=batch_num, activation_offset=activation_offset, layers=layers)


def _layer_from_entry(source: str, name: str, entry: Any) -> LayerPlan:
    where = f"{source}: layer {name!r}"
    if not name:
        raise ConfigError(f"{source}: empty layer name")
    config = checked(where, lambda e: only_key(e, LAYER_KEY, "the entry"), entry)
    where = f"{where}: {LAYER_KEY}"
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must be an object, got {json.dumps(config)}")
    algo = checked(where, check_act_algo, config.get("act_algo", "ifmr"))
    search_range = config.get("search_range", [])
    if not isinstance(search_range, list):
        raise ConfigError(f"{where}: search_range must be a list of two numbers [start, end], got {search_range!r}")
    params = checked(where, lambda c: algo_params(algo, c, common_keys=_LEADING_KEYS + _TRAILING_KEYS), config)
    granularity = config.get("quant_granularity", 0)
    # The writer always writes the integer; strings and bools are a wrong type here.
    if isinstance(granularity, bool) or not isinstance(granularity, int):
        raise ConfigError(f"{where}: quant_granularity must be the integer 0 or 1, got {granularity!r}")
    granularity = checked(where, Granularity.parse, granularity)
    asymmetric = config.get("asymmetric")
    if "asymmetric" in config and not isinstance(asymmetric, bool):
        raise ConfigError(f"{where}: asymmetric must be true or false, got {asymmetric!r}")
    return LayerPlan(name=name, params=params, granularity=granularity, asymmetric=asymmetric)
