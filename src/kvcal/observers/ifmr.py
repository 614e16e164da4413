"""IFMR: search of the clipping maximum by reconstruction MSE (ALGORITHMS.md "IFMR").

All channels and all candidate ratios are scored at once; only the data is walked, in
chunks, so temporaries stay a few MB whatever the number of values kept.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from kvcal.observers.base import Observer
from kvcal.observers.chunks import float32_chunks
from kvcal.observers.ifmr_prune import loss_brackets
from kvcal.params import IfmrParams, QuantSettings
from kvcal.quant import EPS, QParams

__all__ = ["IfmrObserver", "candidate_ratios", "percentile_rank"]

logger = logging.getLogger(__name__)

# Elements of the [K, rows, C] loss temporaries. On CPU they should sit in L2;
# accelerators want fewer, larger launches.
_LOSS_BUDGET_CPU = 1 << 19
_LOSS_BUDGET_ACCEL = 1 << 22
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24
_FLOAT64_UNIT_ROUNDOFF = 2.0**-53
# Elements per float32 chunk of the percentile pass, and rows per block of its top-k.
_PERCENTILE_BUDGET = 1 << 20
_TOPK_BLOCK_ROWS = 1 << 14
# Values per block of the per-tensor percentile filter, and the most blocks it may keep.
_THRESHOLD_BLOCK = 1 << 12
_THRESHOLD_BLOCKS_LIMIT = 1 << 8
# Mean elements per batch under which the extremes pass still glues batches together.
_GLUE_BELOW = 1 << 14
# One channel with at least this many values times candidates (and 8 candidates or more):
# bracket the losses first (`ifmr_prune`: one pass plus ~8 ms), then score only the
# contenders. Below it, scoring every candidate is as quick (measured on 2 CPU cores).
# On the CPU only (see `_worth_pruning`).
_PRUNE_MIN_WORK = 1 << 25
_PRUNE_MIN_CANDIDATES = 8
# Devices known to have float64 arithmetic (NPUs and MPS do not).
_FLOAT64_DEVICES = ("cpu", "cuda")
# Devices whose mse_loss kernel (reduction 'none') is checked to be a plain
# `diff = a - b; diff * diff` in the input dtype: the loss loop fuses sub_ + square_ into it.
_FUSED_SQUARE_DEVICES = ("cpu",)
_MSE_OUT = torch.ops.aten.mse_loss.out


def percentile_rank(percentile: float, n: int) -> int:
    """The rank k (1-based) of the percentile bound among `n` values, per ALGORITHMS.md step 1."""
    if 1 - percentile < EPS:
        return 1
    # Python float product, truncated; `percentile > 0.5` keeps k in [1, n], clamp for safety.
    return min(max(n - int(percentile * n), 1), n)


def candidate_ratios(start: float, end: float, step: float) -> Tensor:
    """The search ratios `torch.arange(start, end, step, dtype=float32)`, on CPU.

    The three parameters are the Python floats (float64) of the JSON config or of
    `quant_algo_params`, never rounded to float32 first: arange sizes the result in
    float64, so the defaults give 61 candidates, 0.70 ... 1.2999999523
    ((1.3 - 0.7) / 0.01 = 60.00000000000001), as the reference toolkit does.
    """
    return torch.arange(float(start), float(end), float(step), dtype=torch.float32)


def _running_topk(top: Tensor | None, chunk: Tensor, k: int, largest: bool) -> Tensor:
    """The `k` most extreme rows (per column) of `top` and `chunk` together, unordered."""
    rows, channels = chunk.shape
    block = max(4 * k, _TOPK_BLOCK_ROWS)
    blocks = rows // block
    if blocks > 1:
        # A top-k of one long column runs on one thread; the top-k of each block first is
        # exact (the overall top k lie in the union of the blocks' top k) and parallel.
        head = chunk[: blocks * block].reshape(blocks, block, channels)
        head = head.topk(k, dim=1, largest=largest, sorted=False).values.reshape(blocks * k, channels)
        chunk = torch.cat([head, chunk[blocks * block :]])
    pool = chunk if top is None else torch.cat([top, chunk])
    if pool.shape[0] <= k:
        return pool
    return pool.topk(k, dim=0, largest=largest, sorted=False).values


def _blocks(part: Tensor) -> tuple[Tensor, Tensor]:
    """One channel's stored values ([n, 1], any float dtype) as whole blocks [b, BLOCK] and the rest [r]."""
    values = part.reshape(-1)
    whole = values.numel() // _THRESHOLD_BLOCK * _THRESHOLD_BLOCK
    return values[:whole].reshape(-1, _THRESHOLD_BLOCK), values[whole:]


