"""Export to vllm-ascend: a tiny transformers Llama saved with `save_pretrained`, calibrated with the cache tap.

The exported scale/offset tensors must equal the record's values exactly (float32 / int32),
the model's tensors must be bit-identical to its state dict under their own names, and
every refusal must leave no output directory (and nothing else) behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kvcal.calibration.runner import run_calibration
from kvcal.errors import ExportError
from kvcal.export import export_vllm_ascend
from kvcal.export.files import plan_shards
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.params import HfmgParams, IfmrParams
from kvcal.quant import QParams
from kvcal.record.store import merge_kv_cache, read_record

pytest.importorskip("transformers")

from hf_models import HEAD_DIM, KV_HEADS, KV_NAMES, VOCAB, build  # noqa: E402

GRANULARITIES = {"per_channel": 1, "per_tensor": 0}
K0, V0 = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"


# ---------------------------------------------------------------- fixtures


def write_batches(directory: Path) -> Path:
    """Two padded batches of token ids (left padding in one row, right padding in another)."""
    directory.mkdir()
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[i, : 3 if i == 0 else 0] = 0
        mask[1 - i, 7:] = 0
        ids[mask == 0] = 0
        torch.save({"input_ids": ids, "attention_mask": mask}, directory / f"{i:02d}.pt")
    return directory


def calibration_plan(granularity: int, *, asymmetric: bool) -> CalibrationPlan:
    """K: HFMG, V: IFMR, both at `granularity`; symmetric unless `asymmetric`."""
    layers = [
        LayerPlan(name, HfmgParams(1024) if name.endswith("k_proj") else IfmrParams(), granularity=granularity)
        for name in KV_NAMES
    ]
    return CalibrationPlan(batch_num=2, activation_offset=asymmetric, layers=tuple(layers))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build("llama")


@pytest.fixture(scope="module")
def hf_dir(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}', encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def records(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Records calibrated with the cache tap: symmetric per-channel and per-tensor, asymmetric per-channel."""
    base = tmp_path_factory.mktemp("records")
    data = write_batches(base / "data")
    out: dict[str, Path] = {}
    for key, granularity, asymmetric in [
        ("per_channel", 1, False),
        ("per_tensor", 0, False),
        ("asymmetric", 1, True),
    ]:
        path = base / f"{key}.txt"
        plan = calibration_plan(granularity, asymmetric=asymmetric)
        result = run_calibration(model=model, plan=plan, dataset_dir=data, record_path=path, tap="cache")
        assert {layer.tap.value for layer in result.layers} == {"cache"}
        out[key] = path
    return out


def record_values(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        entry.key: (
            np.asarray(entry.kv_cache_value.scale, np.float32),
            np.asarray(entry.kv_cache_value.offset, np.int32),
        )
        for entry in read_record(path).record
        if entry.HasField("kv_cache_value")
    }


def exported(out: Path) -> dict[str, Tensor]:
    """Every tensor of an export, from its one weight file or through its index."""
    index = out / "quant_model_weights.safetensors.index.json"
    if not index.exists():
        return load_file(out / "quant_model_weights.safetensors")
    tensors: dict[str, Tensor] = {}
    for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(out / file))
    return tensors


