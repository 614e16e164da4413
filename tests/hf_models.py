"""Tiny random-weight transformers decoders built from local configs (nothing is downloaded).

Llama, Qwen2, Qwen3 (q/k norm), Mistral (sliding-window cache) and Gemma; 2 layers, GQA.
Import only after `pytest.importorskip("transformers")`.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 128, 64, 4, 2, 16, 2
BATCH, SEQ = 2, 12
COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
ARCHS: dict[str, tuple[str, str, dict[str, object]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": HEAD_DIM}),  # default head_dim is 128
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),  # sliding_window 4096: sliding cache layers
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": HEAD_DIM}),  # default head_dim is 256
}
KV_NAMES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "kv"]


def build(arch: str, **overrides: object) -> nn.Module:
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_name)(config).eval()