def _kth_extremes_by_threshold(parts: list[Tensor], k_max: int, k_min: int) -> tuple[Tensor, Tensor] | None:
    """The `k_max`-th largest and `k_min`-th smallest of one channel's values ([1] each, float32),
    or None when the filter below keeps too many values (the caller's running top-k then does it).

    A top-k of millions of values runs on one thread. Instead: the maximum of each block of
    values first. At least `k` blocks have a maximum >= the k-th largest block maximum `t`,
    so at least k values are >= t, and they all lie in those blocks: the k-th largest value
    is the k-th largest of the values of the blocks whose maximum is >= t, usually k blocks.
    Likewise for the minimum. Exact: the same value as a top-k of everything.
    """
    maxima: list[Tensor] = []
    minima: list[Tensor] = []
    for part in parts:
        blocks, rest = _blocks(part)
        maxima.append(blocks.amax(dim=1).to(torch.float32))
        minima.append(blocks.amin(dim=1).to(torch.float32))
        if rest.numel():
            maxima.append(rest.amax().reshape(1).to(torch.float32))
            minima.append(rest.amin().reshape(1).to(torch.float32))
    block_max, block_min = torch.cat(maxima), torch.cat(minima)
    if block_max.numel() < max(k_max, k_min):
        return None
    t_high = block_max.topk(k_max).values[-1]
    t_low = block_min.topk(k_min, largest=False).values[-1]
    if int((block_max >= t_high).sum()) + int((block_min <= t_low).sum()) > _THRESHOLD_BLOCKS_LIMIT:
        return None  # many equal values: no gain over a top-k of everything
    high_pool: list[Tensor] = []
    low_pool: list[Tensor] = []
    start = 0
    for part in parts:
        blocks, rest = _blocks(part)
        pieces = [(blocks, blocks.shape[0])] + ([(rest.reshape(1, -1), 1)] if rest.numel() else [])
        for values, count in pieces:
            high_pool.append(values[block_max[start : start + count] >= t_high].reshape(-1))
            low_pool.append(values[block_min[start : start + count] <= t_low].reshape(-1))
            start += count
    top = torch.cat(high_pool).to(torch.float32).topk(k_max).values[-1]
    bottom = torch.cat(low_pool).to(torch.float32).topk(k_min, largest=False).values[-1]
    return top.reshape(1), bottom.reshape(1)


def _gamma(terms: int, unit_roundoff: float) -> float:
    """Higham's gamma_{n-1}: relative error bound of any sum of `terms` non-negative values."""
    nu = max(terms - 1, 0) * unit_roundoff
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def _sum_error_bound(terms: int, partials: int) -> float:
    """Relative error bound of the loss: float32 sums of `terms` values, `partials` of them summed in float64.

    The bounds hold whatever the summation order, so they cover every backend's
    reductions; 1e-15 covers the rounding of the threshold arithmetic itself.
    """
    low, high = _gamma(terms, _FLOAT32_UNIT_ROUNDOFF), _gamma(partials, _FLOAT64_UNIT_ROUNDOFF)
    if math.isinf(low) or math.isinf(high):
        return math.inf
    return low + high + low * high + 1e-15


