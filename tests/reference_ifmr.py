"""Naive IFMR, written straight from ALGORITHMS.md "IFMR": one channel, one candidate at a time.

Deliberately slow and obvious: it is the oracle of the differential tests and the
baseline of scripts/bench.py. It depends on torch only.
"""

from __future__ import annotations

import torch

__all__ = ["ifmr_reference"]

EPS = 1.192092896e-7  # FLT_EPSILON
NUM_BITS = 8


def _channel_data(batches: list[torch.Tensor], granularity: int) -> list[torch.Tensor]:
    """Each channel's values, all batches concatenated in arrival order, as float32."""
    if granularity == 0:
        return [torch.cat([b.to(torch.float32).reshape(-1) for b in batches])]
    channels = batches[0].shape[-1]
    flat = [b.to(torch.float32).reshape(-1, channels) for b in batches]
    return [torch.cat([f[:, c] for f in flat]) for c in range(channels)]


def _k(percentile: float, n: int) -> int:
    if 1 - percentile < EPS:
        return 1
    return n - int(percentile * n)


def _one_channel(
    x: torch.Tensor,
    *,
    asymmetric: bool,
    max_percentile: float,
    min_percentile: float,
    search_range: tuple[float, float],
    search_step: float,
) -> tuple[float, int]:
    n = x.numel()
    ordered = torch.sort(x).values
    max_init = ordered[n - _k(max_percentile, n)]  # k-th largest
    min_init = ordered[_k(min_percentile, n) - 1]  # k-th smallest
    max_init = torch.clamp(max_init, min=0.0)
    min_init = torch.clamp(min_init, max=0.0)

    # The parameters are Python floats (float64), as given: the defaults give 61 candidates.
    start, end, step = float(search_range[0]), float(search_range[1]), float(search_step)
    ratios = torch.arange(start, end, step, dtype=torch.float32)
    losses: list[float] = []
    scales: list[torch.Tensor] = []
    for i in range(ratios.numel()):
        if asymmetric:
            clip = ratios[i] * max_init
            scale = (clip - min_init) / float(2**NUM_BITS - 1)
            lo, hi = min_init, clip
        else:
            neg = bool(torch.abs(max_init) < torch.abs(min_init))
            magnitude = torch.maximum(torch.abs(max_init), torch.abs(min_init))
            clip = ratios[i] * magnitude
            scale = clip / float(2 ** (NUM_BITS - 1) if neg else 2 ** (NUM_BITS - 1) - 1)
            lo, hi = -clip, clip
        if bool(scale < EPS):
            scale = torch.tensor(1.0, dtype=torch.float32)
        error = torch.round(torch.clamp(x, lo, hi) / scale) * scale - x
        # float32 per-element errors; the mean itself in float64 so that only genuine ties tie.
        losses.append(float(torch.mean((error * error).to(torch.float64))))
        scales.append(scale)

    best = losses.index(min(losses))  # first index on ties
    scale = scales[best]
    offset = 0
    if asymmetric:
        offset = int(-torch.round(min_init / scale) - 2 ** (NUM_BITS - 1))
    return float(scale), offset


def ifmr_reference(
    batches: list[torch.Tensor],
    *,
    granularity: int,
    asymmetric: bool,
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_range: tuple[float, float] = (0.7, 1.3),
    search_step: float = 0.01,
) -> tuple[list[float], list[int]]:
    """IFMR scales and offsets of `batches` (per-tensor: one of each; per-channel: one per last-dim index)."""
    scales: list[float] = []
    offsets: list[int] = []
    for x in _channel_data(batches, granularity):
        scale, offset = _one_channel(
            x,
            asymmetric=asymmetric,
            max_percentile=max_percentile,
            min_percentile=min_percentile,
            search_range=search_range,
            search_step=search_step,
        )
        scales.append(scale)
        offsets.append(offset)
    return scales, offsets

