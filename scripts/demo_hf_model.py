"""A tiny transformers Llama for the demo, built from a local config with random weights.

`kvcal --model scripts/demo_hf_model.py:build` loads it like any model; nothing is
downloaded. `python scripts/demo_hf_model.py DIR` writes padded token-id batches
(`input_ids` + `attention_mask`, one `.pt` file each) for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

__all__ = ["build", "write_batches"]

VOCAB = 256


def build(seed: int = 0, layers: int = 2) -> nn.Module:
    """LlamaForCausalLM: hidden 128, 8 heads (4 KV heads of 16), RoPE; weights fixed by `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def write_batches(directory: Path, batches: int = 4, batch_size: int = 4, seq_len: int = 64) -> None:
    """Random token ids; each batch's last row is left-padded to half its length (mask 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(batches):
        ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, : seq_len // 2] = 0
        ids[mask == 0] = 0
        torch.save({"input_ids": ids, "attention_mask": mask}, directory / f"batch_{i:03d}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    write_batches(args.directory, args.batches)