def _squared_errors(chunk: Tensor, out: Tensor, s: Tensor, lo: Tensor, hi: Tensor, lo_floor: bool, free: bool) -> None:
    """`out` [K, n, C] = (round(clamp(chunk, lo, hi) / s) * s - chunk)^2, per candidate, in float32.

    The same float32 operations, in the same order, as the definition. clamp is spelt
    maximum then minimum (equal for lo <= hi): the 3-tensor clamp kernel is many times
    slower. A `free` chunk lies inside every candidate's clip range and needs neither; a
    `lo_floor` lower bound (shared by all candidates, [1, C], below every value) is not applied.

    Args:
        chunk: [n, C] float32 values.
        out: [K, n, C] float32 buffer.
        s: [K, 1, C] candidate scales; hi: [K, 1, C] upper bounds.
        lo: [1, C] (shared) or [K, C] lower bounds.
    """
    if lo.shape[0] == 1:
        low_clamped = chunk if lo_floor else torch.maximum(chunk, lo)  # [n, C]
        if free:
            torch.div(low_clamped, s, out=out)
        else:
            torch.minimum(low_clamped, hi, out=out).div_(s)
    elif free:
        torch.div(chunk, s, out=out)
    else:
        torch.minimum(torch.maximum(chunk, lo.unsqueeze(1), out=out), hi, out=out).div_(s)
    out.round_().mul_(s)
    if out.device.type in _FUSED_SQUARE_DEVICES:
        # (out - x)^2 in one pass instead of two. Per element the mse kernel computes
        # `diff = a - b; diff * diff`: the same two float32 roundings as sub_ then square_,
        # so the values are bit-identical (a square has no addend, so no fused multiply-add
        # can form). The reduction is 'none'.
        _MSE_OUT(out, chunk.expand_as(out), 0, out=out)
    else:
        out.sub_(chunk).square_()


class _BracketMissed(Exception):
    """An exact loss outside the bracket `ifmr_prune` gave it: score every candidate instead."""


def _nan_to_inf(loss: Tensor) -> Tensor:
    return torch.where(torch.isnan(loss), torch.full_like(loss, float("inf")), loss)


def _first_argmin(loss: Tensor) -> Tensor:
    """Per column, the first row index of the minimum of `loss` [K, C]; NaN never wins."""
    loss = _nan_to_inf(loss)
    best = loss.amin(dim=0, keepdim=True)
    rows = torch.arange(loss.shape[0], device=loss.device).unsqueeze(1).expand_as(loss)
    # Explicit first-index rule: backends do not all promise which tied index argmin returns.
    return torch.where(loss == best, rows, torch.full_like(rows, loss.shape[0])).amin(dim=0)


