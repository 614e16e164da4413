"""Tiny test models whose module names match the FORMATS.md examples.

`tiny_decoder()` has `model.layers.{i}.self_attn.{q,k,v,o}_proj` (nn.Linear), an MLP,
LayerNorms and an embedding (non-Linear modules, for the "not a Linear" errors).
Importable by every test (tests/ is on sys.path): `from models import tiny_decoder`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyAttention", "TinyLayer", "TinyDecoder", "tiny_decoder", "K_PROJ", "V_PROJ"]

K_PROJ = "model.layers.0.self_attn.k_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"


class TinyAttention(nn.Module):
    """q/k/v/o projections; k and v output `kv_dim` channels."""

    def __init__(self, hidden: int, kv_dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, kv_dim)
        self.k_proj = nn.Linear(hidden, kv_dim)
        self.v_proj = nn.Linear(hidden, kv_dim)
        self.o_proj = nn.Linear(kv_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(weights @ v)


class TinyLayer(nn.Module):
    def __init__(self, hidden: int, kv_dim: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = TinyAttention(hidden, kv_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class _Inner(nn.Module):
    def __init__(self, num_layers: int, hidden: int, kv_dim: int, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(TinyLayer(hidden, kv_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)


class TinyDecoder(nn.Module):
    """forward(x float [B, T, hidden]) -> float [B, T, hidden]; the embedding is not used."""

    def __init__(self, num_layers: int = 2, hidden: int = 8, kv_dim: int = 4, vocab: int = 16) -> None:
        super().__init__()
        self.model = _Inner(num_layers, hidden, kv_dim, vocab)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.model.layers:
            x = layer(x)
        return self.model.norm(x)


def tiny_decoder(num_layers: int = 2, hidden: int = 8, kv_dim: int = 4, seed: int = 0) -> TinyDecoder:
    """A TinyDecoder with weights fixed by `seed`, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyDecoder(num_layers=num_layers, hidden=hidden, kv_dim=kv_dim).eval()
