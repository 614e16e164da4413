"""Export to vllm-ascend's INT8 ("C8") KV cache, in the layout msModelSlim writes.

The output directory holds:

* the model directory's non-weight files (config, tokenizer, generation config), copied;
* `quant_model_weights.safetensors` (past `max_shard_bytes`: `quant_model_weights-0000i-of-0000n.safetensors`
  and `quant_model_weights.safetensors.index.json`): every weight tensor, unchanged and
  under its own name, plus for each K/V layer `L` of the record `L.kv_cache_scale`
  (float32) and `L.kv_cache_offset` (int32), shaped `[C]`: C = kv_heads × head_dim,
  head-major (the `k_proj`/`v_proj` output order) per channel, `[1]` per tensor;
* `quant_model_description.json`: `model_quant_type` "FLOAT", `kv_cache_type` and
  `kv_quant_type` "C8" (vllm-ascend versions read one or the other), every weight
  "FLOAT", every scale/offset "C8".

Refused before anything is written: a K layer without its V (or the reverse), a record
layer that is not a `k_proj`/`v_proj` with a weight in the model directory, a channel
count that is neither 1 nor the layer's output features, non-zero offsets unless
`allow_offset` (the C8 path of vllm-ascend dequantizes with the scale only), a model that
is already quantized, and a non-empty output directory unless `force`.

Decisions beyond that: the scale/offset tensors follow their layer's weight in the files
and in the description; when `config.json` ties the word embeddings and `lm_head.weight`
is not stored, the description still lists it as "FLOAT" (vllm-ascend looks up every
Linear's `.weight`, the tied head included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcal.errors import ExportError
from kvcal.export.files import (
    ModelDir,
    check_output_dir,
    copy_files,
    load_tensors,
    plan_shards,
    read_model_dir,
    staged_directory,
    write_safetensors,
    write_text,
)
from kvcal.messages import did_you_mean
from kvcal.record.store import read_record

__all__ = [
    "FORMAT",
    "DEFAULT_MAX_SHARD_BYTES",
    "DESCRIPTION_FILE",
    "WEIGHTS_FILE",
    "INDEX_FILE",
    "KvLayerExport",
    "ExportResult",
    "export_vllm_ascend",
]

FORMAT = "vllm-ascend"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_FILE = "quant_model_weights.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
_KV_CHILDREN = ("k_proj", "v_proj")
_SCALE, _OFFSET = "kv_cache_scale", "kv_cache_offset"
_FLOAT, _C8 = "FLOAT", "C8"


@dataclass(frozen=True, eq=False)  # arrays: compare them with numpy, not ==
class KvLayerExport:
    """One K/V layer's exported factors: `scale` float32 [C], `offset` int32 [C] (C = 1 per tensor)."""

    layer: str
    scale: np.ndarray
    offset: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.size)


@dataclass(frozen=True)
class ExportResult:
    """What `export_vllm_ascend` wrote.

    Attributes:
        output: the output directory, as given.
        layers: the K/V layers exported, in record order.
        weight_files: the safetensors files written, in order.
        index_file: the shard index, or None when there is one weight file.
        weight_tensors: how many of the model's tensors were re-saved (unchanged).
        total_bytes: the tensor bytes in the weight files (the index's `total_size`).
        copied: the model directory's files copied as they are.
        skipped: entries of the model directory not copied (subdirectories, hidden files).
        described_only: names in the description with no tensor (a tied `lm_head.weight`).
        uncovered: attention modules of the model whose k_proj/v_proj have no factors.
        replaced: whether a non-empty output directory was replaced (`force`).
    """

    output: str
    layers: tuple[KvLayerExport, ...]
    weight_files: tuple[str, ...]
    index_file: str | None
    weight_tensors: int
    total_bytes: int
    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    described_only: tuple[str, ...]
    uncovered: tuple[str, ...]
    replaced: bool
    format: str = FORMAT


# ---------------------------------------------------------------- the record


def _checked_layer(key: str, scale: list[float], offset: list[int], source: str) -> KvLayerExport:
    scales = np.asarray(scale, dtype=np.float32)
    offsets = np.asarray(offset, dtype=np.int32)
    if scales.size == 0 or scales.size != offsets.size:
        raise ExportError(
            f"record {source}: layer {key!r} has {scales.size} scale(s) and {offsets.size} offset(s); "
            "a KV-cache entry needs one of each per channel"
        )
    bad = ~(np.isfinite(scales) & (scales > 0))
    if bad.any():
        raise ExportError(
            f"record {source}: layer {key!r} has scale {float(scales[bad][0])!r} at channel "
            f"{int(np.flatnonzero(bad)[0])}; scales must be finite and positive"
        )
    return KvLayerExport(key, scales, offsets)


