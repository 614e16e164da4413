"""A real Hugging Face LlamaForCausalLM (tiny, random weights, built from a local config).

Every layer's k_proj and v_proj is calibrated from token-id batches through the library
and through the CLI; the record must hold every layer with num_key_value_heads x head_dim
channels per-channel, and the factors must reconstruct the observed K/V well.
"""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from reference_capture import capture_outputs

from kvcal.calibration.runner import run_calibration
from kvcal.cli import main
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.params import HfmgParams, IfmrParams
from kvcal.quant import QParams, fake_quant, sqnr_db, to_channels
from kvcal.record.store import read_record

LAYERS = 2
HEADS = 4
KV_HEADS = 2
HIDDEN = 64
VOCAB = 128
HEAD_DIM = HIDDEN // HEADS
KV_CHANNELS = KV_HEADS * HEAD_DIM
BATCH_NUM = 2

MODEL_SOURCE = f'''
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size={VOCAB}, hidden_size={HIDDEN}, intermediate_size={2 * HIDDEN}, num_hidden_layers={LAYERS},
        num_attention_heads={HEADS}, num_key_value_heads={KV_HEADS}, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
'''

KV_NAMES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "kv"]


def build_model(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    source = tmp_path / "tiny_llama.py"
    source.write_text(MODEL_SOURCE, encoding="utf-8")
    namespace: dict[str, object] = {}
    exec(compile(MODEL_SOURCE, str(source), "exec"), namespace)
    return namespace["build"](), source  # type: ignore[operator]


def write_batches(directory: Path, count: int) -> list[dict[str, torch.Tensor]]:
    directory.mkdir()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for i in range(count):
        ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        torch.save(batch, directory / f"{i:02d}.pt")
        batches.append(batch)
    return batches


def check_record(record: Path, observed: dict[str, list[torch.Tensor]], granularity: dict[str, int]) -> None:
    entries = {e.key: e.kv_cache_value for e in read_record(record).record if e.HasField("kv_cache_value")}
    assert sorted(entries) == sorted(KV_NAMES)
    for name in KV_NAMES:
        value = entries[name]
        expected_channels = KV_CHANNELS if granularity[name] == 1 else 1
        assert len(value.scale) == len(value.offset) == expected_channels, name
        qparams = QParams(torch.tensor(list(value.scale)), torch.tensor(list(value.offset), dtype=torch.int32))
        data = torch.cat([to_channels(x, granularity[name]) for x in observed[name]], dim=1)
        assert data.shape[0] == expected_channels
        sqnr = sqnr_db(data, fake_quant(data, qparams))
        assert sqnr > 20.0, f"{name}: SQNR {sqnr:.1f} dB"


def test_library_calibrates_every_kv_projection(tmp_path: Path) -> None:
    model, _ = build_model(tmp_path)
    batches = write_batches(tmp_path / "data", BATCH_NUM + 1)
    observed = capture_outputs(model, KV_NAMES, batches[:BATCH_NUM])
    layers = []
    for name in KV_NAMES:
        params = HfmgParams() if name.endswith("k_proj") else IfmrParams()
        layers.append(LayerPlan(name, params, granularity=1))
    plan = CalibrationPlan(batch_num=BATCH_NUM, activation_offset=True, layers=tuple(layers))
    with torch.inference_mode():
        reference_logits = model(**batches[0]).logits
    record = tmp_path / "record.txt"
    result = run_calibration(model=model, plan=plan, dataset_dir=tmp_path / "data", record_path=record, device="cpu")
    assert result.batches_used == BATCH_NUM
    assert all(layer.channels == KV_CHANNELS and layer.sqnr_db > 20.0 for layer in result.layers)
    check_record(record, observed, {name: 1 for name in KV_NAMES})
    # The hooks are gone and did not change the model.
    with torch.inference_mode():
        assert torch.equal(model(**batches[0]).logits, reference_logits)
    assert all(not module._forward_hooks for module in model.modules())


def test_cli_gen_config_and_calibrate(tmp_path: Path) -> None:
    model, source = build_model(tmp_path)
    batches = write_batches(tmp_path / "data", BATCH_NUM)
    observed = capture_outputs(model, KV_NAMES, batches)
    quant_layers = "\n".join(f"    quant_layers: '{name}'" for name in KV_NAMES)
    overrides = "\n".join(
        f"override_layers_configs {{\n    layer_name: '{name}'\n"
        "    kv_data_quant_config { ifmr_quantize { quant_granularity: per_channel } }\n}"
        for name in KV_NAMES
        if name.endswith("v_proj")
    )
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(
        f"batch_num: {BATCH_NUM}\nkv_cache_quant_config {{\n{quant_layers}\n"
        "    calibration_config { hfmg_quantize { num_of_bins: 2048 quant_granularity: per_tensor } }\n}\n"
        f"{overrides}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    entry = f"{source}:build"
    config = tmp_path / "config.json"
    result = runner.invoke(main, ["gen-config", "--model", entry, "--model-arg", "seed=0", "--cfg", str(cfg),
                                  "-o", str(config)])
    assert result.exit_code == 0, result.output
    record = tmp_path / "record.txt"
    result = runner.invoke(main, ["calibrate", "--model", entry, "--model-arg", "seed=0", "--config", str(config),
                                  "--dataset", str(tmp_path / "data"), "--record", str(record), "--device", "cpu",
                                  "--tap", "proj"])
    assert result.exit_code == 0, result.output
    assert f"{len(KV_NAMES)} new, 0 changed, 0 unchanged; written" in result.stderr
    granularity = {name: 1 if name.endswith("v_proj") else 0 for name in KV_NAMES}
    check_record(record, observed, granularity)
