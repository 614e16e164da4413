"""Naive HFMG, written straight from ALGORITHMS.md "HFMG": one channel, one candidate at a time.

Deliberately slow and obvious: it is the oracle of the differential tests and the
baseline of scripts/bench.py. It depends on torch, numpy and math only.

* Binning is `torch.histc` itself, one channel at a time.
* The fold walks the old histogram one bin at a time with numpy float32 scalars, in the
  order of operations the spec writes.
* The candidate ranges come from the cursor procedure, cursor by cursor, bin by bin.
* The L2 error of each candidate is the spec's per-source-bin formula, vectorized over
  the B source bins of that one candidate (a Python loop over bins too would make the
  tests take minutes), evaluated in float64 so that it is the ground truth the observer
  must agree with.

Choices where ALGORITHMS.md is silent (the observer makes the same ones):

* fold: `j` is capped at B - 1 like `k` (an old bin that starts exactly at the new
  maximum, e.g. an old all-equal histogram at the new `hi'`, would otherwise point past
  the last bin);
* EPS comparisons are float32 comparisons (EPS rounds to FLT_EPSILON = 2**-23).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["hfmg_reference", "hfmg_reference_states", "channel_state", "fold_into", "search_channel"]

EPS = 1.192092896e-7  # FLT_EPSILON
NUM_BITS = 8
_F32_EPS = np.float32(EPS)


def _channel_batches(batches: list[torch.Tensor], granularity: int) -> list[list[torch.Tensor]]:
    """For each channel, its float32 values batch by batch."""
    if granularity == 0:
        return [[b.to(torch.float32).reshape(-1) for b in batches]]
    channels = batches[0].shape[-1]
    flat = [b.to(torch.float32).reshape(-1, channels) for b in batches]
    return [[f[:, c].contiguous() for f in flat] for c in range(channels)]


def _binning(x: torch.Tensor, bins: int, lo: np.float32, hi: np.float32) -> list[int]:
    """What `torch.histc(x, bins, lo, hi)` gives, as Python ints."""
    if lo == hi:
        # histc widens an empty range to [lo - 1, hi + 1]: every value lands in bin B/2.
        counts = [0] * bins
        counts[bins // 2] = x.numel()
        return counts
    hist = torch.histc(x, bins=bins, min=float(lo), max=float(hi))
    return [int(v) for v in hist.tolist()]


def _fold(
    old: list[int], lo: np.float32, hi: np.float32, new: list[int], lo2: np.float32, hi2: np.float32
) -> list[int]:
    """Fold the old histogram over [lo, hi] into `new` over [lo2, hi2] (which contains it)."""
    bins = len(old)
    folded = list(new)
    if abs(np.float32(lo2 - lo)) <= _F32_EPS and abs(np.float32(hi2 - hi)) <= _F32_EPS:
        return [a + b for a, b in zip(folded, old)]
    fb = np.float32(bins)
    w = np.float32((hi - lo) / fb)
    w2 = np.float32((hi2 - lo2) / fb)
    for i, count in enumerate(old):
        a = np.float32(lo + np.float32(np.float32(i) * w))
        b = np.float32(lo + np.float32(np.float32(i + 1) * w))
        j = min(int(math.floor(np.float32((a - lo2) / w2))), bins - 1)
        k = min(int(math.floor(np.float32((b - lo2) / w2))), bins - 1)
        if j == k:
            folded[j] += count
            continue
        edge = np.float32(lo2 + np.float32(np.float32(j + 1) * w2))
        f = np.float32(np.float32(edge - a) / np.float32(b - a))
        part = int(np.trunc(np.float32(np.float32(count) * f)))
        folded[j] += part
        folded[k] += count - part
    return folded


def _candidates(h: list[int]) -> list[tuple[int, int]]:
    """The cursor procedure of ALGORITHMS.md, literally."""
    bins = len(h)
    total = sum(h)
    step = max(-(-total // 100000), 1)  # ceil(total / 100000) in exact integers
    min_bins = math.ceil(bins / 4)
    left, right = 0, bins - 1
    out: list[tuple[int, int]] = []
    while right - left > min_bins:
        tl, tr, sl, sr = left, right, 0, 0
        while tl < tr and sl < step:
            sl += h[tl]
            tl += 1
        while tl < tr and sr < step:
            sr += h[tr]
            tr -= 1
        if (right - tr) >= (tl - left):
            right = tr
        else:
            left = tl
        out.append((left, right))
    return out


def _norm(a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    return rho * (b**3 - a**3) / 3.0


def _l2_error(h64: torch.Tensor, w: np.float32, left: int, right: int) -> float:
    """The spec's per-source-bin L2 error of one candidate, in float64."""
    dst = 2**NUM_BITS
    d32 = np.float32(np.float32(w * np.float32(right - left + 1)) / np.float32(dst))
    if d32 < _F32_EPS:
        return 0.0
    w64 = float(w)
    d = w64 * (right - left + 1) / dst
    i = torch.arange(h64.numel(), dtype=torch.float64)
    rho = h64 / w64
    s_b = (i - left) * w64
    s_e = (i - left + 1) * w64
    j0 = torch.clamp(torch.floor(s_b / d), 0, dst - 1)
    j1 = torch.clamp(torch.floor(s_e / d), 0, dst - 1)
    c0 = j0 * d + d / 2
    half = torch.full_like(s_b, d / 2)
    single = _norm(s_b - c0, s_e - c0, rho)
    split = (
        _norm(s_b - c0, half, rho)
        + (j1 - j0 - 1) * _norm(-half, half, rho)
        + _norm(-half, s_e - j1 * d - d / 2, rho)
    )
    return float(torch.where(j0 == j1, single, split).sum())


