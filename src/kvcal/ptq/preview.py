"""What a PTQ JSON config says before the model runs: enough to check early and to plan the first pass.

`read_config` validates a PTQ config fully, but it needs the layer discovery, which needs
the model and a first batch. Before those, `preview_config` reads what must be known
earlier: `version` and `batch_num` (strictly: the dataset must hold that many batches),
the enabled ADA layers (refused before any data is read: ADA calibration is not
supported yet), and, leniently (the full read checks them later), the fusion settings
and the DMQ layers that the first forward pass can already measure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvcal.errors import ConfigError
from kvcal.jsonio import load_json
from kvcal.params import check_batch_num, checked
from kvcal.ptq.config_json import VERSION
from kvcal.ptq.plan import GLOBAL_KEYS

__all__ = ["ConfigPreview", "preview_config", "refuse_ada"]


@dataclass(frozen=True)
class ConfigPreview:
    """The parts of a PTQ config needed before the model runs (see the module docstring)."""

    source: str
    batch_num: int
    do_fusion: bool
    skip_fusion_layers: tuple[str, ...]
    dmq_layers: tuple[str, ...]
    ada_layers: tuple[str, ...]


def _enabled_entries(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: entry
        for name, entry in document.items()
        if name not in GLOBAL_KEYS and isinstance(entry, dict) and entry.get("quant_enable") is True
    }


def _is_ada(entry: dict[str, Any]) -> bool:
    weight = entry.get("weight_quant_params")
    return isinstance(weight, dict) and weight.get("wts_algo") == "ada_quantize"


def preview_config(path: str | os.PathLike[str], document: Any = None) -> ConfigPreview:
    """Read the early parts of a PTQ config (`document`: the file already parsed, if it was).

    Raises:
        ConfigError: not a JSON object, a `version` other than 1, or a bad `batch_num`.
    """
    source = os.fspath(path)
    if document is None:
        document = load_json(source)
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the config must be a JSON object, got {type(document).__name__}")
    version = document.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ConfigError(f"{source}: key 'version' must be 1 in a PTQ config, got {version!r}")
    batch_num = checked(source, check_batch_num, document.get("batch_num", 1))
    skip = document.get("skip_fusion_layers", [])
    enabled = _enabled_entries(document)
    return ConfigPreview(
        source=source,
        batch_num=batch_num,
        do_fusion=document.get("do_fusion", True) is not False,
        skip_fusion_layers=tuple(n for n in skip if isinstance(n, str)) if isinstance(skip, list) else (),
        dmq_layers=tuple(name for name, entry in enabled.items() if "dmq_balancer_param" in entry),
        ada_layers=tuple(name for name, entry in enabled.items() if _is_ada(entry)),
    )


def refuse_ada(preview: ConfigPreview) -> None:
    """ADA layers cannot be calibrated yet: an error naming them (the config side of ADA stays supported).

    Raises:
        ConfigError: when an enabled layer uses `ada_quantize`.
    """
    if not preview.ada_layers:
        return
    names = ", ".join(repr(name) for name in preview.ada_layers)
    noun = "layer" if len(preview.ada_layers) == 1 else "layers"
    raise ConfigError(
        f"{preview.source}: {noun} {names} use ada_quantize: ADA calibration is not supported yet; "
        "give them arq_quantize (or quant_enable false) to calibrate this config"
    )
