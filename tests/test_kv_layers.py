"""linear_layers roles and structural fused query/key/value detection (kvcal.kv.layers)."""

from __future__ import annotations

import pytest
from models import K_PROJ, V_PROJ, tiny_decoder
from torch import nn

from kvcal.errors import ConfigError
from kvcal.kv.layers import LinearInfo, fused_qkv_reason, linear_layers

FUSED_WORDS = "queries, keys and values"


class FusedAttention(nn.Module):
    """An attention without head counts: only the 3*hidden width identifies the fused layer."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)


class BertStyleSelfAttention(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))


class Block(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.attention = FusedAttention(hidden)
        self.bert = BertStyleSelfAttention(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 3 * hidden), nn.ReLU(), nn.Linear(3 * hidden, hidden))


def roles(model: nn.Module) -> dict[str, str]:
    return {info.name: info.role for info in linear_layers(model)}


def test_tiny_decoder_roles() -> None:
    model = tiny_decoder()
    found = roles(model)
    assert found[K_PROJ] == "key" and found[V_PROJ] == "value"
    assert found["model.layers.0.self_attn.q_proj"] == "other"
    assert found["model.layers.0.mlp.0"] == "other"
    assert [info.name for info in linear_layers(model)] == [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear)
    ]
    first = linear_layers(model)[0]
    assert first == LinearInfo("model.layers.0.self_attn.q_proj", 8, 4, "other")
    assert all(fused_qkv_reason(model, name) is None for name in found)


def test_width_fallback_and_bert_style_names() -> None:
    model = Block()
    found = roles(model)
    assert found["attention.qkv"] == "fused_qkv"
    assert found["attention.kv"] == found["attention.out"] == "other"
    assert found["mlp.0"] == "other"  # 3*hidden too, but the parent is not an attention module
    assert (found["bert.key"], found["bert.value"], found["bert.query"]) == ("key", "value", "other")
    reason = fused_qkv_reason(model, "attention.qkv")
    assert reason is not None and FUSED_WORDS in reason and "attention.qkv" in reason


def test_fused_qkv_reason_unknown_layer() -> None:
    with pytest.raises(ConfigError, match="no.such.layer"):
        fused_qkv_reason(tiny_decoder(), "no.such.layer")


COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, bos_token_id=1, eos_token_id=2)


def build(config_name: str, model_name: str, **kwargs: object) -> nn.Module:
    """A tiny transformers model (random weights); skips the test when transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return build("LlamaConfig", "LlamaForCausalLM", **COMMON, intermediate_size=64, num_key_value_heads=2)


FUSED_MODELS = {
    "gpt_neox": (("GPTNeoXConfig", "GPTNeoXForCausalLM"), {"intermediate_size": 64}, "attention.query_key_value"),
    "falcon_multi_query": (("FalconConfig", "FalconForCausalLM"), {}, "self_attention.query_key_value"),
    "falcon_multi_head": (
        ("FalconConfig", "FalconForCausalLM"),
        {"multi_query": False},
        "self_attention.query_key_value",
    ),
    "falcon_new_arch": (
        ("FalconConfig", "FalconForCausalLM"),
        {"new_decoder_architecture": True, "num_kv_heads": 2},
        "self_attention.query_key_value",
    ),
    "phi3": (
        ("Phi3Config", "Phi3ForCausalLM"),
        {"intermediate_size": 64, "num_key_value_heads": 2, "pad_token_id": 0},
        "self_attn.qkv_proj",
    ),
}


def test_llama_roles_and_nothing_fused(llama: nn.Module) -> None:
    found = roles(llama)
    prefix = "model.layers.0."
    assert found[prefix + "self_attn.k_proj"] == "key" and found[prefix + "self_attn.v_proj"] == "value"
    others = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(found[prefix + name] == "other" for name in others)
    assert found["lm_head"] == "other"
    assert all(fused_qkv_reason(llama, name) is None for name in found)


@pytest.mark.parametrize("arch", list(FUSED_MODELS))
def test_fused_qkv_layers_are_detected(arch: str) -> None:
    (config_name, model_name), extra, suffix = FUSED_MODELS[arch]
    model = build(config_name, model_name, **COMMON, **extra)
    found = roles(model)
    fused = [name for name, role in found.items() if role == "fused_qkv"]
    assert len(fused) == 1 and fused[0].endswith(suffix)
    reason = fused_qkv_reason(model, fused[0])
    assert reason is not None and FUSED_WORDS in reason and fused[0] in reason
    assert "k_proj/v_proj" in reason and "QuantCalibrationOp" in reason
    assert all(fused_qkv_reason(model, name) is None for name in found if name != fused[0])


def test_gpt2_conv1d_is_not_listed_but_is_recognised_as_fused() -> None:
    model = build("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                  bos_token_id=1, eos_token_id=2)
    assert [info.name for info in linear_layers(model)] == ["lm_head"]  # c_attn/c_proj/c_fc are Conv1D
    reason = fused_qkv_reason(model, "transformer.h.0.attn.c_attn")
    assert reason is not None and FUSED_WORDS in reason
    assert fused_qkv_reason(model, "transformer.h.0.attn.c_proj") is None
