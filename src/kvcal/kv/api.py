"""The KV-cache front doors: `kvcal gen-config`, and AMCT's `create_quant_cali_config` and
`create_quant_cali_model`."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kvcal.calibration.runner import attach_observers
from kvcal.calibration.taps import ActiveTap, Tap
from kvcal.errors import ConfigError
from kvcal.kv.cfg import load_cfg, plan_from_layers
from kvcal.kv.config_json import read_config, write_config
from kvcal.kv.ops import write_layer
from kvcal.kv.plan import CalibrationPlan
from kvcal.observers import Observer
from kvcal.params import (
    Algo,
    HfmgParams,
    IfmrParams,
    check_act_algo,
    check_batch_num,
    checked,
    only_key,
)
from kvcal.paths import check_distinct_paths
from kvcal.quant import Granularity

__all__ = [
    "generate_config",
    "create_quant_cali_config",
    "create_quant_cali_model",
    "get_quant_cali_hooks",
    "remove_quant_cali_hooks",
    "split_layer_names",
]

QUANT_LAYERS_KEY = "kv_cache_quant_layers"


def generate_config(
    *,
    model: nn.Module,
    output: str | os.PathLike[str],
    cfg: str | os.PathLike[str] | None = None,
    quant_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    algo: Algo = "ifmr",
    granularity: Granularity | int | str = Granularity.PER_TENSOR,
) -> CalibrationPlan:
    """Validate a `.cfg` (or a list of layers or globs) against `model` and write the JSON.

    Exactly one of `cfg` and `quant_layers` is given. With `quant_layers`, every layer gets
    `algo`'s default parameters, `granularity` and the global `batch_num`. Nothing is
    written on error; an existing `output` is replaced whole only once everything is valid.

    Returns:
        The plan that was written.

    Raises:
        ConfigError: an invalid `.cfg` or layer list, or an output that cannot be written.
        ValueError: both or neither of `cfg` and `quant_layers`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if cfg is not None and quant_layers is None:
        check_distinct_paths({"output": output}, [(".cfg file", cfg)], error=ConfigError)
        plan = load_cfg(cfg, model)
    elif cfg is None and quant_layers is not None:
        params = HfmgParams() if check_act_algo(algo) == "hfmg" else IfmrParams()
        plan = plan_from_layers(
            quant_layers,
            model,
            batch_num=checked("--batch-num", check_batch_num, batch_num),
            params=params,
            granularity=checked("--granularity", Granularity.parse, granularity),
        )
    else:
        raise ValueError("give exactly one of cfg (a .cfg file) and quant_layers (a list of layer names)")
    write_config(plan, output)
    return plan


def split_layer_names(values: Sequence[str]) -> list[str]:
    """`--quant-layers` values (each `NAME[,NAME...]`, repeatable) → names, spaces stripped.

    Raises:
        ConfigError: an empty name (e.g. `a,,b` or a trailing comma).
    """
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                raise ConfigError(f"--quant-layers {value!r}: empty layer name")
            names.append(name)
    return names


def create_quant_cali_config(
    config_file: str | os.PathLike[str],
    model: nn.Module,
    quant_layers: Mapping[str, Sequence[str]] | None = None,
    config_defination: str | os.PathLike[str] | None = None,
) -> None:
    """AMCT's API: write the JSON config `config_file` for `model`.

    Args:
        config_file: the JSON config to write (replaced whole if it exists).
        model: the model whose Linear layers are configured.
        quant_layers: `{'kv_cache_quant_layers': [names]}`, every layer getting the IFMR defaults.
        config_defination: (sic, AMCT's spelling) a `.cfg` file; it wins over `quant_layers`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: neither `quant_layers` nor `config_defination`, or a bad `quant_layers` key.
        ConfigError: an invalid `.cfg` or layer list (nothing is written).
    """
    if not isinstance(config_file, (str, os.PathLike)):
        raise TypeError(f"config_file must be a path, got {config_file!r} ({type(config_file).__name__})")
    if config_defination is not None:
        if not isinstance(config_defination, (str, os.PathLike)):
            raise TypeError(
                f"config_defination must be the path of a .cfg file, got {config_defination!r} "
                f"({type(config_defination).__name__})"
            )
        generate_config(model=model, output=config_file, cfg=config_defination)
        return
    if quant_layers is None:
        raise ValueError("give quant_layers={'kv_cache_quant_layers': [names]} or config_defination='quant.cfg'")
    generate_config(model=model, output=config_file, quant_layers=_layers_from_mapping(quant_layers))


def _layers_from_mapping(quant_layers: Any) -> list[str]:
    names = only_key(quant_layers, QUANT_LAYERS_KEY, "quant_layers", container="a dict")
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise TypeError(f"quant_layers[{QUANT_LAYERS_KEY!r}] must be a list of layer names, got {names!r}")
    return list(names)


# Observers attached by create_quant_cali_model, per model, without touching the model.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, ActiveTap] = weakref.WeakKeyDictionary()


def create_quant_cali_model(
    config_file: str | os.PathLike[str],
    record_file: str | os.PathLike[str],
    model: nn.Module,
    tap: Tap | str = Tap.PROJ,
) -> nn.Module:
    """Attach observers to `model` for the layers of a JSON config; return the model.

    Running batches through the returned model calibrates it: each layer's factors are
    merged into `record_file` when it completes `batch_num` batches (an overwrite of
    different old factors is reported as a `RecordOverwriteWarning`); later calls pass
    through untouched. What the model computes does not change. `tap` "proj" (the
    default, AMCT's semantics) observes the Linear outputs; "cache" what the KV cache
    stores (keys after RoPE/normalization; the model must run with its cache enabled);
    "auto" picks "cache" for transformers models that write one. Calling this again on the same
    model replaces the previous observers; `remove_quant_cali_hooks(model)` removes them.

    Raises:
        ConfigError: the config is malformed or does not match the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = read_config(config_file, model)
    remove_quant_cali_hooks(model)
    record = os.fspath(record_file)

    def on_complete(name: str, observer: Observer) -> None:
        write_layer(record, name, observer.compute())

    _ATTACHED[model] = attach_observers(model, plan, tap=Tap(tap), on_complete=on_complete)
    return model


def get_quant_cali_hooks(model: nn.Module) -> ActiveTap | None:
    """The observers `create_quant_cali_model` attached to `model`, if any."""
    return _ATTACHED.get(model)


def remove_quant_cali_hooks(model: nn.Module) -> bool:
    """Remove the observers `create_quant_cali_model` attached; False when there were none."""
    active = _ATTACHED.pop(model, None)
    if active is None:
        return False
    active.detach()
    return True
