"""A small CNN for the PTQ demo: `kvcal gen-config --ptq --model scripts/demo_cnn_model.py:build`.

Conv2d+BatchNorm twice, a ConvTranspose2d, an AvgPool2d and a Linear head — every kind of
layer that whole-network PTQ quantizes except Conv3d. Weights (and the BatchNorm running
statistics) are random but fully determined by `seed`; building the model leaves the
global torch RNG untouched. `python scripts/demo_cnn_model.py DIR` writes image batches
([batch, 3, 16, 16] float32, one `.pt` file each) for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["IMAGE_SIZE", "DemoCNN", "build", "write_batches"]

IMAGE_SIZE = 16


class DemoCNN(nn.Module):
    """[B, 3, 16, 16] → logits [B, num_classes]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.deconv = nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8 * (IMAGE_SIZE // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.pool(self.relu(self.deconv(x)))
        return self.head(x.flatten(1))


def build(seed: int = 0, num_classes: int = 10) -> DemoCNN:
    """The demo CNN in eval mode, weights and BatchNorm statistics fixed by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoCNN(num_classes)
        with torch.no_grad():
            for bn in (model.bn1, model.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_batches(directory: Path, batches: int = 4, batch_size: int = 2, seed: int = 0) -> list[Path]:
    """Write `batches` files `batch_000.pt`, ... of float32 images into `directory` (created)."""
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be >= 1, got {batches} and {batch_size}")
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(batches):
        images = torch.randn((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
        path = directory / f"batch_{index:03d}.pt"
        torch.save(images, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        paths = write_batches(args.directory, args.batches, args.batch_size)
    except ValueError as exc:
        parser.error(str(exc))
    size = f"{args.batch_size}x3x{IMAGE_SIZE}x{IMAGE_SIZE}"
    print(f"wrote {len(paths)} batches of {size} images to {args.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