def _record_layers(record: str | os.PathLike[str]) -> dict[str, KvLayerExport]:
    """Every KV-cache entry of the record, layer → factors (a repeated key: its last entry, as readers see it)."""
    source = os.fspath(record)
    entries = {
        entry.key: entry.kv_cache_value for entry in read_record(record).record if entry.HasField("kv_cache_value")
    }
    if not entries:
        raise ExportError(
            f"record {source} has no KV-cache entries (kv_cache_value); calibrate the model's "
            "k_proj/v_proj layers into it first"
        )
    return {key: _checked_layer(key, list(kv.scale), list(kv.offset), source) for key, kv in entries.items()}


# ---------------------------------------------------------------- checks against the model


def _check_float_model(model: ModelDir) -> None:
    """The weights must be the float model's: the description marks every one "FLOAT"."""
    if (model.path / DESCRIPTION_FILE).exists():
        raise ExportError(
            f"model directory {model.path} already has a {DESCRIPTION_FILE} (a quantized export); "
            "export from the original float model directory"
        )
    if "quantization_config" in model.config:
        raise ExportError(
            f"model directory {model.path} holds a quantized model (config.json has quantization_config); "
            "export from the original float model directory"
        )


def _check_layer_in_model(layer: KvLayerExport, model: ModelDir, source: str) -> None:
    key = layer.layer
    if key.rpartition(".")[2] not in _KV_CHILDREN:
        raise ExportError(
            f"record {source}: layer {key!r} is not a k_proj or v_proj; vllm-ascend's C8 cache takes "
            "factors for the k_proj and v_proj of attention layers only (remove the entry, or export "
            "from a record of those layers)"
        )
    weight = f"{key}.weight"
    info = model.tensors.get(weight)
    if info is None:
        kv_layers = [n[: -len(".weight")] for n in model.tensors if n.endswith(("k_proj.weight", "v_proj.weight"))]
        raise ExportError(
            f"record {source}: layer {key!r} is not a layer of the model in {model.path} (no tensor "
            f"{weight!r} in its weight files); the record may come from another model{did_you_mean(key, kv_layers)}"
        )
    rows = info.shape[0] if info.shape else 1
    if layer.channels not in (1, rows):
        raise ExportError(
            f"record {source}: layer {key!r} has {layer.channels} per-channel factors but {weight} has "
            f"{rows} output channels (kv_heads × head_dim); the record was calibrated on another model"
        )
    for suffix in (_SCALE, _OFFSET):
        if f"{key}.{suffix}" in model.tensors:
            raise ExportError(
                f"model directory {model.path} already has a tensor {key}.{suffix}; export from the "
                "original float model directory"
            )


def _check_pairs(layers: Mapping[str, KvLayerExport], source: str) -> None:
    for key in layers:
        parent, _, child = key.rpartition(".")
        other = f"{parent}.{'v_proj' if child == 'k_proj' else 'k_proj'}"
        if other not in layers:
            raise ExportError(
                f"record {source}: layer {key!r} has KV-cache factors but {other!r} has none; vllm-ascend's "
                "C8 cache quantizes the keys and values of a layer together: calibrate both, e.g. "
                f"--quant-layers '{parent}.[kv]_proj'"
            )


def _check_offsets(layers: Mapping[str, KvLayerExport], source: str, *, allow_offset: bool) -> None:
    asymmetric = [key for key, layer in layers.items() if layer.offset.any()]
    if asymmetric and not allow_offset:
        which = f"layer {asymmetric[0]!r} has"
        if len(asymmetric) > 1:
            which = f"layers {asymmetric[0]!r} and {len(asymmetric) - 1} more have"
        raise ExportError(
            f"record {source}: {which} non-zero offsets (asymmetric factors); "
            "vllm-ascend's C8 KV cache dequantizes with the scale only, so these factors would be silently "
            "wrong there. Calibrate with activation_offset: false (symmetric), or pass --allow-offset / "
            "allow_offset=True if your engine applies kv_cache_offset"
        )


def _check_model(layers: Mapping[str, KvLayerExport], model: ModelDir, source: str, *, allow_offset: bool) -> None:
    _check_float_model(model)
    for layer in layers.values():
        _check_layer_in_model(layer, model, source)
    _check_pairs(layers, source)
    _check_offsets(layers, source, allow_offset=allow_offset)


# ---------------------------------------------------------------- what is written


