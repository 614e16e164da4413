"""A small Llama-style decoder for the demo and the tests: `kvcal --model scripts/demo_model.py:build`.

Modules are named like a Hugging Face causal LM (`model.layers.{i}.self_attn.k_proj`, ...)
so the sample configs read like real ones. Attention uses grouped KV heads
(`k_proj`/`v_proj` output `num_kv_heads * head_dim`), rotary position embeddings and a
causal mask. Weights are random but fully determined by `seed`; building the model
leaves the global torch RNG untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["build", "DemoForCausalLM"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnt per-feature gain."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotary(x: Tensor) -> Tensor:
    """Rotary position embedding of x [B, heads, T, head_dim]."""
    head_dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=x.device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads; k_proj/v_proj outputs are what a KV cache holds."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotary(q), _rotary(k)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP with residual connections."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads)
        self.post_attention_layernorm = RMSNorm(hidden_size)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Token embeddings, the decoder layers and the final norm."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, **layer_args: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(hidden_size, **layer_args) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class DemoForCausalLM(nn.Module):
    """forward(input_ids LongTensor [B, T]) -> logits float32 [B, T, vocab_size]."""

    def __init__(
        self, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int, vocab_size: int
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.model = DecoderModel(
            vocab_size,
            hidden_size,
            num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=2 * hidden_size,
        )
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64/int32 tensor [batch, tokens], got {input_ids!r:.80}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}")
        return self.lm_head(self.model(input_ids))


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def build(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    seed: int = 0,
) -> DemoForCausalLM:
    """The demo decoder with deterministic random weights (the same `seed` gives the same model)."""
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("vocab_size", vocab_size),
    ):
        _check_positive_int(name, value)
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            "hidden_size must be num_heads times an even head_dim, "
            f"got hidden_size {hidden_size}, num_heads {num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads} and {num_kv_heads}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    # Built on the meta device then filled from our own generator: no default init, no global RNG use.
    with torch.device("meta"):
        model = DemoForCausalLM(num_layers, hidden_size, num_heads, num_kv_heads, vocab_size)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(model.get_submodule(name.rpartition(".")[0]), RMSNorm):
                param.fill_(1.0)
            elif param.dim() == 2 and "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=generator)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)
                if name.endswith(("k_proj.weight", "v_proj.weight")):
                    # Real K/V projections have a few loud channels; per-channel calibration shows it.
                    gains = torch.exp(torch.randn(param.shape[0], 1, generator=generator) * 0.75)
                    param.mul_(gains)
    return model.eval()


if __name__ == "__main__":  # pragma: no cover - a quick look at the layer names
    demo = build()
    for module_name, module in demo.named_modules():
        if isinstance(module, nn.Linear):
            print(f"{module_name:40s} {module.in_features:4d} -> {module.out_features}")