def bits(tensor: Tensor) -> Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(tensors: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    for name, expected in state.items():
        got = tensors[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(bits(got), bits(expected)), name


def kv_names(layers: list[str]) -> list[str]:
    return [f"{layer}.{suffix}" for layer in layers for suffix in ("kv_cache_scale", "kv_cache_offset")]


def expected_description(state_names: list[str]) -> dict[str, str]:
    description = {"model_quant_type": "FLOAT", "kv_cache_type": "C8", "kv_quant_type": "C8"}
    description.update(dict.fromkeys(state_names, "FLOAT"))
    description.update(dict.fromkeys(kv_names(KV_NAMES), "C8"))
    return description


def write_record(path: Path, layers: dict[str, int]) -> Path:
    """A record with symmetric factors of the given channel counts."""
    merge_kv_cache(
        path,
        {name: QParams(torch.full((c,), 0.05), torch.zeros(c, dtype=torch.int32)) for name, c in layers.items()},
    )
    return path


# ---------------------------------------------------------------- the main path


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_export_holds_the_record_factors_and_the_unchanged_weights(
    granularity: str, model: nn.Module, hf_dir: Path, records: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "c8"
    result = export_vllm_ascend(record=records[granularity], model_dir=hf_dir, output=out)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "quant_model_description.json",
        "quant_model_weights.safetensors",
        "tokenizer_config.json",
    ]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()

    tensors = exported(out)
    state = model.state_dict()
    assert set(tensors) == set(state) | set(kv_names(KV_NAMES))
    assert_bit_identical(tensors, state)

    channels = KV_HEADS * HEAD_DIM if granularity == "per_channel" else 1
    values = record_values(records[granularity])
    assert sorted(values) == sorted(KV_NAMES)
    for layer, (scale, offset) in values.items():
        got_scale, got_offset = tensors[f"{layer}.kv_cache_scale"], tensors[f"{layer}.kv_cache_offset"]
        assert got_scale.dtype == torch.float32 and got_scale.shape == (channels,)
        assert got_offset.dtype == torch.int32 and got_offset.shape == (channels,)
        assert np.array_equal(got_scale.numpy().view(np.uint32), scale.view(np.uint32)), layer
        assert np.array_equal(got_offset.numpy(), offset) and not offset.any(), layer

    description = json.loads((out / "quant_model_description.json").read_text())
    assert description == expected_description(list(state))
    assert [layer.layer for layer in result.layers] == list(values)
    assert result.weight_files == ("quant_model_weights.safetensors",) and result.index_file is None
    assert result.weight_tensors == len(state) and not result.replaced and not result.uncovered
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_large_exports_are_sharded_with_an_index(hf_dir: Path, records: dict[str, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=whole)
    out = tmp_path / "sharded"
    result = export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=out, max_shard_bytes=40_000)

    n = len(result.weight_files)
    assert n > 2
    assert result.weight_files == tuple(f"quant_model_weights-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))
    assert not (out / "quant_model_weights.safetensors").exists()
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    single = exported(whole)
    assert set(index["weight_map"]) == set(single)
    for file in result.weight_files:
        assert {name for name, f in index["weight_map"].items() if f == file} == set(load_file(out / file))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert_bit_identical(exported(out), single)
    description = (out / "quant_model_description.json").read_bytes()
    assert description == (whole / "quant_model_description.json").read_bytes()


def test_a_sharded_model_directory_is_read_through_its_index(
    model: nn.Module, records: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "hf"
    model.save_pretrained(source, max_shard_size="50KB")
    assert (source / "model.safetensors.index.json").exists()
    out = tmp_path / "c8"
    export_vllm_ascend(record=records["per_tensor"], model_dir=source, output=out)
    assert not (out / "model.safetensors.index.json").exists()  # an old index would point at absent shards
    assert not list(out.glob("model*.safetensors"))
    assert_bit_identical(exported(out), model.state_dict())


def test_model_safetensors_is_read_alone_like_transformers_does(
    model: nn.Module, records: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "hf"
    model.save_pretrained(source)
    torch.save({"x": torch.zeros(1)}, source / "training_args.bin")
    save_file({"layers.0.attention.wk.weight": torch.zeros(2, 2)}, source / "consolidated.safetensors")
    out = tmp_path / "c8"
    result = export_vllm_ascend(record=records["per_channel"], model_dir=source, output=out)
    assert set(exported(out)) == set(model.state_dict()) | set(kv_names(KV_NAMES))
    assert "training_args.bin" not in result.copied and not (out / "consolidated.safetensors").exists()


def test_pytorch_model_bin_with_tied_weights(records: dict[str, Path], tmp_path: Path) -> None:
    tied = build("llama", tie_word_embeddings=True)
    state = tied.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    source = tmp_path / "hf"
    tied.config.save_pretrained(source)
    torch.save(state, source / "pytorch_model.bin")
    out = tmp_path / "c8"
    export_vllm_ascend(record=records["per_channel"], model_dir=source, output=out)
    tensors = exported(out)
    assert set(tensors) == set(state) | set(kv_names(KV_NAMES))
    assert_bit_identical(tensors, state)
    assert not (out / "pytorch_model.bin").exists()


def test_a_tied_head_missing_from_the_files_is_described_without_a_tensor(
    records: dict[str, Path], tmp_path: Path
) -> None:
    tied = build("llama", tie_word_embeddings=True)
    source = tmp_path / "hf"
    tied.save_pretrained(source)
    stored = set(load_file(source / "model.safetensors"))
    assert "lm_head.weight" not in stored
    out = tmp_path / "c8"
    result = export_vllm_ascend(record=records["per_channel"], model_dir=source, output=out)
    assert set(exported(out)) == stored | set(kv_names(KV_NAMES))
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["lm_head.weight"] == "FLOAT"
    assert result.described_only == ("lm_head.weight",)


def test_offsets_are_exported_only_when_allowed(hf_dir: Path, records: dict[str, Path], tmp_path: Path) -> None:
    values = record_values(records["asymmetric"])
    assert any(offset.any() for _, offset in values.values())
    out = tmp_path / "c8"
    with pytest.raises(ExportError, match="non-zero offsets") as info:
        export_vllm_ascend(record=records["asymmetric"], model_dir=hf_dir, output=out)
    assert "scale only" in str(info.value) and "activation_offset: false" in str(info.value)
    assert not out.exists() and not list(tmp_path.iterdir())

    export_vllm_ascend(record=records["asymmetric"], model_dir=hf_dir, output=out, allow_offset=True)
    tensors = exported(out)
    for layer, (scale, offset) in values.items():
        assert np.array_equal(tensors[f"{layer}.kv_cache_scale"].numpy(), scale)
        assert tensors[f"{layer}.kv_cache_offset"].dtype == torch.int32
        assert np.array_equal(tensors[f"{layer}.kv_cache_offset"].numpy(), offset)


def test_layers_without_factors_are_reported(hf_dir: Path, tmp_path: Path) -> None:
    record = write_record(tmp_path / "r.txt", {K0: 1, V0: 1})
    result = export_vllm_ascend(record=record, model_dir=hf_dir, output=tmp_path / "c8")
    assert result.uncovered == ("model.layers.1.self_attn",)
    assert set(exported(tmp_path / "c8")) >= set(kv_names([K0, V0]))


# ---------------------------------------------------------------- refusals


REFUSED_RECORDS = {
    "k_without_v": ({K0: 32, "model.layers.1.self_attn.k_proj": 1, "model.layers.1.self_attn.v_proj": 1}, "has none"),
    "v_without_k": ({V0: 32}, f"{K0!r} has none"),
    "not_k_or_v": ({K0: 1, V0: 1, "model.layers.0.self_attn.q_proj": 1}, "is not a k_proj or v_proj"),
    "not_in_model": ({"model.layers.7.self_attn.k_proj": 1, "model.layers.7.self_attn.v_proj": 1}, "not a layer"),
    "channels": ({K0: 5, V0: 32}, "has 5 per-channel factors but model.layers.0.self_attn.k_proj.weight has 32"),
}


@pytest.mark.parametrize("case", REFUSED_RECORDS)
def test_refused_records_leave_no_output(case: str, hf_dir: Path, tmp_path: Path) -> None:
    layers, message = REFUSED_RECORDS[case]
    record = write_record(tmp_path / "r.txt", layers)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(ExportError, match=message):
        export_vllm_ascend(record=record, model_dir=hf_dir, output=out_parent / "c8")
    assert not list(out_parent.iterdir())


def test_a_record_without_kv_entries_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    record.write_text('record { key: "model.layers.0.self_attn.k_proj" value { scale_d: 0.5 } }\n')
    with pytest.raises(ExportError, match="no KV-cache entries"):
        export_vllm_ascend(record=record, model_dir=hf_dir, output=tmp_path / "c8")
    assert not (tmp_path / "c8").exists()


def test_a_non_empty_output_is_replaced_only_with_force(hf_dir: Path, records: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c8"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    result = export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=out, force=True)
    assert result.replaced and not (out / "keep.txt").exists()
    assert (out / "quant_model_description.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c8"]  # no staged or moved-aside directory left


def test_an_empty_output_directory_is_used(hf_dir: Path, records: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c8"
    out.mkdir()
    result = export_vllm_ascend(record=records["per_tensor"], model_dir=hf_dir, output=out)
    assert not result.replaced and (out / "quant_model_weights.safetensors").exists()


def test_an_output_holding_an_input_is_refused_even_with_force(
    hf_dir: Path, records: dict[str, Path], tmp_path: Path
) -> None:
    before = sorted(p.name for p in hf_dir.iterdir())
    with pytest.raises(ExportError, match="would contain or replace the input"):
        export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=hf_dir, force=True)
    with pytest.raises(ExportError, match="would contain or replace the input"):
        export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=hf_dir.parent, force=True)
    assert sorted(p.name for p in hf_dir.iterdir()) == before


def test_a_failed_write_leaves_the_output_as_it_was(
    hf_dir: Path, records: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, tensors: object) -> None:
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kvcal.export.vllm_ascend.write_safetensors", disk_full)
    with pytest.raises(ExportError, match="No space left on device.*nothing was written"):
        export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=tmp_path / "c8")
    assert not list(tmp_path.iterdir())

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(ExportError):
        export_vllm_ascend(record=records["per_channel"], model_dir=hf_dir, output=old, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and [p.name for p in old.iterdir()] == ["keep.txt"]


def test_model_directories_that_cannot_be_exported(hf_dir: Path, tmp_path: Path) -> None:
    record = write_record(tmp_path / "r.txt", {K0: 1, V0: 1})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="no weights in model directory"):
        export_vllm_ascend(record=record, model_dir=empty, output=tmp_path / "a")

    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (quantized / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    with pytest.raises(ExportError, match="holds a quantized model"):
        export_vllm_ascend(record=record, model_dir=quantized, output=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plan_shards_keeps_order_and_gives_an_oversized_tensor_its_own_shard() -> None:
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3}
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [list(sizes)]
