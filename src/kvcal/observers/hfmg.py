"""HFMG: histogram, then search of the clipping range by L2 error (ALGORITHMS.md "HFMG").

Every step works on all channels at once:

* binning reproduces `torch.histc` for each channel with one `bincount` over
  `channel * B + bin` (a single channel uses `torch.histc` itself);
* folding an old histogram into a wider range is index arithmetic plus two
  `scatter_add_` over all (channel, old bin) pairs;
* the cursor rounds advance all channels in lock-step, each round a few tensor
  operations (`searchsorted` on cumulative counts) however many bins a cursor crosses;
* the L2 error of a candidate is its two clipped tails (closed forms over exact integer
  prefix moments, O(1) per candidate) plus its inside part (per destination bin,
  O(256) per candidate). Tails bound the error from below, so the rounds of a channel
  stop once no later candidate can beat a known error, and only the candidates whose
  tails do not already exceed it are scored inside.

With one channel (per-tensor) every step is a few dozen operations on small tensors, so
their count is what costs: the observer runs them under inference mode, the first
candidates are scored in one pass (inside and tails together), and no step is sliced
into blocks when one block holds it all.

State per channel: `lo`, `hi` (float32) and `hist` (B counts, int64 holding int32
values): memory is O(channels x B) whatever `batch_num`; the raw data is never kept.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from kvcal.errors import CalibrationError
from kvcal.observers.base import Observer
from kvcal.params import HfmgParams, QuantSettings
from kvcal.quant import EPS, QParams, minmax_qparams

__all__ = [
    "HfmgObserver",
    "bin_channels",
    "fold_histograms",
    "candidate_ranges",
    "search_clip_ranges",
]

# Elements of the temporaries of one binning / folding / scoring step: a few MB, so that
# the peak memory of a later batch is the peak of the first one plus nothing that grows.
_STEP_ELEMENTS = 1 << 20
# Devices known to have float64 arithmetic (NPUs and MPS do not).
_FLOAT64_DEVICES = ("cpu", "cuda")
# Candidates scored per block: the [candidates, 258] temporaries stay a few MB.
_SCORE_STEP = max(1, _STEP_ELEMENTS // (8 * 257))
# Up to this many channels on the CPU, the cursor rounds run on Python ints: each round
# is then a few microseconds per channel instead of a dozen tensor dispatches.
_HOST_ROUND_CHANNELS = 8
# With the host rounds, the search scores this many first candidates at once (most
# searches need them all: the rounds stop on a check, at round 1, 2, 4, 8, 12, ...).
_FIRST_SCORED = 8
# Past this many candidates to score, the search first scores one seed per channel to
# lower the bound that decides which others need scoring; below, it scores them at once.
_SEED_AFTER = 64


def _in_blocks(step: int, *tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """`tensors` (same first dimension) in blocks of `step` along it; one block is the
    tensors themselves (no slicing: per-tensor calibration is one small block)."""
    size = tensors[0].shape[0]
    if size <= step:
        yield tensors
        return
    for start in range(0, size, step):
        yield tuple(t[start : start + step] for t in tensors)


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the L2 errors where the device has it, else float32."""
    return torch.float64 if device.type in _FLOAT64_DEVICES else torch.float32