class IfmrObserver(Observer):
    """IFMR observer: keeps every value (in its own dtype) and searches the clip maximum.

    per-tensor: any input shape -> scale/offset shape [1]; per-channel: [..., C] -> [C].
    """

    def __init__(self, settings: QuantSettings, name: str = "") -> None:
        if not isinstance(settings.params, IfmrParams):
            raise TypeError(f"IfmrObserver needs IfmrParams, got {type(settings.params).__name__}")
        super().__init__(settings, name)
        self.params: IfmrParams = settings.params
        self._ratios = candidate_ratios(*self.params.search_range, self.params.search_step)
        # One [n_b, C] tensor per batch, in arrival order and original dtype.
        self._parts: list[Tensor] = []

    @property
    def stored_dtypes(self) -> list[torch.dtype]:
        """The dtype each accumulated batch is kept in (inputs are never upcast in memory)."""
        return [part.dtype for part in self._parts]

    def _extrema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's min and max (0-d; NaN propagates), reduced in the activation's own
        memory order: per channel, x [C, N] is a transposed view of [N, C], which a full
        reduction walks several times slower than [N, C] itself."""
        return torch.aminmax(x.t())

    def _accumulate(self, x: Tensor, low: Tensor, high: Tensor) -> None:
        # Back to [values, channels]: the activation's own layout, so per-channel data is
        # not transposed. Copied because the model may later modify its output in place.
        # Copied flat: the per-tensor [N, 1] view has strides (1, N), and torch copies a
        # tensor with such strides about 10x slower than the same values as one flat run.
        rows = x.t()
        part = rows.reshape(-1).clone().view(rows.shape) if rows.is_contiguous() else rows.contiguous()
        if self._parts and part.device != self._parts[0].device:
            part = part.to(self._parts[0].device)
        self._parts.append(part)

    def _merge(self, other: Observer) -> None:
        if not isinstance(other, IfmrObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into IfmrObserver")
        device = self._parts[0].device if self._parts else other._parts[0].device
        self._parts.extend(part.to(device) for part in other._parts)

    def _compute(self) -> QParams:
        device = self._parts[0].device
        channels = int(self._parts[0].shape[1])
        n = sum(int(part.shape[0]) for part in self._parts)
        max_init, min_init = self._initial_bounds(n, channels)
        scales, lo, hi = self._candidates(max_init, min_init)
        # With k_min = 1 the asymmetric lower bound is at most every value (a NaN value
        # makes it NaN): clamping to it changes no value, up to the sign of a zero, which
        # the square removes. The loss pass then skips it.
        lo_floor = (
            self.settings.asymmetric
            and percentile_rank(self.params.min_percentile, n) == 1
            and not bool(torch.isnan(min_init).any())
        )
        best = self._search(scales, lo, hi, device, lo_floor)
        scale = scales.gather(0, best.unsqueeze(0)).squeeze(0)
        if self.settings.asymmetric:
            half = float(2 ** (self.settings.num_bits - 1))
            offset = (-torch.round(min_init / scale) - half).to(torch.int32)
        else:
            offset = torch.zeros(channels, dtype=torch.int32, device=device)
        return QParams(scale=scale, offset=offset)

    def _search(self, scales: Tensor, lo: Tensor, hi: Tensor, device: torch.device, lo_floor: bool) -> Tensor:
        """Index of the best candidate per channel, [C]: the first of the minimal losses.

        One channel with many values: `ifmr_prune` brackets every candidate's loss from one
        pass, and only the candidates whose lower bound is within every upper bound are
        scored exactly. Those exact losses must fall in their brackets; if one does not,
        every candidate is scored, as for several channels or few values.
        """
        if self._worth_pruning(scales, device):
            brackets = loss_brackets(self._parts, scales[:, 0], lo[:, 0], hi[:, 0])
            if brackets is not None:
                # Written so that a NaN bound keeps its candidate (and a NaN minimum keeps all).
                kept = torch.nonzero(~(brackets.low > brackets.high.min()))[:, 0]
                if kept.numel() < scales.shape[0]:
                    sub_lo = lo if lo.shape[0] == 1 else lo[kept]
                    try:
                        best = self._exact_search(
                            scales[kept], sub_lo, hi[kept], device, lo_floor, (brackets.low[kept], brackets.high[kept])
                        )
                    except _BracketMissed:
                        logger.debug("%s: an IFMR loss bracket missed its exact loss; scoring every candidate",
                                     self._where())
                    else:
                        return kept[best]
        return self._exact_search(scales, lo, hi, device, lo_floor)

    def _worth_pruning(self, scales: Tensor, device: torch.device) -> bool:
        candidates, channels = scales.shape
        values = sum(int(part.shape[0]) for part in self._parts)
        return (
            channels == 1
            and candidates >= _PRUNE_MIN_CANDIDATES
            and values * candidates >= _PRUNE_MIN_WORK
            # CPU only: not yet run on an accelerator, where scoring every candidate is
            # massively parallel anyway.
            and device.type == "cpu"
        )

    def _exact_search(
        self,
        scales: Tensor,
        lo: Tensor,
        hi: Tensor,
        device: torch.device,
        lo_floor: bool,
        brackets: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Index of the best of these candidates per channel, [C], scoring each on every value.

        A fast pass sums each chunk in float32. Its error is bounded, so only candidates
        whose loss is within that bound of the channel's minimum can be the argmin; if any
        channel has more than one, those few are re-scored with float64 sums (where the
        device has float64). Float32 sums alone can merge near-ties (seen at 3e-8 relative)
        and move the argmin.

        Raises:
            _BracketMissed: with `brackets` ([K] low and high of one channel's losses), a
                fast loss that cannot lie in its bracket.
        """
        loss, terms, partials = self._losses(scales, lo, hi, device, lo_floor, wide=False)
        if device.type not in _FLOAT64_DEVICES:
            return _first_argmin(loss)
        loss = _nan_to_inf(loss)
        bound = _sum_error_bound(terms, partials)
        if brackets is not None:
            low, high = brackets
            fast = loss[:, 0].to(torch.float64)
            if bound >= 1.0 or not bool(((fast <= high * (1.0 + bound)) & (fast >= low * (1.0 - bound))).all()):
                raise _BracketMissed
        if bound < 1.0:
            threshold = loss.amin(dim=0, keepdim=True) * ((1.0 + bound) / (1.0 - bound))
            contenders = loss <= threshold
        else:  # no useful bound (never with real chunk sizes): every candidate contends
            contenders = torch.ones_like(loss, dtype=torch.bool)
        count = int(contenders.sum(dim=0).max())  # one host sync, outside any loop
        if count == 1:
            return _first_argmin(loss)
        # The contenders of each channel in candidate order, padded with its first one
        # (a padded duplicate comes later, so it never wins a tie over the original).
        candidates = loss.shape[0]
        order = torch.arange(candidates, device=device).unsqueeze(1).expand_as(loss)
        key = torch.where(contenders, order, order + candidates)
        picked = key.sort(dim=0).values[:count]
        picked = torch.where(picked < candidates, picked, picked[:1].expand_as(picked))
        sub_lo = lo if lo.shape[0] == 1 else lo.gather(0, picked)
        sub_loss, _, _ = self._losses(
            scales.gather(0, picked), sub_lo, hi.gather(0, picked), device, lo_floor, wide=True
        )
        return picked.gather(0, _first_argmin(sub_loss).unsqueeze(0)).squeeze(0)

    def _initial_bounds(self, n: int, channels: int) -> tuple[Tensor, Tensor]:
        """`max_init` (>= 0) and `min_init` (<= 0), float32 [C], from the percentile ranks."""
        k_max = percentile_rank(self.params.max_percentile, n)
        k_min = percentile_rank(self.params.min_percentile, n)
        # Chunks of at least 4k rows keep the running top-k merge cheap relative to the data.
        rows = max(_PERCENTILE_BUDGET // channels, 4 * max(k_max, k_min), 1)
        if channels == 1 and not (k_max == 1 and k_min == 1):
            filtered = _kth_extremes_by_threshold(self._parts, k_max, k_min)
            if filtered is not None:
                top, bottom = filtered
                return torch.clamp(top, min=0.0), torch.clamp(bottom, max=0.0)
        top: Tensor | None = None
        bottom: Tensor | None = None
        # Extremes merge across pieces for free: large parts are read in place rather than
        # glued together first (a copy of all the data). Small ones are still glued.
        extremes = k_max == 1 and k_min == 1
        glue = not extremes or n * channels < _GLUE_BELOW * len(self._parts)
        for chunk in float32_chunks(self._parts, rows, glue):
            if extremes:
                high, low = chunk.amax(dim=0), chunk.amin(dim=0)
                top = high if top is None else torch.maximum(top, high)
                bottom = low if bottom is None else torch.minimum(bottom, low)
            else:
                top = _running_topk(top, chunk, k_max, largest=True)
                bottom = _running_topk(bottom, chunk, k_min, largest=False)
        if top is None or bottom is None:
            raise RuntimeError(f"{self._where()}: no data to compute from")  # unreachable: complete implies data
        if top.dim() == 2:
            # Exactly k rows remain (k <= n): the k-th largest is the smallest of them.
            top, bottom = top.amin(dim=0), bottom.amax(dim=0)
        return torch.clamp(top, min=0.0), torch.clamp(bottom, max=0.0)

    def _candidates(self, max_init: Tensor, min_init: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate scales and clip bounds, [K, C] (asymmetric lower bound [1, C])."""
        # Built on CPU, then moved: float32 arange is computed in double on CPU but in
        # float32 on CUDA, and the ratios must be the same everywhere.
        ratios = self._ratios.to(max_init.device).unsqueeze(1)
        bits = self.settings.num_bits
        # Divisors are tensors on purpose: CUDA turns division by a Python scalar into a
        # multiplication by its reciprocal, which rounds differently.
        if self.settings.asymmetric:
            clip = ratios * max_init.unsqueeze(0)
            lo = min_init.unsqueeze(0)
            scales = (clip - lo) / torch.full_like(clip, float(2**bits - 1))
            hi = clip
        else:
            neg = max_init.abs() < min_init.abs()
            magnitude = torch.maximum(max_init.abs(), min_init.abs())
            divisor = torch.where(
                neg,
                torch.full_like(magnitude, float(2 ** (bits - 1))),
                torch.full_like(magnitude, float(2 ** (bits - 1) - 1)),
            )
            clip = ratios * magnitude.unsqueeze(0)
            scales = clip / divisor.unsqueeze(0)
            lo, hi = -clip, clip
        scales = torch.where(scales < EPS, torch.ones_like(scales), scales)
        return scales, lo, hi

    def _losses(
        self, scales: Tensor, lo: Tensor, hi: Tensor, device: torch.device, lo_floor: bool, wide: bool
    ) -> tuple[Tensor, int, int]:
        """Sum over the data of the squared reconstruction error, per candidate and channel.

        Args:
            scales: [K, C] candidate scales.
            lo: [1, C] (shared by all candidates) or [K, C] lower clip bounds.
            hi: [K, C] upper clip bounds.
            device: where the data is.
            lo_floor: `lo` is shared and no value lies below it, so it is not applied.
            wide: sum every float32 square in float64; else sum each chunk in float32.

        Returns:
            The [K, C] sums (float64 where the device has it), then, for the error bound,
            the most float32 terms one partial sum added up and the number of partial sums.
        """
        candidates, channels = scales.shape
        budget = _LOSS_BUDGET_CPU if device.type == "cpu" else _LOSS_BUDGET_ACCEL
        rows = max(budget // (candidates * channels), 1)
        # As many chunks as the budget needs, of equal size: no short last chunk paying
        # the per-operation overheads for a few rows.
        values = sum(int(part.shape[0]) for part in self._parts)
        if values > rows:
            rows = -(-values // -(-values // rows))
        acc_dtype = torch.float64 if device.type in _FLOAT64_DEVICES else torch.float32
        total = torch.zeros(candidates, channels, dtype=acc_dtype, device=device)
        shared_lo = lo.shape[0] == 1
        work = torch.empty(candidates, rows, channels, dtype=torch.float32, device=device)
        wide_work = torch.empty_like(work, dtype=acc_dtype) if wide and acc_dtype != torch.float32 else None
        # Every candidate's clamp leaves x in [free_lo, free_hi] as it is, after the shared
        # lower clamp: a chunk that lies there can skip the [K, rows, C] clamp passes.
        # Checked on CPU (one host read per chunk), and only while it pays.
        check_free = device.type == "cpu"
        free_lo, free_hi = (float(lo.max()), float(hi.min())) if check_free else (0.0, 0.0)
        hits = misses = 0
        partials = 0
        for chunk in float32_chunks(self._parts, rows):
            partials += 1
            n = chunk.shape[0]
            free = False
            if check_free:
                low, high = (float(v) for v in torch.aminmax(chunk))
                free = high <= free_hi and (free_lo <= free_hi if shared_lo else free_lo <= low)
                hits, misses = hits + free, misses + (not free)
                check_free = misses <= hits + 2
            _squared_errors(chunk, work[:, :n], scales.unsqueeze(1), lo, hi.unsqueeze(1), lo_floor, free)
            if wide_work is None:
                total += work[:, :n].sum(dim=1)
            else:
                acc = wide_work[:, :n]
                acc.copy_(work[:, :n])
                total += acc.sum(dim=1)
        if wide_work is not None:
            return total, 1, partials * rows
        return total, rows, partials
