"""A tiny transformers Llama for the demo, built from a local config with random weights.

`kvcal --model scripts/demo_hf_model.py:build` loads it like any model; nothing is
downloaded. `python scripts/demo_hf_model.py DIR` writes padded token-id batches
(`input_ids` + `attention_mask`, one `.pt` file each) for it; with `--save MODEL_DIR` it
saves the model as `save_pretrained` does, with a word-level tokenizer built locally, and
with `--text FILE.jsonl` it writes calibration text that this tokenizer reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

__all__ = ["build", "write_batches", "save_model", "write_text"]

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


WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # ids 3 .. VOCAB-2; <pad> 0, <s> 1, </s> 2, <unk> last


def save_model(directory: Path) -> None:
    """The model (`save_pretrained`) and a word-level tokenizer over WORDS, in one directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, "<unk>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    build().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_text(path: Path, samples: int = 8) -> None:
    """`{"text": ...}` lines of 20 to 60 words, deterministic."""
    gen = torch.Generator().manual_seed(2)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(samples):
            length = int(torch.randint(20, 61, (1,), generator=gen))
            ids = torch.randint(0, len(WORDS), (length,), generator=gen).tolist()
            handle.write('{"text": "' + " ".join(WORDS[i] for i in ids) + '"}\n')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, nargs="?", help="write token-id batches here")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--save", type=Path, default=None, help="save the model and its tokenizer here")
    parser.add_argument("--text", type=Path, default=None, help="write calibration text (.jsonl) here")
    args = parser.parse_args()
    if args.directory is not None:
        write_batches(args.directory, args.batches)
    if args.save is not None:
        save_model(args.save)
    if args.text is not None:
        write_text(args.text)