def bin_channels(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Histogram of every row of `x` ([C, N], any float dtype) as `torch.histc(x[c], bins, lo[c], hi[c])`.

    Value v of channel c goes to bin `trunc(((v - lo) * bins) / (hi - lo))` in float32,
    `v == hi` to the last bin; a channel with `lo == hi` puts everything in `bins // 2`
    (histc's [lo - 1, hi + 1] widening). All values must lie in [lo, hi].

    Returns:
        int64 [C, bins] counts.
    """
    channels, count = x.shape
    device = lo.device
    if channels == 1:
        return _bin_one_channel(x[0], float(lo), float(hi), bins)
    hist = torch.zeros(channels, bins, dtype=torch.int64, device=device)
    width = hi - lo
    flat = width == 0
    safe_width = torch.where(flat, torch.ones_like(width), width)
    # An all-equal channel has every (v - lo) = 0: its bin B/2 is an offset of its own.
    shift = torch.where(flat, bins // 2, 0)
    rows = x.t()  # [N, C]: the memory order of a [..., C] activation
    channel_step = max(1, min(channels, _STEP_ELEMENTS // bins))
    for c0 in range(0, channels, channel_step):
        c1 = min(channels, c0 + channel_step)
        offsets = torch.arange(c1 - c0, device=device, dtype=torch.int64) * bins + shift[c0:c1]
        row_step = max(1, _STEP_ELEMENTS // (c1 - c0))
        part = hist[c0:c1].view(-1)
        for r0 in range(0, count, row_step):
            chunk = rows[r0 : r0 + row_step, c0:c1].to(torch.float32)
            pos = torch.sub(chunk, lo[c0:c1])
            pos.mul_(bins).div_(safe_width[c0:c1])
            # trunc(min(t, B - 1)) == min(trunc(t), B - 1) for t >= 0: v == hi lands in B - 1.
            pos.clamp_(max=bins - 1)
            index = pos.to(torch.int64)
            index += offsets
            part += torch.bincount(index.view(-1), minlength=(c1 - c0) * bins)
    return hist


def _bin_one_channel(x: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """`bin_channels` of one channel: torch.histc itself (one fused pass), in float32
    chunks whose counts stay exact in histc's float32 output. int64 [1, bins]."""
    if lo == hi:
        hist = torch.zeros(1, bins, dtype=torch.int64, device=x.device)
        hist[0, bins // 2] = x.numel()
        return hist
    counts = [
        torch.histc(chunk.to(torch.float32), bins, lo, hi).to(torch.int64)
        for (chunk,) in _in_blocks(_STEP_ELEMENTS, x)
    ]
    return sum(counts[1:], counts[0]).view(1, bins)


def fold_histograms(hist: Tensor, lo: Tensor, hi: Tensor, new_lo: Tensor, new_hi: Tensor) -> Tensor:
    """Fold `hist` ([C, B] over [lo, hi]) into the wider ranges [new_lo, new_hi] (ALGORITHMS.md).

    Same range (both ends within EPS): bin by bin. Otherwise old bin i, spanning
    `[a, b] = [lo + i*w, lo + (i+1)*w]`, goes to new bins `j = floor((a - lo')/w')` and
    `k = min(floor((b - lo')/w'), B - 1)`, split as `part = trunc(count * f)` /
    `count - part` with `f = (lo' + (j+1)*w' - a) / (b - a)`, all float32. `j` is capped
    at B - 1 like `k` (ALGORITHMS.md leaves it unbounded; it reaches B when an old bin
    starts exactly at the new maximum, e.g. an all-equal channel at `hi'`).

    Returns:
        int64 [C, B] counts over [new_lo, new_hi].
    """
    bins = hist.shape[1]
    same = ((new_lo - lo).abs() <= EPS) & ((new_hi - hi).abs() <= EPS)
    width = (hi - lo) / bins
    new_width = (new_hi - new_lo) / bins
    # new_width is 0 only when both ranges are one point, which is the same-range case.
    new_width = torch.where(new_width > 0, new_width, 1.0)
    # Old bin edges 0 .. B: bin i spans edges i and i + 1, and (i + 1) is exact in float32.
    edges = torch.arange(bins + 1, dtype=torch.float32, device=hist.device)
    ranges = torch.stack((lo, width, new_lo, new_width), 1)  # [C, 4]
    step = max(1, _STEP_ELEMENTS // (4 * bins))
    blocks = [
        torch.where(same_block[:, None], counts, _fold_block(counts, edges, range_block))
        for counts, range_block, same_block in _in_blocks(step, hist, ranges, same)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _fold_block(counts: Tensor, edges: Tensor, ranges: Tensor) -> Tensor:
    """`fold_histograms` of a block of channels [c, B]; `ranges` [c, 4] holds lo, w, lo', w'.

    floor and trunc are conversions to int64 here (exact for the non-negative quotients
    and the products below 2^31 at hand): fewer operations, and none of torch.floor /
    torch.trunc, whose kernels split even 4096 values across threads (a wait for the
    other core when it is busy).
    """
    lo, width, new_lo, new_width = ranges[:, :, None].unbind(1)  # [c, 1] each
    edge = lo + edges * width  # [c, B + 1]: a = edge[:, :-1], b = edge[:, 1:]
    # The new bin of every old edge: j = target[:, :-1], k = target[:, 1:]. The quotient
    # is >= 0 (the new range contains the old); the clamp at 0 only keeps the indices of
    # a same-range channel, whose result is not used, in bounds.
    target = ((edge - new_lo) / new_width).to(torch.int64).clamp_(0, counts.shape[1] - 1)
    j, k = target[:, :-1], target[:, 1:]
    a, b = edge[:, :-1], edge[:, 1:]
    # The integer operands convert to float32 in the products, as `.to(torch.float32)` would.
    f = (new_lo + (j + 1) * new_width - a) / (b - a)
    # Unsplit bins may have f = 0/0: pick 0 there before converting to integers. They then
    # send 0 to j and all to k, the same bin.
    part = torch.where(j != k, counts * f, 0.0).to(torch.int64)
    out = torch.zeros_like(counts, dtype=torch.int64)
    out.scatter_add_(1, j, part)
    return out.scatter_add_(1, k, counts - part)


class _Moments:
    """Exact range sums of h_i, h_i * i, h_i * i^2 for every channel, from prefix sums.

    The prefix table is int64 [3, C * (B + 1)] (row c holds 0 then the running sums).
    With a channel total below 2^31 (int32 counts) every sum below is exact in int64
    (at most 4 * total * B^2 < 2^60); results are cast to the work dtype only once they
    are local (small) quantities. The counts themselves are kept in the work dtype too,
    in the same [C * (B + 1)] layout with a 0 at index B.
    """

    def __init__(self, hist: Tensor, dtype: torch.dtype) -> None:
        channels, bins = hist.shape
        device = hist.device
        self.bins = bins
        self.dtype = dtype
        # [3, C, B + 1]: 0, then the running sums of h, h*i and h*i^2 (written in place:
        # with many channels, copies of these tables would cost more than the search).
        table = torch.empty(3, channels, bins + 1, dtype=torch.int64, device=device)
        table[:, :, 0] = 0
        i = torch.arange(bins, dtype=torch.int64, device=device)
        torch.cumsum(hist, 1, out=table[0, :, 1:])
        weighted = hist * i
        torch.cumsum(weighted, 1, out=table[1, :, 1:])
        weighted *= i
        torch.cumsum(weighted, 1, out=table[2, :, 1:])
        self.running = table[0]  # [C, B + 1] cumulative counts
        self.table = table.view(3, -1)
        self.base = torch.arange(channels, device=device) * (bins + 1)
        self.negative = (hist < 0).any(1)  # bool [C]: some negative count
        padded = torch.empty(channels, bins + 1, dtype=dtype, device=device)
        padded[:, :bins] = hist  # exact integers: the same values as converting P[i + 1] - P[i]
        padded[:, bins] = 0
        self.padded = padded.view(-1)
        self.edges = torch.arange(257, device=device)  # destination edges of `_inside_errors`

    def host_rows(self) -> np.ndarray:
        """The prefix table as an int64 array [3, C, B + 1] (CPU only: shares the memory)."""
        return self.table.view(3, -1, self.bins + 1).numpy()

    def between(self, base: Tensor, start: Tensor, stop: Tensor, origin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sums over bins [start, stop) of h, h*(i - origin), h*(i - origin)^2.

        `start`, `stop` and `origin` have one shape; `base` broadcasts to it.
        """
        ends = torch.stack((base + stop, base + start))  # [2, ...]
        # One gather per prefix row for both ends (a row gathers faster than the table's dim 1).
        sums = (row.index_select(0, ends.view(-1)).view(ends.shape) for row in self.table)
        m0, m1, m2 = (hi_sum - lo_sum for hi_sum, lo_sum in sums)
        # m2 - 2*o*m1 + o^2*m0 = m2 - o*(m1 + (m1 - o*m0)): the same int64 value.
        m1_local = m1 - origin * m0
        m2_local = m2 - origin * (m1 + m1_local)
        return m0.to(self.dtype), m1_local.to(self.dtype), m2_local.to(self.dtype)

    def counts(self, base: Tensor, index: Tensor) -> Tensor:
        """h[index] in the work dtype, 0 at index B (one past the last bin); `base` broadcasts."""
        return _take(self.padded, base + index)


def _take(row: Tensor, index: Tensor) -> Tensor:
    """`row.take(index)` for a 1-D `row`, as an `index_select` (about twice as fast on CPU)."""
    return row.index_select(0, index.reshape(-1)).view(index.shape)


def _spread(moments: _Moments, base: Tensor, runs: tuple[Tensor, Tensor, Tensor], delta: Tensor) -> Tensor:
    """L2 error, in bin units, of runs of whole source bins whose values all go to one
    destination centre: the sum over bins i in [start, stop) of `h_i * ((i - origin +
    delta)^2 + 1/12)` (uniform density in a bin), `delta` being (origin + 1/2) - centre.

    `runs` is (start, stop, origin). The moments are exact integers about the origin
    (`_Moments.between`), so the float terms are small local quantities.
    """
    m0, m1, m2 = moments.between(base, *runs)
    return m2 + 2 * delta * m1 + (delta * delta + 1.0 / 12) * m0


def _tail_runs(moments: _Moments, left: Tensor, right: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """The two tails of candidates (L, R) as `_spread` runs and deltas, on a new last
    dimension of 2: bins [0, L) about L, clipped to the centre L + d/2, then bins (R, B)
    about R + 1, clipped to R + 1 - d/2. Offsets from the range ends keep the float
    terms positive: no cancellation."""
    half_d = (right - left + 1).to(moments.dtype) / (2 * 256)
    after = right + 1
    start = torch.stack((torch.zeros_like(left), after), -1)
    stop = torch.stack((left, torch.full_like(right, moments.bins)), -1)
    origin = torch.stack((left, after), -1)
    return (start, stop, origin), torch.stack((0.5 - half_d, 0.5 + half_d), -1)


def _tail_errors(moments: _Moments, base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """L2 error of the bins outside [L, R] (clipped into the edge destination bins), in bin units."""
    runs, delta = _tail_runs(moments, left, right)
    low, high = _spread(moments, base[..., None], runs, delta).unbind(-1)
    return low + high


def _inside_parts(
    moments: _Moments, base: Tensor, left: Tensor, right: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
    """Per destination bin of candidates (L, R) ([X] each): [X, 256] errors of the (at
    most two) source bins it covers in part, and its whole source bins as `_spread` runs
    and deltas.

    Destination bin j spans `[L + j*n/256, L + (j+1)*n/256]`: in 1/256-bin units its
    edges are integers, so which source bins it covers is decided exactly. The source
    bins covered in part are integrated directly. Every float term is a small local
    quantity, so nothing cancels.
    """
    dtype = moments.dtype
    dst = 256
    n = right - left + 1
    edge = left[:, None] * dst + moments.edges * n[:, None]  # [X, 257]
    holder = edge >> 8  # the source bin that holds each destination edge
    first, last = holder[:, :-1], holder[:, 1:]
    counts = moments.counts(base[:, None], holder)  # of `first` ([:, :-1]) and of `last` ([:, 1:])
    half = (n.to(dtype) / (2 * dst))[:, None]
    cube = half**3
    centre = (edge[:, :-1] + half * dst) / dst  # dyadic: exact
    start = first + 1
    start_f = start.to(dtype)
    # Source bin `first`, from the destination edge to its own end or the destination end.
    upto = torch.minimum(start_f - centre, half)
    partial = counts[:, :-1] * (upto**3 + cube) / 3
    # Source bin `last`, from its start to the destination end, when it is another bin.
    since = last - centre
    partial += torch.where(last > first, counts[:, 1:] * (cube - since**3) / 3, 0.0)
    # Whole bins first + 1 .. last - 1, about s = first + 1: centred at (i - s) + delta.
    return partial, (start, torch.maximum(last, start), start), start_f + 0.5 - centre


def _inside_errors(moments: _Moments, base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """L2 error of the bins inside [L, R] for a list of candidates ([X] each), in bin units."""
    partial, runs, delta = _inside_parts(moments, base, left, right)
    return (partial + _spread(moments, base[:, None], runs, delta)).sum(1)


def _inside_errors_chunked(moments: _Moments, base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """`_inside_errors` in blocks of candidates, so that temporaries stay a few MB."""
    if left.numel() == 0:
        return torch.zeros(0, dtype=moments.dtype, device=left.device)
    parts = [_inside_errors(moments, *block) for block in _in_blocks(_SCORE_STEP, base, left, right)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _errors_of(moments: _Moments, base: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """The tails and the whole errors of candidates ([X] each): one `_spread` pass serves
    the inside and both tails (the same values as `_tail_errors` and `_inside_errors`)."""
    partial, inside_runs, inside_delta = _inside_parts(moments, base, left, right)
    tail_runs, tail_delta = _tail_runs(moments, left, right)
    runs = tuple(torch.cat(pair, 1) for pair in zip(inside_runs, tail_runs))
    spread = _spread(moments, base[:, None], runs, torch.cat((inside_delta, tail_delta), 1))  # [X, 258]
    tails = spread[:, -2] + spread[:, -1]
    return tails, tails + (partial + spread[:, :-2]).sum(1)


def _lower_bounds(moments: _Moments, base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """A lower bound of the error of (L, R) that never decreases from one round to the next.

    With no negative count: the tails measured from the range ends instead of the edge
    destination centres (which lie further out), and no inside error. L only grows and R
    only shrinks, so this bound only grows.
    """
    m0, m1, m2 = moments.between(base, torch.zeros_like(left), left, left)
    low = m2 + m1 + m0 / 3  # sum of h * ((L - i - 1/2)^2 + 1/12) over i < L
    m0, m1, m2 = moments.between(base, right + 1, torch.full_like(right, moments.bins), right)
    return low + m2 - m1 + m0 / 3  # sum of h * ((i - R - 1/2)^2 + 1/12) over i > R


class _Cursors:
    """The cursor rounds of ALGORITHMS.md for all channels, each round a few tensor operations.

    With P the cumulative counts (P[t] = sum of h[i < t]): a left cursor starting at L
    stops at the first t > L with `P[t] >= P[L] + step`; a right cursor starting at R
    stops at `u - 1` for the last u <= R with `P[u] <= P[R + 1] - step`. L only ever
    takes left stopping points, which are strict running maxima of P, and R + 1 only
    right ones, strict suffix minima; so `searchsorted` over the running maximum (the
    suffix minimum) of P finds them exactly even when folding left negative counts
    (without those, both are P itself). The `tl < tr` stops are a min/max against the
    other cursor.
    """

    def __init__(self, moments: _Moments) -> None:
        self.moments = moments
        running = moments.running
        self.bins = moments.bins
        self.min_bins = -(-self.bins // 4)
        self.step = torch.clamp((running[:, -1:] + 99_999) // 100_000, min=1)
        self.ahead = running
        self.behind = running
        if bool(moments.negative.any()):
            self.ahead = running.cummax(1).values
            self.behind = running.flip(1).cummin(1).values.flip(1)
        self._host: tuple[list[np.ndarray], list[np.ndarray], list[int]] | None = None

    def start(self) -> tuple[Tensor, Tensor]:
        channels = self.ahead.shape[0]
        left = torch.zeros(channels, dtype=torch.int64, device=self.ahead.device)
        return left, left + (self.bins - 1)

    def round(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """One round from (L, R); keeps L <= R, so it is harmless on finished channels."""
        want = self.ahead.gather(1, left[:, None]) + self.step
        tl = torch.minimum(torch.searchsorted(self.ahead, want).squeeze(1), right)
        want = self.behind.gather(1, right[:, None] + 1) - self.step
        tr = torch.maximum(torch.searchsorted(self.behind, want, right=True).squeeze(1) - 2, tl)
        take_right = (right - tr) >= (tl - left)
        return torch.where(take_right, left, tl), torch.where(take_right, tr, right)

    def run(self, done: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """All rounds: (L, R) int64 [C, K] and `valid` bool [C, K] (False after a channel stopped).

        `done(L, R)`, asked every few rounds, may stop channels early: those whose later
        candidates can no longer win.
        """
        left, right = self.start()
        active = torch.ones_like(left, dtype=torch.bool)  # B - 1 > ceil(B / 4): one round at least
        lefts: list[Tensor] = []
        rights: list[Tensor] = []
        valids: list[Tensor] = []
        for count in range(1, self.bins + 1):
            left, right = self.round(left, right)
            lefts.append(left)
            rights.append(right)
            valids.append(active)
            active = active & ((right - left) > self.min_bins)
            if count % 4 and count > 2:
                continue  # check (one host sync) on rounds 1, 2, 4, 8, 12, ...
            if done is not None:
                active &= ~done(left, right)
            if not bool(active.any()):
                break
        return torch.stack(lefts, 1), torch.stack(rights, 1), torch.stack(valids, 1)

    def _host_lists(self) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """Per channel: the rows of `ahead` and `behind` and the step, for the host rounds.

        The rows are arrays sharing the tensors' memory: converting them to lists would
        cost more than the few rounds a search usually has.
        """
        if self._host is None:
            ahead = list(self.ahead.numpy())
            behind = ahead if self.behind is self.ahead else list(self.behind.numpy())
            self._host = ahead, behind, self.step[:, 0].tolist()
        return self._host

    def first_host(self, count: int) -> tuple[Tensor, Tensor]:
        """(L, R) int64 [C, count] of the first `count` rounds (CPU): what `run_host`
        yields first, whatever its checks later stop."""
        ahead, behind, steps = self._host_lists()
        lefts: list[list[int]] = []
        rights: list[list[int]] = []
        for c, step in enumerate(steps):
            left, right = 0, self.bins - 1
            lefts.append([])
            rights.append([])
            for _ in range(count):
                left, right = _host_round(ahead[c], behind[c], step, left, right)
                lefts[c].append(left)
                rights[c].append(right)
        device = self.ahead.device
        return torch.tensor(lefts, device=device), torch.tensor(rights, device=device)

    def run_host(self, done: Callable[[int, int, int], bool]) -> tuple[Tensor, Tensor, Tensor]:
        """`run` with Python ints (CPU, a few channels): the same rounds, checks and stops.

        `done(c, L, R)` must answer what the tensor `done` answers for channel c, and is
        asked on the same rounds.
        """
        ahead, behind, steps = self._host_lists()
        channels = len(steps)
        left, right = [0] * channels, [self.bins - 1] * channels
        active = [True] * channels
        lefts: list[list[int]] = []
        rights: list[list[int]] = []
        valids: list[list[bool]] = []
        for count in range(1, self.bins + 1):
            for c in range(channels):
                left[c], right[c] = _host_round(ahead[c], behind[c], steps[c], left[c], right[c])
            lefts.append(left.copy())
            rights.append(right.copy())
            valids.append(active)
            active = [a and (r - l) > self.min_bins for a, l, r in zip(active, left, right)]
            if count % 4 and count > 2:
                continue  # the same check rounds as `run`
            active = [a and not done(c, left[c], right[c]) for c, a in enumerate(active)]
            if not any(active):
                break
        device = self.ahead.device
        # [K, C] lists -> [C, K], the layout `run` gives.
        return (
            torch.tensor(list(zip(*lefts)), dtype=torch.int64, device=device),
            torch.tensor(list(zip(*rights)), dtype=torch.int64, device=device),
            torch.tensor(list(zip(*valids)), dtype=torch.bool, device=device),
        )


def _host_round(ahead: np.ndarray, behind: np.ndarray, step: int, left: int, right: int) -> tuple[int, int]:
    """`_Cursors.round` for one channel on Python ints: `bisect_left` / `bisect_right`
    over the same non-decreasing rows are `searchsorted` (left / right)."""
    tl = min(bisect_left(ahead, ahead[left] + step), right)
    tr = max(bisect_right(behind, behind[right + 1] - step) - 2, tl)
    return (left, tr) if (right - tr) >= (tl - left) else (tl, right)


def candidate_ranges(hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every candidate (L, R) of ALGORITHMS.md's cursor rounds, all channels in lock-step.

    Returns:
        (L, R, valid): int64 [C, K] bin indices, round by round, and bool [C, K], False
        for the rounds after a channel stopped.
    """
    return _Cursors(_Moments(hist, torch.float32)).run()


def _zero_error(width: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """`d = w * (R - L + 1) / 256 < EPS` in float32: the spec's error 0 (`width` broadcasts)."""
    return (width * (right - left + 1)) / 256 < EPS  # n converts to float32 in the product


def _host_done(
    moments: _Moments, width: Tensor, negative: Tensor, limit: Tensor, zero_possible: bool = True
) -> Callable[[int, int, int], bool]:
    """The `done` of `search_clip_ranges` for `_Cursors.run_host`, on Python numbers.

    The lower bound is `_lower_bounds` step by step: exact integer moments (Python ints,
    exact like int64 here), converted to float64 (Python floats), then the same float64
    operations in the same order. The error-0 test is `_zero_error` itself: as d only
    grows with n = R - L + 1, it holds for n up to some count per channel, found once
    from the test of every n (skipped when not even n = 1 passes, or `zero_possible`
    says so already).
    """
    channels, bins = moments.running.shape[0], moments.bins
    rows = moments.host_rows()
    limits = limit.tolist()
    zero_upto = [0] * channels  # error 0 exactly for n <= zero_upto[c]
    if zero_possible and bool(((width / 256) < EPS).any()):  # d < EPS for n = 1 somewhere
        n = torch.arange(1, bins + 1, device=width.device)
        zero_upto = (_zero_error(width[:, None], torch.zeros_like(n), n - 1) & ~negative[:, None]).sum(1).tolist()

    def done(c: int, left: int, right: int) -> bool:
        # Bins [0, L) about origin L, then bins (R, B) about origin R (see `_Moments.between`).
        m0, m1, m2 = (rows[:, c, left] - rows[:, c, 0]).tolist()
        f0, f1, f2 = float(m0), float(m1 - left * m0), float(m2 - 2 * left * m1 + left * left * m0)
        low = f2 + f1 + f0 / 3
        m0, m1, m2 = (rows[:, c, bins] - rows[:, c, right + 1]).tolist()
        f0, f1, f2 = float(m0), float(m1 - right * m0), float(m2 - 2 * right * m1 + right * right * m0)
        bound = low + f2 - f1 + f0 / 3
        return bound > limits[c] or right - left < zero_upto[c]

    return done


def _tensor_done(
    moments: _Moments, width: Tensor, negative: Tensor, limit: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """The `done` of `search_clip_ranges` for `_Cursors.run`: beaten by `limit`, or error 0."""

    def done(left: Tensor, right: Tensor) -> Tensor:
        beaten = _lower_bounds(moments, moments.base, left, right) > limit
        return beaten | (_zero_error(width, left, right) & ~negative)  # the first error 0 wins

    return done


def search_clip_ranges(hist: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """The clip range [clip_lo, clip_hi] of every channel: the candidate of least L2 error.

    Scores are in bin units (the spec's error divided by w^2: the same argmin) and in
    float64 where the device has it. Without negative counts, the tails of a candidate
    are a lower bound of its error; a candidate whose bound exceeds an error already
    known cannot win, is never scored inside, and ends its channel's rounds when the
    bound only grows. Known errors: the first candidate's (with the host rounds, the
    first `_FIRST_SCORED` candidates are scored at once) and, when many candidates would
    be scored, the one the uniform-density estimate prefers. `d < EPS` means error 0
    (then, without negative counts, nothing else can win, and the rounds must run to
    the end to find it).

    Returns:
        float32 [C] clip_lo and clip_hi.
    """
    channels, bins = hist.shape
    device = hist.device
    width = (hi - lo) / bins
    moments = _Moments(hist, _work_dtype(device))
    cursors = _Cursors(moments)
    negative = moments.negative  # then the tails are no lower bound: no pruning
    host = device.type == "cpu" and channels <= _HOST_ROUND_CHANNELS
    if host:  # rounds on the host cost microseconds: score the first few at once
        first = cursors.first_host(min(_FIRST_SCORED, bins))
    else:
        first = tuple(t[:, None] for t in cursors.round(*cursors.start()))
    first_tails, scored = _errors(moments, *first)  # [C, k] each: the first k candidates
    first_err = scored[:, 0]
    # Lower bounds may stop a channel only if no later candidate can have d < EPS (error 0).
    may_be_zero = (width / 256) < EPS  # d < EPS for n = 1: d only grows with n
    limit = torch.where(negative | may_be_zero, float("inf"), first_err + first_err.abs() * 1e-9)
    zero_possible = bool(may_be_zero.any())
    if host:
        left, right, valid = cursors.run_host(_host_done(moments, width, negative, limit, zero_possible))
    else:
        left, right, valid = cursors.run(_tensor_done(moments, width, negative, limit))
    errors = _candidate_errors(moments, width, (first_tails, scored), (left, right, valid))
    best = errors.argmin(1, keepdim=True)  # first index on ties
    best_left, best_right = left.gather(1, best).squeeze(1), right.gather(1, best).squeeze(1)
    return lo + best_left * width, lo + (best_right + 1) * width  # bin indices convert to float32


def _errors(moments: _Moments, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """The tails and the exact errors, [C, k] each, of candidates (L, R) [C, k] of every channel."""
    flat = (moments.base[:, None].expand_as(left).reshape(-1), left.reshape(-1), right.reshape(-1))
    parts = [_errors_of(moments, *block) for block in _in_blocks(_SCORE_STEP, *flat)]
    tails, errors = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts))
    return tails.view(left.shape), errors.view(left.shape)


def _candidate_errors(
    moments: _Moments, width: Tensor, first: tuple[Tensor, Tensor], rounds: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """Errors [C, K] of the rounds' candidates (L, R, valid): exact for every candidate that
    may win, inf for the others (and for invalid ones), 0 for `d < EPS`.

    `first` holds the tails and the exact errors of the first candidates; the others
    are scored only where needed (`_scored_where_needed`).
    """
    left, right, valid = rounds
    first_tails, errors = first
    known = min(errors.shape[1], left.shape[1])
    errors = errors[:, :known]
    zero = valid & _zero_error(width[:, None], left, right)
    if known < left.shape[1]:  # candidates past those scored first
        later = _tail_errors(moments, moments.base[:, None], left[:, known:], right[:, known:])
        tails = torch.cat((first_tails[:, :known], later), 1)
        errors = _scored_where_needed(moments, errors, tails, (left, right, valid & ~zero), zero.any(1))
    errors = torch.where(zero, 0.0, errors)
    return torch.where(valid, errors, float("inf"))


def _scored_where_needed(
    moments: _Moments, scored: Tensor, tails: Tensor, candidates: tuple[Tensor, Tensor, Tensor], has_zero: Tensor
) -> Tensor:
    """Errors [C, K]: `scored` [C, k] for the first k candidates; for the other open ones
    (L, R, open) exact when their tails do not exceed the least known error, else inf.

    With more than `_SEED_AFTER` such candidates, one seed per channel is scored first
    to lower that bound; fewer are cheaper to score at once. Either way every candidate
    whose error can be the least is scored, so the result does not depend on that choice.
    """
    left, right, open_ = candidates
    negative = moments.negative
    known = scored.shape[1]
    errors = torch.full_like(tails, float("inf"))
    errors[:, :known] = scored
    keep = _worth_scoring(open_, tails, torch.where(open_, errors, float("inf")).amin(1), has_zero, negative)
    keep[:, :known] = False
    if int(keep.sum()) > _SEED_AFTER:
        seeded, seed = _seeds(moments, tails, (left, right, open_), ~has_zero | negative)
        errors[seeded, seed] = tails[seeded, seed] + _inside_errors_chunked(
            moments, moments.base[seeded], left[seeded, seed], right[seeded, seed]
        )
        keep = _worth_scoring(open_, tails, torch.where(open_, errors, float("inf")).amin(1), has_zero, negative)
        keep[:, :known] = False
        keep[seeded, seed] = False
    kept_c, kept_k = keep.nonzero().unbind(1)
    if kept_c.numel():
        errors[kept_c, kept_k] = tails[kept_c, kept_k] + _inside_errors_chunked(
            moments, moments.base[kept_c], left[kept_c, kept_k], right[kept_c, kept_k]
        )
    return errors


def _worth_scoring(open_: Tensor, tails: Tensor, bound: Tensor, has_zero: Tensor, negative: Tensor) -> Tensor:
    """bool [C, K]: the open candidates whose tails do not exceed `bound` [C] (all open
    ones where a count is negative, none where an error 0 is there)."""
    # A margin far above float64 noise keeps the pruning exact.
    keep = open_ & (tails <= (bound + bound.abs() * 1e-9)[:, None])
    keep = torch.where(has_zero[:, None], False, keep)  # an error 0 is there, nothing scores below
    return torch.where(negative[:, None], open_, keep)


def _seeds(
    moments: _Moments, tails: Tensor, candidates: tuple[Tensor, Tensor, Tensor], wanted: Tensor
) -> tuple[Tensor, Tensor]:
    """(channels, candidate index) of the seeds: in each `wanted` channel with an open
    candidate, the open candidate the uniform-density model likes best."""
    left, right, open_ = candidates
    dtype = tails.dtype
    n = right - left + 1
    inside = (moments.running.gather(1, right + 1) - moments.running.gather(1, left)).to(dtype)
    estimate = tails + inside * (n.to(dtype) / 256) ** 2 / 12
    seed = torch.where(open_, estimate, float("inf")).argmin(1)
    seeded = (open_.any(1) & wanted).nonzero().squeeze(1)
    return seeded, seed[seeded]


class HfmgObserver(Observer):
    """HFMG for one layer: a per-channel histogram, then an L2 search of the clip range.

    per-tensor (granularity 0): any input shape -> scale/offset shape [1];
    per-channel (1): input [..., C] -> [C].
    """

    def __init__(self, settings: QuantSettings, name: str = "") -> None:
        if not isinstance(settings.params, HfmgParams):
            raise TypeError(f"HfmgObserver needs HfmgParams, got {type(settings.params).__name__}")
        super().__init__(settings, name)
        self.num_of_bins = settings.params.num_of_bins
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None
        self._hist: Tensor | None = None

    @property
    def state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(lo [C] float32, hi [C] float32, hist [C, B] int64), or None before the first batch."""
        if self._lo is None or self._hi is None or self._hist is None:
            return None
        return self._lo, self._hi, self._hist

    def _channel_step(self) -> int:
        return max(1, _STEP_ELEMENTS // (8 * self.num_of_bins))

    def _check_range(self, lo: Tensor, hi: Tensor) -> None:
        # hi >= lo, both finite: hi - lo < inf is isfinite(hi - lo) in one operation, not five.
        if not bool(((hi - lo) < float("inf")).all()):
            raise CalibrationError(
                f"{self._where()}: the value range {float((hi - lo).max())} does not fit float32; "
                "HFMG cannot bin it"
            )

    def _extrema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel min and max of x [C, N] as float32 [C] (the base class's NaN check too)."""
        if x.shape[0] == 1:
            low, high = torch.aminmax(x)
            return low.reshape(1).to(torch.float32), high.reshape(1).to(torch.float32)
        # Over the [N, C] memory order, amin/amax vectorize across channels (aminmax does not).
        rows = x.t()
        return torch.amin(rows, 0).to(torch.float32), torch.amax(rows, 0).to(torch.float32)

    def _accumulate(self, x: Tensor, low: Tensor, high: Tensor) -> None:
        bins = self.num_of_bins
        state = self.state
        if state is None:
            self._check_range(low, high)
            self._lo, self._hi = low, high
            self._hist = torch.zeros(x.shape[0], bins, dtype=torch.int64, device=x.device)
            # The observer's many small operations run under inference mode, which skips
            # autograd's bookkeeping (a fifth of their time on the CPU). The state tensors
            # and the factors are made outside it: they stay ordinary tensors.
            with torch.inference_mode():
                for block, lo_b, hi_b, hist_b in _in_blocks(self._channel_step(), x, low, high, self._hist):
                    hist_b.copy_(bin_channels(block, lo_b, hi_b, bins))
            return
        lo, hi, hist = state
        new_lo, new_hi = torch.minimum(lo, low), torch.maximum(hi, high)
        self._check_range(new_lo, new_hi)
        # Channel block by channel block, in place: the old block is folded before it is
        # overwritten, so no second [C, B] histogram is ever alive. The fold goes first: its
        # small operations then follow the extrema's, not the binning's, pass over the data.
        with torch.inference_mode():
            blocks = _in_blocks(self._channel_step(), x, hist, lo, hi, new_lo, new_hi)
            for block, hist_b, lo_b, hi_b, new_lo_b, new_hi_b in blocks:
                folded = fold_histograms(hist_b, lo_b, hi_b, new_lo_b, new_hi_b)
                torch.add(folded, bin_channels(block, new_lo_b, new_hi_b, bins), out=hist_b)
        self._lo, self._hi = new_lo, new_hi

    def _compute(self) -> QParams:
        state = self.state
        if state is None:  # unreachable: compute() checks completeness first
            raise CalibrationError(f"{self._where()}: no data")
        lo, hi, hist = state
        with torch.inference_mode():
            clip_lo, clip_hi = search_clip_ranges(hist, lo, hi)
        return minmax_qparams(clip_lo, clip_hi, self.settings.asymmetric, self.settings.num_bits)

    def _merge(self, other: Observer) -> None:
        """Fold both histograms into the union of the two ranges, by the rule of a later batch.

        Each side whose range is (within EPS) the union is added bin by bin; the other is
        folded bin by bin into the union exactly as an old histogram is when a batch
        widens the range. The result does not depend on the order of the two observers.
        """
        if not isinstance(other, HfmgObserver) or other.state is None:
            raise ValueError(f"{self._where()}: cannot merge {type(other).__name__} into an HFMG observer")
        o_lo, o_hi, o_hist = other.state
        state = self.state
        if state is None:
            self._lo, self._hi, self._hist = o_lo.clone(), o_hi.clone(), o_hist.clone()
            return
        lo, hi, hist = state
        o_lo, o_hi, o_hist = (t.to(hist.device) for t in (o_lo, o_hi, o_hist))
        new_lo, new_hi = torch.minimum(lo, o_lo), torch.maximum(hi, o_hi)
        with torch.inference_mode():
            blocks = _in_blocks(self._channel_step(), hist, lo, hi, o_hist, o_lo, o_hi, new_lo, new_hi)
            for hist_b, lo_b, hi_b, o_hist_b, o_lo_b, o_hi_b, new_lo_b, new_hi_b in blocks:
                mine = fold_histograms(hist_b, lo_b, hi_b, new_lo_b, new_hi_b)
                theirs = fold_histograms(o_hist_b, o_lo_b, o_hi_b, new_lo_b, new_hi_b)
                torch.add(mine, theirs, out=hist_b)
        self._lo, self._hi = new_lo, new_hi