def _minmax(lo: np.float32, hi: np.float32, asymmetric: bool) -> tuple[float, int]:
    """The min-max rule of ALGORITHMS.md in float32; offset rounded half to even."""
    lo_t = torch.tensor(float(lo), dtype=torch.float32)
    hi_t = torch.tensor(float(hi), dtype=torch.float32)
    base = torch.tensor(float(-(2 ** (NUM_BITS - 1))), dtype=torch.float32)
    if asymmetric:
        hi_t = torch.clamp(hi_t, min=0.0)
        lo_t = torch.clamp(lo_t, max=0.0)
        scale = (hi_t - lo_t) / float(2**NUM_BITS - 1)
        offset = base - lo_t / scale if bool(hi_t != lo_t) else base
    else:
        neg = bool(hi_t.abs() < lo_t.abs())
        scale = torch.maximum(hi_t.abs(), lo_t.abs()) / float(2 ** (NUM_BITS - 1) - 1 + int(neg))
        offset = torch.tensor(0.0, dtype=torch.float32)
    if bool(scale < EPS):
        scale = torch.tensor(1.0, dtype=torch.float32)
        if asymmetric:
            offset = base
    return float(scale), int(torch.round(offset))


def channel_state(parts: list[torch.Tensor], bins: int) -> tuple[np.float32, np.float32, list[int]]:
    """(lo, hi, hist) of one channel after accumulating its batches in order."""
    lo = np.float32(parts[0].min().item())
    hi = np.float32(parts[0].max().item())
    hist = _binning(parts[0], bins, lo, hi)
    for x in parts[1:]:
        lo2 = min(lo, np.float32(x.min().item()))
        hi2 = max(hi, np.float32(x.max().item()))
        new = _binning(x, bins, lo2, hi2)
        hist = _fold(hist, lo, hi, new, lo2, hi2)
        lo, hi = lo2, hi2
    return lo, hi, hist


def fold_into(hist: list[int], lo: np.float32, hi: np.float32, lo2: np.float32, hi2: np.float32) -> list[int]:
    """`hist` over [lo, hi] folded alone into the wider [lo2, hi2] (nothing new binned)."""
    return _fold(hist, lo, hi, [0] * len(hist), lo2, hi2)


def search_channel(lo: np.float32, hi: np.float32, hist: list[int], asymmetric: bool) -> tuple[float, int]:
    """Scale and offset of one channel's histogram: candidates, L2 errors, min-max."""
    bins = len(hist)
    w = np.float32((hi - lo) / np.float32(bins))
    h64 = torch.tensor(hist, dtype=torch.float64)
    candidates = _candidates(hist)
    errors = [_l2_error(h64, w, left, right) for left, right in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)  # first index on ties
    left, right = candidates[best]
    clip_lo = np.float32(lo + np.float32(np.float32(left) * w))
    clip_hi = np.float32(lo + np.float32(np.float32(right + 1) * w))
    return _minmax(clip_lo, clip_hi, asymmetric)


def hfmg_reference_states(
    batches: list[torch.Tensor], *, granularity: int, num_of_bins: int = 4096
) -> list[tuple[np.float32, np.float32, list[int]]]:
    """Each channel's (lo, hi, hist) after all of `batches`."""
    return [channel_state(parts, num_of_bins) for parts in _channel_batches(batches, granularity)]


def hfmg_reference(
    batches: list[torch.Tensor], *, granularity: int, asymmetric: bool, num_of_bins: int = 4096
) -> tuple[list[float], list[int]]:
    """HFMG scales and offsets of `batches` (all of them accumulated), one entry per channel."""
    scales: list[float] = []
    offsets: list[int] = []
    for lo, hi, hist in hfmg_reference_states(batches, granularity=granularity, num_of_bins=num_of_bins):
        scale, offset = search_channel(lo, hi, hist, asymmetric)
        scales.append(scale)
        offsets.append(offset)
    return scales, offsets
