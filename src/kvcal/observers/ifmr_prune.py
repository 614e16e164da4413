"""Bounds on every IFMR candidate's loss of one channel, from one pass over its values.

The exact search (`kvcal.observers.ifmr`) scores every candidate on every value: with the
default 61 candidates that is 61 float32 passes over the data. For one channel with many
values, one pass can bracket every candidate's loss instead, tightly enough that only a
few candidates can still be the argmin; only those are then scored exactly.

The pass builds a histogram of B bins over [min lo, max hi] (every candidate's clip
range, grown a little to take in the values just outside it) with, per bin, the count
and the float64 sums of `x - m` and `(x - m)^2`, `m` the bin's centre; values farther
out are summed apart. Candidate i's loss, in real
arithmetic, is the sum of `g(x) = (Q(x) * s - x)^2`, `Q(x)` the code of the clamped value.
`g` is one quadratic between breakpoints (the clip bounds and the rounding boundaries
`(Q + 1/2) * s`); a bin that no breakpoint can reach lies inside one piece, so its values'
sum of `g` follows exactly from its moments. The few bins a breakpoint can reach (a
rounding boundary crosses about one bin in a few hundred) contribute between `count *
min g` and `count * max g` over the bin. Slack terms then cover the float64 sums and the
difference between `g` and the float32 loss the search defines (`kvcal.observers.ifmr`:
`round(clamp(x)/s) * s - x`, squared, each in float32).

The brackets are verified by the caller on every candidate it scores exactly; a bracket
that does not hold its exact loss sends the search back to scoring every candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvcal.observers.chunks import float32_chunks

__all__ = ["LossBrackets", "loss_brackets"]

# Bins of the histogram: the brackets' width falls with the square of the bin count.
BINS = 1 << 16
# Values converted to float32 and binned at a time.
_CHUNK = 1 << 20
# Prefix sums run in blocks of this length (error bound grows with the block length, not B).
_BLOCK = 256
_U32 = 2.0**-24
_U64 = 2.0**-53
# How far the histogram's range may grow to take in the values just outside the clip ranges.
_GROW = 0.25
# Most rounding boundaries of one candidate: beyond this the data is not what the
# pruning is for (a clip range of many thousand steps: a degenerate scale).
_MOST_BOUNDARIES = 4096


@dataclass(frozen=True)
class LossBrackets:
    """Per candidate, float64 `low <= loss <= high` (the loss as the exact search defines it)."""

    low: Tensor
    high: Tensor


@dataclass(frozen=True)
class _Moments:
    """The histogram: per bin, count, sum of x and sum of x^2 (float64), plus the values outside it."""

    centers: Tensor  # [B] float64 (exactly the float32 centres the pass subtracted)
    count: Tensor  # [B] float64
    m1: Tensor  # [B] sum of x
    m2: Tensor  # [B] sum of x^2
    below: tuple[float, float, float]  # count, sum, sum of squares of the values < A
    above: tuple[float, float, float]  # the same for the values > E
    values: int
    abs_first: float  # the sum over bins of count * |centre|


def _moments(parts: list[Tensor], a: float, e: float, bins: int, far: bool) -> _Moments:
    """The histogram over [a, e]; `far`: some value lies outside it (else no chunk is checked)."""
    device = parts[0].device
    a32 = torch.tensor(a, dtype=torch.float32, device=device)
    e32 = torch.tensor(e, dtype=torch.float32, device=device)
    inv_w32 = torch.tensor(bins / (e - a), dtype=torch.float32, device=device)
    w32 = torch.tensor((e - a) / bins, dtype=torch.float32, device=device)
    count = torch.zeros(bins, dtype=torch.float64, device=device)
    s1 = torch.zeros_like(count)
    s2 = torch.zeros_like(count)
    outside = torch.zeros(2, 3, dtype=torch.float64, device=device)
    for chunk in float32_chunks(parts, _CHUNK, glue=False):  # no copy of float32 parts
        x = chunk.reshape(-1)
        if far:
            low, high = torch.aminmax(x)
            if bool(low < a32) or bool(high > e32):
                for row, mask in enumerate((x < a32, x > e32)):
                    out = x[mask].to(torch.float64)
                    outside[row, 0] += out.numel()
                    outside[row, 1] += out.sum()
                    outside[row, 2] += out.square().sum()
                x = x[(x >= a32) & (x <= e32)]
                if x.numel() == 0:
                    continue
        index = torch.sub(x, a32).mul_(inv_w32).floor_().clamp_(0, bins - 1)
        bin_of = index.to(torch.int32)  # bincount takes int32, converted 3x faster than int64
        centre = index.add_(0.5).mul_(w32).add_(a32)  # same float32 operations as `centers` below
        d = torch.sub(x, centre).to(torch.float64)
        count += torch.bincount(bin_of, minlength=bins).to(torch.float64)
        s1 += torch.bincount(bin_of, weights=d, minlength=bins)
        s2 += torch.bincount(bin_of, weights=d.square_(), minlength=bins)
    centers = (
        torch.arange(bins, dtype=torch.float32, device=device).add_(0.5).mul_(w32).add_(a32).to(torch.float64)
    )
    below, above = (tuple(float(v) for v in row) for row in outside.cpu())
    return _Moments(
        centers=centers,
        count=count,
        m1=count * centers + s1,
        m2=count * centers.square() + 2.0 * centers * s1 + s2,
        below=below,  # type: ignore[arg-type]
        above=above,  # type: ignore[arg-type]
        values=sum(int(part.shape[0]) for part in parts),
        abs_first=float((count * centers.abs()).sum()),
    )


def _prefix(v: Tensor) -> Tensor:
    """[B + 1] prefix sums of `v` [B], blocked: each has error <= gamma(2 * _BLOCK + 2) * sum |v|."""
    bins = v.numel()
    pad = (-bins) % _BLOCK
    blocks = torch.cat([v, v.new_zeros(pad)]).reshape(-1, _BLOCK)
    inner = blocks.cumsum(dim=1)
    offsets = torch.cat([inner.new_zeros(1), inner[:, -1].cumsum(dim=0)[:-1]])
    out = (inner + offsets.unsqueeze(1)).reshape(-1)[:bins]
    return torch.cat([v.new_zeros(1), out])


def _segment(prefix: Tensor, first: Tensor, last: Tensor) -> Tensor:
    """Sums of bins first..last (inclusive; 0 where last < first), gathered from a prefix [B + 1]."""
    empty = last < first
    hi = torch.where(empty, first, last + 1)
    return torch.where(empty, torch.zeros((), dtype=prefix.dtype, device=prefix.device), prefix[hi] - prefix[first])


def _g(x: Tensor, s: Tensor, lo: Tensor, hi: Tensor, q_lo: Tensor, q_hi: Tensor) -> Tensor:
    """The real-arithmetic error `(Q(x) * s - x)^2` (all float64, broadcast)."""
    code = torch.where(x <= lo, q_lo, torch.where(x >= hi, q_hi, torch.round(x / s)))
    return (code * s - x).square()


def _touched_bounds(
    a: Tensor, b: Tensor, s: Tensor, lo: Tensor, hi: Tensor, q_lo: Tensor, q_hi: Tensor
) -> tuple[Tensor, Tensor]:
    """The least and greatest `g` over [a, b] (float64, broadcast).

    `g` is continuous and a convex quadratic between breakpoints: its maximum is at an
    end or a breakpoint (a rounding boundary, where it is (s/2)^2, or a clip bound), its
    minimum at an end, a clip bound or a piece's vertex (code * s, where it is 0).
    """
    g_a, g_b = _g(a, s, lo, hi, q_lo, q_hi), _g(b, s, lo, hi, q_lo, q_hi)
    g_lo, g_hi = _g(lo, s, lo, hi, q_lo, q_hi), _g(hi, s, lo, hi, q_lo, q_hi)
    has_lo, has_hi = (a <= lo) & (lo <= b), (a <= hi) & (hi <= b)
    inf = torch.full_like(g_a, math.inf)
    zero = torch.zeros_like(g_a)
    u, v = torch.maximum(a, lo), torch.minimum(b, hi)
    inside = u <= v
    boundary = inside & (torch.ceil(u / s - 0.5) <= torch.floor(v / s - 0.5))
    vertex = inside & (torch.ceil(u / s) <= torch.floor(v / s))
    vertex |= (a <= q_lo * s) & (q_lo * s <= torch.minimum(b, lo))
    vertex |= (torch.maximum(a, hi) <= q_hi * s) & (q_hi * s <= b)
    most = torch.maximum(g_a, g_b)
    most = torch.maximum(most, torch.where(boundary, (0.5 * s).square(), zero))
    most = torch.maximum(most, torch.where(has_lo, g_lo, zero))
    most = torch.maximum(most, torch.where(has_hi, g_hi, zero))
    least = torch.minimum(g_a, g_b)
    least = torch.minimum(least, torch.where(has_lo, g_lo, inf))
    least = torch.minimum(least, torch.where(has_hi, g_hi, inf))
    least = torch.where(vertex, zero, least)
    return least, most


@dataclass(frozen=True)
class _Candidates:
    """The candidates in float64, [K, 1] each (broadcast against [K, points])."""

    s: Tensor
    lo: Tensor
    hi: Tensor
    q_lo: Tensor  # the code of a value clipped at lo, as the float32 search computes it
    q_hi: Tensor


def _histogram_range(parts: list[Tensor], lo: Tensor, hi: Tensor) -> tuple[float, float, bool] | None:
    """[a, e]: every candidate's clip range, grown by up to a quarter to take in the values
    just outside it (usually the few beyond the percentile bounds), and whether values
    lie farther out (summed apart). None when every clip range is one point."""
    a, e = float(lo.min()), float(hi.max())
    if not (math.isfinite(a) and math.isfinite(e) and e > a):
        return None
    extremes = [torch.aminmax(part) for part in parts]
    smallest = min(float(low) for low, _ in extremes)
    largest = max(float(high) for _, high in extremes)
    grow = _GROW * (e - a)
    a = smallest if a - grow <= smallest < a else a
    e = largest if e < largest <= e + grow else e
    return a, e, smallest < a or largest > e


def _breakpoints(c: _Candidates) -> Tensor | None:
    """[K, P] ascending: lo, the rounding boundaries (q + 1/2) * s inside (lo, hi), hi
    (rows padded with copies of lo and hi); None for implausibly many boundaries."""
    first = torch.floor(c.lo / c.s - 0.5)
    steps = int((torch.ceil(c.hi / c.s - 0.5) - first).max()) + 1
    if steps > _MOST_BOUNDARIES:
        return None
    codes = first + torch.arange(steps, dtype=torch.float64, device=c.s.device)
    boundary = (codes + 0.5) * c.s  # exact in float64: a float32 times a short half-integer
    boundary = torch.where(boundary <= c.lo, c.lo, torch.where(boundary >= c.hi, c.hi, boundary))
    return torch.cat([c.lo, boundary, c.hi], dim=1)


def _pure_segments(m: _Moments, c: _Candidates, points: Tensor, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of g over the bins no point reaches, exactly from the moments, per candidate
    (and its magnitude, for the rounding allowance). `first`/`last`: the bins each point
    reaches, before de-duplication."""
    prefix = {name: _prefix(v) for name, v in (("n", m.count), ("m1", m.m1), ("m2", m.m2), ("abs", m.m1.abs()))}
    bins = m.count.numel()
    # Before the first point (code q_lo), between points (the code of the midpoint),
    # after the last (code q_hi).
    seg_first = torch.cat([torch.zeros_like(first[:, :1]), last + 1], dim=1)
    seg_last = torch.cat([first - 1, torch.full_like(first[:, :1], bins - 1)], dim=1)
    mid = 0.5 * (points[:, :-1] + points[:, 1:])
    cs = torch.cat([c.q_lo, torch.round(mid / c.s), c.q_hi], dim=1) * c.s
    n_seg, m1_seg, m2_seg, abs_seg = (
        _segment(prefix[name], seg_first, seg_last) for name in ("n", "m1", "m2", "abs")
    )
    exact = (cs.square() * n_seg - 2.0 * cs * m1_seg + m2_seg).sum(dim=1)
    magnitude = (cs.square() * n_seg + 2.0 * cs.abs() * abs_seg + m2_seg).sum(dim=1)
    for (n_out, sum_out, sq_out), q in ((m.below, c.q_lo[:, 0]), (m.above, c.q_hi[:, 0])):
        code_s = q * c.s[:, 0]
        exact = exact + (code_s.square() * n_out - 2.0 * code_s * sum_out + sq_out)
        magnitude = magnitude + (code_s.square() * n_out + 2.0 * code_s.abs() * abs(sum_out) + sq_out)
    return exact, magnitude


