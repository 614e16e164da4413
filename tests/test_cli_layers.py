"""Layer selection: `kvcal layers`, globs in --quant-layers and the .cfg, gen-config's defaults
options, and the refusal of fused query/key/value layers in gen-config and calibrate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from kvcal.cli import main

pytest.importorskip("transformers")

from hf_models import KV_NAMES  # noqa: E402

MODEL_SOURCE = """
import torch
import transformers
from hf_models import build as _build


def build(arch="llama"):
    return _build(arch)


def neox():
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                                        eos_token_id=2)
    return transformers.GPTNeoXForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()
"""


@pytest.fixture
def entry(tmp_path: Path) -> str:
    source = tmp_path / "models_here.py"
    source.write_text(MODEL_SOURCE, encoding="utf-8")
    return str(source)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_layers_lists_linear_layers_with_their_roles(entry: str) -> None:
    result = run("layers", "--model", f"{entry}:build", "--json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)}
    assert layers["model.layers.0.self_attn.k_proj"] == {
        "name": "model.layers.0.self_attn.k_proj", "in_features": 64, "out_features": 32, "role": "key",
    }
    assert layers["model.layers.1.self_attn.v_proj"]["role"] == "value"
    assert layers["model.layers.0.self_attn.q_proj"]["role"] == "other"
    table = run("layers", "--model", f"{entry}:build")
    assert table.exit_code == 0 and "K projection" in table.stderr and "look like K/V projections" in table.stderr


def test_layers_marks_fused_qkv(entry: str) -> None:
    result = run("layers", "--model", f"{entry}:neox", "--json")
    assert result.exit_code == 0, result.output
    roles = {layer["name"]: layer["role"] for layer in json.loads(result.stdout)}
    assert roles["gpt_neox.layers.0.attention.query_key_value"] == "fused_qkv"


def test_glob_quant_layers_with_defaults_options(entry: str, tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = run("gen-config", "--model", f"{entry}:build", "--quant-layers", "model.layers.*.self_attn.[kv]_proj",
                 "--algo", "hfmg", "--granularity", "per_channel", "--batch-num", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["batch_num"] == 3
    assert list(document)[2:] == KV_NAMES
    assert document[KV_NAMES[0]] == {
        "kv_data_quant_config": {"act_algo": "hfmg", "num_of_bins": 4096, "quant_granularity": 1}
    }


def test_glob_matching_nothing_is_an_error(entry: str, tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = run("gen-config", "--model", f"{entry}:build", "--quant-layers", "model.layers.*.attn.k_proj",
                 "-o", str(out))
    assert result.exit_code == 1
    assert "the pattern 'model.layers.*.attn.k_proj' matches no Linear layer" in result.stderr
    assert not out.exists()


def test_glob_in_cfg_quant_layers_and_overrides(entry: str, tmp_path: Path) -> None:
    cfg = tmp_path / "q.cfg"
    cfg.write_text(
        "kv_cache_quant_config {\n  quant_layers: 'model.layers.*.self_attn.k_proj'\n}\n"
        "override_layers_configs {\n  layer_name: 'model.layers.*.self_attn.v_proj'\n"
        "  kv_data_quant_config { hfmg_quantize { quant_granularity: per_channel } }\n}\n",
        encoding="utf-8",
    )
    out = tmp_path / "config.json"
    result = run("gen-config", "--model", f"{entry}:build", "--cfg", str(cfg), "-o", str(out))
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    k_names = [n for n in KV_NAMES if n.endswith("k_proj")]
    v_names = [n for n in KV_NAMES if n.endswith("v_proj")]
    assert list(document)[2:] == k_names + v_names
    assert all(document[n]["kv_data_quant_config"]["act_algo"] == "hfmg" for n in v_names)
    cfg.write_text("kv_cache_quant_config {\n  quant_layers: 'model.*.nothing'\n}\n", encoding="utf-8")
    result = run("gen-config", "--model", f"{entry}:build", "--cfg", str(cfg), "-o", str(out))
    assert result.exit_code == 1
    assert f"{cfg}:2:3: the pattern 'model.*.nothing' matches no Linear layer" in result.stderr


def test_defaults_options_need_quant_layers(entry: str, tmp_path: Path) -> None:
    cfg = tmp_path / "q.cfg"
    cfg.write_text("kv_cache_quant_config { quant_layers: 'model.layers.0.self_attn.k_proj' }\n", encoding="utf-8")
    result = run("gen-config", "--model", f"{entry}:build", "--cfg", str(cfg), "--algo", "hfmg",
                 "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 2
    assert "go with --quant-layers" in result.stderr


def test_fused_qkv_is_refused_by_gen_config(entry: str, tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = run("gen-config", "--model", f"{entry}:neox", "--quant-layers",
                 "gpt_neox.layers.0.attention.query_key_value", "-o", str(out))
    assert result.exit_code == 1
    assert "gpt_neox.layers.0.attention.query_key_value is a fused query/key/value projection" in result.stderr
    assert "mixes queries, keys and values" in result.stderr
    assert not out.exists()


def test_fused_qkv_is_refused_by_calibrate(entry: str, tmp_path: Path) -> None:
    name = "gpt_neox.layers.0.attention.query_key_value"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"batch_num": 1, "activation_offset": True,
                                  name: {"kv_data_quant_config": {"act_algo": "ifmr", "quant_granularity": 0}}}))
    data = tmp_path / "data"
    data.mkdir()
    torch.save({"input_ids": torch.randint(3, 128, (1, 8))}, data / "a.pt")
    record = tmp_path / "record.txt"
    result = run("calibrate", "--model", f"{entry}:neox", "--config", str(config), "--dataset", str(data),
                 "--record", str(record), "--device", "cpu")
    assert result.exit_code == 1
    assert "mixes queries, keys and values" in result.stderr
    assert not record.exists()


def test_gpt2_conv1d_keeps_its_clear_error(entry: str, tmp_path: Path) -> None:
    result = run("gen-config", "--model", f"{entry}:gpt2", "--quant-layers", "transformer.h.0.attn.c_attn",
                 "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 1
    assert "'transformer.h.0.attn.c_attn' is a Conv1D, not a torch.nn.Linear" in result.stderr