def _output_sizes(model: ModelDir, layers: Mapping[str, KvLayerExport]) -> dict[str, int]:
    """Every output tensor's name → bytes, in file order: each layer's scale/offset after its weight."""
    sizes: dict[str, int] = {}
    for name, info in model.tensors.items():
        sizes[name] = info.nbytes
        layer = layers.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if layer is not None:
            sizes[f"{layer.layer}.{_SCALE}"] = layer.scale.nbytes
            sizes[f"{layer.layer}.{_OFFSET}"] = layer.offset.nbytes
    return sizes


def _kv_tensors(layers: Mapping[str, KvLayerExport]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers.values():
        tensors[f"{layer.layer}.{_SCALE}"] = torch.from_numpy(layer.scale.copy())
        tensors[f"{layer.layer}.{_OFFSET}"] = torch.from_numpy(layer.offset.copy())
    return tensors


def _write_weights(
    staged: Path, model: ModelDir, sizes: Mapping[str, int], kv: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> tuple[list[str], str | None]:
    """Write the weight file(s) and, when sharded, the index; returns (file names, index name or None)."""
    shards = plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    stem = WEIGHTS_FILE[: -len(".safetensors")]
    files = [WEIGHTS_FILE] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for file, names in zip(files, shards):
        tensors = load_tensors(model, [name for name in names if name not in kv])
        tensors.update({name: kv[name] for name in names if name in kv})
        write_safetensors(staged / file, {name: tensors[name] for name in names})
    if n == 1:
        return files, None
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    write_text(staged / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return files, INDEX_FILE


def _tied_names(model: ModelDir) -> tuple[str, ...]:
    tied = model.config.get("tie_word_embeddings") is True
    return ("lm_head.weight",) if tied and "lm_head.weight" not in model.tensors else ()


def _description(
    sizes: Mapping[str, int], kv: Mapping[str, torch.Tensor], described_only: tuple[str, ...]
) -> dict[str, str]:
    description = {"model_quant_type": _FLOAT, "kv_cache_type": _C8, "kv_quant_type": _C8}
    description.update({name: _C8 if name in kv else _FLOAT for name in sizes})
    description.update({name: _FLOAT for name in described_only})
    return description


def _uncovered(model: ModelDir, layers: Mapping[str, KvLayerExport]) -> tuple[str, ...]:
    suffix = ".k_proj.weight"
    parents = [name[: -len(suffix)] for name in model.tensors if name.endswith(suffix)]
    return tuple(p for p in parents if f"{p}.k_proj" not in layers)


def export_vllm_ascend(
    *,
    record: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    allow_offset: bool = False,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Write a directory vllm-ascend (`--quantization ascend`) serves with its INT8 "C8" KV cache.

    Args:
        record: the record file holding the K/V layers' factors (`kv_cache_value`).
        model_dir: the Hugging Face model directory the record was calibrated on.
        output: the directory to create; written beside it first and renamed into place.
        allow_offset: export non-zero offsets (for an engine that applies `kv_cache_offset`).
        force: replace a non-empty `output`, once the new export is complete.
        max_shard_bytes: past this many tensor bytes, the weights are sharded with an index.

    Raises:
        ExportError: see the module docstring; the message names the layer or file and what to do.
        RecordError: the record is missing or does not parse.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    source = os.fspath(record)
    target = check_output_dir(output, force=force, inputs=[Path(model_dir), Path(record)])
    layers = _record_layers(record)
    model = read_model_dir(model_dir)
    _check_model(layers, model, source, allow_offset=allow_offset)
    sizes = _output_sizes(model, layers)
    kv = _kv_tensors(layers)
    described_only = _tied_names(model)
    replaced: list[bool] = []
    try:
        with staged_directory(target, replaced, force=force) as staged:
            copy_files(model.files, staged)
            files, index = _write_weights(staged, model, sizes, kv, max_shard_bytes)
            write_text(staged / DESCRIPTION_FILE, json.dumps(_description(sizes, kv, described_only), indent=2) + "\n")
    except OSError as exc:
        raise ExportError(f"cannot write {os.fspath(output)}: {exc}; nothing was written") from exc
    return ExportResult(
        output=os.fspath(output),
        layers=tuple(layers.values()),
        weight_files=tuple(files),
        index_file=index,
        weight_tensors=len(model.tensors),
        total_bytes=sum(sizes.values()),
        copied=tuple(f.name for f in model.files),
        skipped=model.skipped,
        described_only=described_only,
        uncovered=_uncovered(model, layers),
        replaced=replaced[0],
    )
