"""Write a few deterministic token-id batches for the demo model, one `.pt` file each.

Usage: python scripts/make_demo_data.py OUT_DIR [--batches 4] [--batch-size 2] [--seq-len 32]
                                                [--vocab-size 128] [--seed 0]

Each file holds one int64 tensor [batch_size, seq_len] of token ids, which
`kvcal calibrate` passes as `model(input_ids)`. The same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def write_batches(
    out_dir: Path, *, batches: int = 4, batch_size: int = 2, seq_len: int = 32, vocab_size: int = 128, seed: int = 0
) -> list[Path]:
    """Write `batches` files `batch_000.pt`, ... into `out_dir` (created); return their paths."""
    sizes = {"batches": batches, "batch_size": batch_size, "seq_len": seq_len, "vocab_size": vocab_size}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(batches):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator, dtype=torch.int64)
        path = out_dir / f"batch_{index:03d}.pt"
        torch.save(ids, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_batches(
            args.out_dir,
            batches=args.batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    shape = f"{args.batch_size}x{args.seq_len}"
    print(f"wrote {len(paths)} batches of {shape} token ids to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
