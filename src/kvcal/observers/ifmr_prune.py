"""Bounds on every IFMR candidate's loss of one channel, from one pass over its values.

The exact search (`kvcal.observers.ifmr`) scores every candidate on every value: with the
default 61 candidates that is 61 float32 passes over the data. For one channel with many
values, one pass can bracket every candidate's loss instead, tightly enough that only a
few candidates can still be the argmin; only those are then scored exactly.

The pass builds a histogram of B bins over [min lo, max hi] (every candidate's clip
range) with, per bin, the count and the float64 sums of `x - m` and `(x - m)^2`, `m` the
bin's centre; values outside the range are summed apart. Candidate i's loss, in real
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

__all__ = ["LossBrackets", "loss_brackets"]

# Bins of the histogram: the brackets' width falls with the square of the bin count.
BINS = 1 << 16
# Rows of stored values converted to float32 at a time.
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


def _moments(parts: list[Tensor], a: float, e: float, bins: int) -> _Moments:
    device = parts[0].device
    a32 = torch.tensor(a, dtype=torch.float32, device=device)
    e32 = torch.tensor(e, dtype=torch.float32, device=device)
    inv_w32 = torch.tensor(bins / (e - a), dtype=torch.float32, device=device)
    w32 = torch.tensor((e - a) / bins, dtype=torch.float32, device=device)
    count = torch.zeros(bins, dtype=torch.float64, device=device)
    s1 = torch.zeros_like(count)
    s2 = torch.zeros_like(count)
    outside = torch.zeros(2, 3, dtype=torch.float64, device=device)
    values = 0
    for part in parts:
        flat = part.reshape(-1)
        values += flat.numel()
        for start in range(0, flat.numel(), _CHUNK):
            x = flat[start : start + _CHUNK].to(torch.float32)
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
        values=values,
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
    a, e = float(lo32.min()), float(hi32.max())
    if not (math.isfinite(a) and math.isfinite(e) and e > a):
        return None
    # Values just outside [a, e] (the few beyond the percentile bounds, usually) are binned
    # too: the range grows by up to a quarter; farther ones are summed apart.
    smallest = min(float(part.min()) for part in parts)
    largest = max(float(part.max()) for part in parts)
    grow = _GROW * (e - a)
    a = smallest if a - grow <= smallest < a else a
    e = largest if e < largest <= e + grow else e
    m = _moments(parts, a, e, bins)
    s, lo64, hi64 = s32.to(torch.float64), lo32.to(torch.float64), hi32.to(torch.float64)
    # Codes of clipped values, as the float32 search computes them.
    q_lo = torch.round(lo32 / s32).to(torch.float64)
    q_hi = torch.round(hi32 / s32).to(torch.float64)
    first = torch.floor(lo64 / s - 0.5)
    steps = int((torch.ceil(hi64 / s - 0.5) - first).max()) + 1
    if steps > _MOST_BOUNDARIES:
        return None
    boundary = (first.unsqueeze(1) + torch.arange(steps, dtype=torch.float64, device=s.device)).add_(0.5) * s.unsqueeze(1)
    boundary = torch.where(boundary <= lo64.unsqueeze(1), lo64.unsqueeze(1), boundary)
    boundary = torch.where(boundary >= hi64.unsqueeze(1), hi64.unsqueeze(1), boundary)
    points = torch.cat([lo64.unsqueeze(1), boundary, hi64.unsqueeze(1)], dim=1)  # [K, P] ascending

    # Where a value of bin j can be: its centre +- (half a bin + the float32 error of the
    # bin index (3 roundings of a value up to `bins`) + the float32 rounding of the centre).
    width = (e - a) / bins
    reach = 0.5 * width + (4.0 * _U32 * bins + 4.0 * _U32) * width + 4.0 * _U32 * (abs(a) + abs(e))
    base = a + 0.5 * width  # exact centre of bin j: base + j * width
    pos = (points - base) / width
    slack_bins = reach / width
    j_first = torch.ceil(pos - slack_bins - 1e-9).clamp_(0, bins - 1).to(torch.int64)
    j_last = torch.floor(pos + slack_bins + 1e-9).clamp_(0, bins - 1).to(torch.int64)
    # Ranges are monotone along the points; consecutive ones may overlap: count a bin once.
    j_first = torch.maximum(j_first, torch.cat([j_first[:, :1], j_last[:, :-1] + 1], dim=1))

    prefix = {name: _prefix(v) for name, v in (("n", m.count), ("m1", m.m1), ("m2", m.m2), ("abs", m.m1.abs()))}
    # Pure segments: before the first point (code q_lo), between points (the code of the
    # midpoint), after the last (code q_hi).
    seg_first = torch.cat([torch.zeros_like(j_first[:, :1]), j_last + 1], dim=1)  # [K, P + 1]
    raw_first = torch.ceil(pos - slack_bins - 1e-9).clamp_(0, bins - 1).to(torch.int64)
    seg_last = torch.cat([raw_first - 1, torch.full_like(j_first[:, :1], bins - 1)], dim=1)
    mid = 0.5 * (points[:, :-1] + points[:, 1:])
    code = torch.cat([q_lo.unsqueeze(1), torch.round(mid / s.unsqueeze(1)), q_hi.unsqueeze(1)], dim=1)
    n_seg = _segment(prefix["n"], seg_first, seg_last)
    m1_seg = _segment(prefix["m1"], seg_first, seg_last)
    m2_seg = _segment(prefix["m2"], seg_first, seg_last)
    abs_seg = _segment(prefix["abs"], seg_first, seg_last)
    cs = code * s.unsqueeze(1)
    exact = (cs.square() * n_seg - 2.0 * cs * m1_seg + m2_seg).sum(dim=1)
    magnitude = (cs.square() * n_seg + 2.0 * cs.abs() * abs_seg + m2_seg).sum(dim=1)
    for (n_out, sum_out, sq_out), q in ((m.below, q_lo), (m.above, q_hi)):
        c = q * s
        exact = exact + (c.square() * n_out - 2.0 * c * sum_out + sq_out)
        magnitude = magnitude + (c.square() * n_out + 2.0 * c.abs() * abs(sum_out) + sq_out)

    # Bins a point can reach: each value there between count * min g and count * max g.
    least = torch.zeros_like(exact)
    most = torch.zeros_like(exact)
    span = int((j_last - j_first).max().clamp(min=-1)) + 1
    centres, counts = m.centers, m.count
    shape = (-1, 1)
    for offset in range(span):
        j = j_first + offset
        valid = j <= j_last
        j = torch.where(valid, j, torch.zeros_like(j))
        centre = centres[j]
        g_min, g_max = _touched_bounds(
            centre - reach, centre + reach, s.reshape(shape), lo64.reshape(shape), hi64.reshape(shape),
            q_lo.reshape(shape), q_hi.reshape(shape),
        )
        weight = torch.where(valid, counts[j], torch.zeros_like(centre))
        least += (weight * g_min).sum(dim=1)
        most += (weight * g_max).sum(dim=1)

    x2 = float(m.m2.sum()) + m.below[2] + m.above[2]
    n = float(m.values)
    points_per = points.shape[1] + 1
    gamma_n = (n + 2 * bins + 16) * _U64
    gamma_block = (2 * _BLOCK + 8) * _U64
    q_most = torch.maximum(q_lo.abs(), q_hi.abs()) + 1.0
    abs_total = float(m.m1.abs().sum())
    # float64: the bin sums of x - m (each value's |x - m| <= reach, itself rounded once
    # in float32 where x and m differ in sign; weighed by at most |code * s| + |m| +
    # reach), the blocked prefix sums (per segment), the arithmetic of every sum above.
    float64_slack = (
        2.0 * (gamma_n + _U32) * reach * ((2.0 * q_most * s + 3.0 * reach) * n + 2.0 * m.abs_first)
        + points_per * 4.0 * gamma_block * (2.0 * q_most * s * abs_total + x2 + (q_most * s).square() * n)
        + 16.0 * _U64 * (magnitude + most + x2)
    )
    low_g = exact + least - float64_slack
    high_g = exact + most + float64_slack
    # float32: per value |e - g| <= 6.1 u |D| |x| + 5.2 u D^2 + 30 u^2 x^2 (D = sqrt(g);
    # this covers a code that float32 division puts on the other side of a rounding
    # boundary; clipped values get the same code as g); summed with Cauchy-Schwarz,
    # using the upper bracket for sum D^2, with room to spare.
    upper = high_g.clamp(min=0.0)
    float32_slack = 8.1 * _U32 * torch.sqrt(upper * x2) + 9.0 * _U32 * upper + 40.0 * _U32**2 * x2
    low = (low_g - float32_slack) * (1.0 - 4.0 * _U64)
    high = (high_g + float32_slack) * (1.0 + 4.0 * _U64)
    return LossBrackets(low=low.clamp(min=0.0), high=high)
