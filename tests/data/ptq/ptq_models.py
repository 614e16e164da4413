"""Tiny models for the PTQ tests: `--model tests/data/ptq/ptq_models.py:build`.

`PtqNet` has one quantizable layer of every kind — `conv` (Conv2d), `deconv`
(ConvTranspose2d), `pool` (AvgPool2d), `conv3d` (Conv3d), `layer2` and `layer10`
(Linear; `sorted()` puts layer10 first) — and one module for every exclusion of
PTQ.md §2: `reused` (runs twice), `unused` (never runs), `shared_a`/`shared_b` (one weight
tensor), `reflect` (padding_mode reflect), `dilated` (Conv3d dilation[0] 2), `unbatched`
(a 3-D input) and `sub` (a subclass of nn.Linear). `counter` changes a buffer in every
forward pass. Input: a float tensor [B, 3, 4, 4].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EXCLUDED", "QUANTIZABLE", "Counter", "PtqNet", "SubLinear", "build", "sample"]

QUANTIZABLE = {
    "conv": "Conv2d",
    "deconv": "ConvTranspose2d",
    "pool": "AvgPool2d",
    "conv3d": "Conv3d",
    "layer2": "Linear",
    "layer10": "Linear",
}
EXCLUDED = ("reused", "unused", "shared_a", "shared_b", "reflect", "dilated", "unbatched", "sub")


class SubLinear(nn.Linear):
    """A subclass of nn.Linear: not quantizable (only the exact classes are)."""


class Counter(nn.Module):
    """Counts its calls in a buffer: a forward pass that changes the model's state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


class PtqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.deconv = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.layer2 = nn.Linear(64, 8)
        self.layer10 = nn.Linear(8, 4)
        self.reused = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.shared_a = nn.Linear(4, 4)
        self.shared_b = nn.Linear(4, 4)
        self.shared_b.weight = self.shared_a.weight
        self.reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.dilated = nn.Conv3d(1, 1, 3, padding=(2, 1, 1), dilation=(2, 1, 1))
        self.unbatched = nn.Conv2d(3, 3, 1)
        self.sub = SubLinear(4, 4)
        self.counter = Counter()

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(self.deconv(self.bn(self.conv(self.counter(x)))))  # [B, 4, 4, 4]
        h = self.layer10(self.layer2(y.flatten(1)))
        h = self.reused(self.reused(h))
        h = h + self.shared_a(h) + self.shared_b(h) + self.sub(h)
        volume = x[:, :1].unsqueeze(1)  # [B, 1, 1, 4, 4]
        extra = self.conv3d(volume).mean() + self.dilated(volume).mean()
        extra = extra + self.reflect(x).mean() + self.unbatched(x[0]).mean()
        return h + extra


def build(seed: int = 0) -> PtqNet:
    """A PtqNet with weights fixed by `seed`, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PtqNet().eval()


def sample(batch: int = 2, seed: int = 0) -> Tensor:
    """A sample input [batch, 3, 4, 4]."""
    return torch.randn((batch, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