def _reached_bins(m: _Moments, c: _Candidates, first: Tensor, last: Tensor, reach: float) -> tuple[Tensor, Tensor]:
    """Per candidate, the sums of count * min g and count * max g over the bins points reach
    (`first`..`last` per point, de-duplicated: each bin once)."""
    least = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    most = torch.zeros_like(least)
    for offset in range(int((last - first).max().clamp(min=-1)) + 1):
        j = first + offset
        valid = j <= last
        j = torch.where(valid, j, torch.zeros_like(j))
        centre = m.centers[j]
        g_min, g_max = _touched_bounds(centre - reach, centre + reach, c.s, c.lo, c.hi, c.q_lo, c.q_hi)
        weight = torch.where(valid, m.count[j], torch.zeros_like(centre))
        least += (weight * g_min).sum(dim=1)
        most += (weight * g_max).sum(dim=1)
    return least, most


def loss_brackets(
    parts: list[Tensor], scales: Tensor, lo: Tensor, hi: Tensor, bins: int | None = None
) -> LossBrackets | None:
    """Brackets of every candidate's loss over one channel's values, or None where not worth it.

    Args:
        parts: the stored values, [n_b, 1] each (any float dtype), on a device with float64.
        scales: [K] float32 candidate scales; lo: [1] or [K] and hi: [K] float32 clip bounds,
            exactly the tensors the exact search uses.
        bins: histogram bins (default `BINS`; tests use fewer).
    """
    bins = BINS if bins is None else bins
    s32, hi32 = scales.reshape(-1), hi.reshape(-1)
    lo32 = lo.reshape(-1).expand_as(s32)
    span = _histogram_range(parts, lo32, hi32)
    if span is None:
        return None
    c = _Candidates(
        s=s32.to(torch.float64).unsqueeze(1),
        lo=lo32.to(torch.float64).unsqueeze(1),
        hi=hi32.to(torch.float64).unsqueeze(1),
        q_lo=torch.round(lo32 / s32).to(torch.float64).unsqueeze(1),
        q_hi=torch.round(hi32 / s32).to(torch.float64).unsqueeze(1),
    )
    points = _breakpoints(c)
    if points is None:
        return None
    a, e, far = span
    m = _moments(parts, a, e, bins, far)
    # Where a value of bin j can be: its centre +- (half a bin + the float32 error of the
    # bin index (3 roundings of a value up to `bins`) + the float32 rounding of the centre).
    width = (e - a) / bins
    reach = 0.5 * width + (4.0 * _U32 * bins + 4.0 * _U32) * width + 4.0 * _U32 * (abs(a) + abs(e))
    pos = (points - (a + 0.5 * width)) / width  # bin j's exact centre is a + (j + 1/2) * width
    first = torch.ceil(pos - reach / width - 1e-9).clamp_(0, bins - 1).to(torch.int64)
    last = torch.floor(pos + reach / width + 1e-9).clamp_(0, bins - 1).to(torch.int64)
    exact, magnitude = _pure_segments(m, c, points, first, last)
    # Reach ranges are monotone along the points; consecutive ones may overlap.
    once = torch.maximum(first, torch.cat([first[:, :1], last[:, :-1] + 1], dim=1))
    least, most = _reached_bins(m, c, once, last, reach)
    slack64, x2 = _float64_slack(m, c, reach, points.shape[1] + 1, magnitude + most)
    return _with_float32_slack(exact + least - slack64, exact + most + slack64, x2)


