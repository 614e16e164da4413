"""`PtqPlan` ↔ the PTQ JSON config, byte for byte as PTQ.md §3 prescribes.

Written as `json.dump(obj, f, indent=4, separators=(",", ":"))`: no trailing newline,
keys in the prescribed order, layers in `sorted()` order, float32 proto values as their
shortest decimal. Reading (for `calibrate`) checks everything the `.cfg` path checks plus
unknown keys, wrong types, duplicated keys, IFMR and HFMG keys mixed, keys of the other
`wts_algo`, layers that are not quantizable layers of the model, and a config with no
enabled layer. Errors name the file and the key or layer at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvcal.atomic import atomic_write
from kvcal.errors import ConfigError
from kvcal.floats import f32_value
from kvcal.jsonio import load_json
from kvcal.params import (
    ALGO_KEYS,
    AlgoParams,
    algo_params,
    check_act_algo,
    check_batch_num,
    check_bool,
    checked,
)
from kvcal.ptq.layers import Discovery, LayerType
from kvcal.ptq.plan import (
    CHANNEL_WISE_TYPES,
    FORCE_FP16_QUANT,
    GLOBAL_KEYS,
    SYMMETRIC_ONLY_TYPES,
    AdaParams,
    ArqParams,
    LayerSettings,
    PtqPlan,
    WeightParams,
    check_migration_strength,
    fusion_problem,
)

__all__ = ["is_ptq_config", "plan_to_json", "read_config", "write_config"]

VERSION = 1
LAYER_KEYS = ("quant_enable", "dmq_balancer_param", "activation_quant_params", "weight_quant_params")
_ACT_COMMON = ("num_bits", "act_algo", "asymmetric")
_ADA_KEYS = ("reg_param", "warm_start", "num_iteration", "beta_range")
_WEIGHT_KEYS = {
    "arq_quantize": ("num_bits", "channel_wise", "wts_algo"),
    "ada_quantize": ("num_bits", *_ADA_KEYS, "channel_wise", "wts_algo"),
}


def plan_to_json(plan: PtqPlan) -> str:
    """The JSON text of a plan: globals, then one object per layer in `sorted()` name order."""
    document: dict[str, Any] = {
        "version": VERSION,
        "batch_num": plan.batch_num,
        "activation_offset": plan.activation_offset,
        "do_fusion": plan.do_fusion,
    }
    if plan.fakequant_precision_mode is not None:
        document["fakequant_precision_mode"] = plan.fakequant_precision_mode
    document["skip_fusion_layers"] = list(plan.skip_fusion_layers)
    for layer in sorted(plan.layers, key=lambda item: item.name):
        document[layer.name] = _layer_object(layer)
    return json.dumps(document, indent=4, separators=(",", ":"))


def _layer_object(layer: LayerSettings) -> dict[str, Any]:
    entry: dict[str, Any] = {"quant_enable": layer.quant_enable}
    if layer.dmq is not None:
        entry["dmq_balancer_param"] = f32_value(layer.dmq)
    entry["activation_quant_params"] = _act_object(layer.act, layer.asymmetric)
    if layer.weight is not None:
        entry["weight_quant_params"] = _weight_object(layer.weight)
    return entry


def _act_object(params: AlgoParams, asymmetric: bool) -> dict[str, Any]:
    if params.algo == "hfmg":
        return {"num_bits": 8, "act_algo": "hfmg", "asymmetric": asymmetric, "num_of_bins": params.num_of_bins}
    start, end = params.search_range
    return {
        "num_bits": 8,
        "max_percentile": f32_value(params.max_percentile),
        "min_percentile": f32_value(params.min_percentile),
        "search_range": [f32_value(start), f32_value(end)],
        "search_step": f32_value(params.search_step),
        "act_algo": "ifmr",
        "asymmetric": asymmetric,
    }


def _weight_object(weight: WeightParams) -> dict[str, Any]:
    if isinstance(weight, ArqParams):
        return {"num_bits": weight.num_bits, "channel_wise": weight.channel_wise, "wts_algo": "arq_quantize"}
    return {
        "num_bits": weight.num_bits,
        "reg_param": f32_value(weight.reg_param),
        "warm_start": f32_value(weight.warm_start),
        "num_iteration": weight.num_iteration,
        "beta_range": [f32_value(weight.beta_range[0]), f32_value(weight.beta_range[1])],
        "channel_wise": weight.channel_wise,
        "wts_algo": "ada_quantize",
    }


def write_config(plan: PtqPlan, path: str | os.PathLike[str]) -> None:
    """Write the plan's JSON atomically (temporary file, fsync, rename); on error the target is untouched.

    Raises:
        ConfigError: the file cannot be written (the reason is given).
    """
    target = os.fspath(path)
    text = plan_to_json(plan)
    check_output_path(target)
    try:
        atomic_write(Path(target), text.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot write config {target}: {exc.strerror or exc}") from None


def check_output_path(target: str) -> None:
    """The output must not be a directory and its directory must exist (checked before any work)."""
    if os.path.isdir(target):
        raise ConfigError(f"cannot write config {target}: it is a directory")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ConfigError(f"cannot write config {target}: directory {directory} does not exist")


def is_ptq_config(document: Any) -> bool:
    """Whether a parsed JSON config is a PTQ one (it has the `version` key) rather than a KV-cache one."""
    return isinstance(document, dict) and "version" in document


def read_config(path: str | os.PathLike[str], discovery: Discovery) -> PtqPlan:
    """Read and fully validate a PTQ JSON config against the model's quantizable layers.

    Missing keys take their defaults (globals; IFMR defaults; `asymmetric`: false on
    Conv3d, else `activation_offset`; `channel_wise`: per type); a missing
    `weight_quant_params` reads as none. `quant_enable` is required.

    Raises:
        ConfigError: naming the file and the key or layer at fault.
    """
    source = os.fspath(path)
    document = load_json(source)
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the config must be a JSON object, got {type(document).__name__}")
    if document.get("version") != VERSION or isinstance(document.get("version"), bool):
        raise ConfigError(f"{source}: key 'version' must be 1 in a PTQ config, got {document.get('version')!r}")
    offset = checked(
        f"{source}: key 'activation_offset'", lambda v: check_bool("value", v), document.get("activation_offset", True)
    )
    layers = []
    for name, entry in document.items():
        if name in GLOBAL_KEYS:
            continue
        layers.append(_layer_from_entry(source, name, entry, discovery, offset))
    try:
        return PtqPlan(
            batch_num=checked(source, check_batch_num, document.get("batch_num", 1)),
            activation_offset=offset,
            layers=tuple(layers),
            do_fusion=checked(
                f"{source}: key 'do_fusion'", lambda v: check_bool("value", v), document.get("do_fusion", True)
            ),
            fakequant_precision_mode=_precision_mode(source, document),
            skip_fusion_layers=_fusion_layers(source, document.get("skip_fusion_layers", []), discovery),
        )
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _precision_mode(source: str, document: dict[str, Any]) -> str | None:
    mode = document.get("fakequant_precision_mode", "DEFAULT")
    if mode not in ("DEFAULT", FORCE_FP16_QUANT) or not isinstance(mode, str):
        raise ConfigError(
            f"{source}: key 'fakequant_precision_mode' must be {FORCE_FP16_QUANT!r} or 'DEFAULT', got {mode!r}"
        )
    return None if mode == "DEFAULT" else mode


def _fusion_layers(source: str, names: Any, discovery: Discovery) -> tuple[str, ...]:
    where = f"{source}: key 'skip_fusion_layers'"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{where} must be a list of layer names, got {names!r}")
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"{where}: layer {name!r} is listed twice")
        if name not in discovery.modules:
            raise ConfigError(f"{where}: {discovery.missing(name)}")
        problem = fusion_problem(name, discovery.modules[name])
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
    return tuple(names)


def _layer_from_entry(source: str, name: str, entry: Any, discovery: Discovery, offset: bool) -> LayerSettings:
    where = f"{source}: layer {name!r}"
    if name not in discovery.layers:
        if name not in discovery.modules:
            raise ConfigError(f"{source}: layer {discovery.missing(name)}")
        raise ConfigError(f"{where} {discovery.why_not_quantizable(name)}")
    layer_type = discovery.layers[name]
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object, got {json.dumps(entry)}")
    unknown = [key for key in entry if key not in LAYER_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; accepted keys: {', '.join(LAYER_KEYS)}")
    if "quant_enable" not in entry:
        raise ConfigError(f"{where}: quant_enable (true or false) is missing")
    act, asymmetric = _act_from_object(f"{where}: activation_quant_params", entry.get("activation_quant_params", {}))
    if asymmetric is None:
        asymmetric = False if layer_type in SYMMETRIC_ONLY_TYPES else offset
    weight = None
    if "weight_quant_params" in entry:
        weight = _weight_from_object(f"{where}: weight_quant_params", entry["weight_quant_params"], layer_type)
    dmq = entry.get("dmq_balancer_param")
    if "dmq_balancer_param" in entry:
        dmq = checked(f"{where}: dmq_balancer_param", check_migration_strength, dmq)
    return checked(
        where,
        lambda quant_enable: LayerSettings(
            name, layer_type, check_bool("quant_enable", quant_enable), act, asymmetric, weight, dmq
        ),
        entry["quant_enable"],
    )


def _act_from_object(where: str, value: Any) -> tuple[AlgoParams, bool | None]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object, got {json.dumps(value)}")
    inferred = "hfmg" if any(key in ALGO_KEYS["hfmg"] for key in value) else "ifmr"
    algo = checked(where, check_act_algo, value.get("act_algo", inferred))
    num_bits = value.get("num_bits", 8)
    if num_bits != 8 or isinstance(num_bits, bool):
        raise ConfigError(f"{where}: num_bits must be 8 (only INT8 activations are supported), got {num_bits!r}")
    search_range = value.get("search_range", [])
    if not isinstance(search_range, list):
        raise ConfigError(f"{where}: search_range must be a list of two numbers [start, end], got {search_range!r}")
    params = checked(where, lambda v: algo_params(algo, v, common_keys=_ACT_COMMON), value)
    asymmetric = value.get("asymmetric")
    if "asymmetric" in value:
        checked(where, lambda v: check_bool("asymmetric", v), asymmetric)
    return params, asymmetric


def _weight_from_object(where: str, value: Any, layer_type: LayerType) -> WeightParams:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object, got {json.dumps(value)}")
    algo = value.get("wts_algo", "arq_quantize")
    if algo not in _WEIGHT_KEYS:
        raise ConfigError(f"{where}: wts_algo must be 'arq_quantize' or 'ada_quantize', got {algo!r}")
    for key in value:
        if key not in _WEIGHT_KEYS[algo]:
            owner = next((other for other, keys in _WEIGHT_KEYS.items() if key in keys), None)
            if owner is not None:
                raise ConfigError(f"{where}: {key} is a parameter of {owner}, not of wts_algo {algo!r}")
            raise ConfigError(
                f"{where}: unknown key {key!r}; accepted keys for {algo}: {', '.join(_WEIGHT_KEYS[algo])}"
            )
    channel_wise = value.get("channel_wise", layer_type in CHANNEL_WISE_TYPES)
    num_bits = value.get("num_bits", 8)
    if algo == "arq_quantize":
        return checked(where, lambda v: ArqParams(num_bits=num_bits, channel_wise=channel_wise), value)
    beta_range = value.get("beta_range", [20.0, 2.0])
    if not isinstance(beta_range, list):
        raise ConfigError(f"{where}: beta_range must be a list of two numbers [start, end], got {beta_range!r}")
    defaults = AdaParams()
    return checked(
        where,
        lambda v: AdaParams(
            num_iteration=v.get("num_iteration", defaults.num_iteration),
            reg_param=v.get("reg_param", defaults.reg_param),
            beta_range=tuple(beta_range),
            warm_start=v.get("warm_start", defaults.warm_start),
            channel_wise=channel_wise,
            num_bits=num_bits,
        ),
        value,
    )