def _float64_slack(m: _Moments, c: _Candidates, reach: float, segments: int, magnitude: Tensor) -> tuple[Tensor, float]:
    """The float64 rounding allowance per candidate, and the sum of x^2."""
    x2 = float(m.m2.sum()) + m.below[2] + m.above[2]
    n = float(m.values)
    bins = m.count.numel()
    gamma_n = (n + 2 * bins + 16) * _U64
    gamma_block = (2 * _BLOCK + 8) * _U64
    q_most = torch.maximum(c.q_lo.abs(), c.q_hi.abs())[:, 0] + 1.0
    s = c.s[:, 0]
    abs_total = float(m.m1.abs().sum())
    # The bin sums of x - m (each value's |x - m| <= reach, itself rounded once in float32
    # where x and m differ in sign; weighed by at most |code * s| + |m| + reach), the
    # blocked prefix sums (per segment), the arithmetic of every sum.
    slack = (
        2.0 * (gamma_n + _U32) * reach * ((2.0 * q_most * s + 3.0 * reach) * n + 2.0 * m.abs_first)
        + segments * 4.0 * gamma_block * (2.0 * q_most * s * abs_total + x2 + (q_most * s).square() * n)
        + 16.0 * _U64 * (magnitude + x2)
    )
    return slack, x2


def _with_float32_slack(low_g: Tensor, high_g: Tensor, x2: float) -> LossBrackets:
    """From brackets of the real-arithmetic sum of g to brackets of the float32 loss.

    Per value |e - g| <= 6.1 u |D| |x| + 5.2 u D^2 + 30 u^2 x^2 (D = sqrt(g), u = 2^-24;
    this covers a code that float32 division puts on the other side of a rounding
    boundary; clipped values get the same code as g). Summed with Cauchy-Schwarz, using
    the upper bracket for the sum of D^2, with room to spare.
    """
    upper = high_g.clamp(min=0.0)
    slack = 8.1 * _U32 * torch.sqrt(upper * x2) + 9.0 * _U32 * upper + 40.0 * _U32**2 * x2
    low = (low_g - slack) * (1.0 - 4.0 * _U64)
    high = (high_g + slack) * (1.0 + 4.0 * _U64)
    return LossBrackets(low=low.clamp(min=0.0), high=high)
