"""HFMG observer against the naive reference of ALGORITHMS.md (tests/reference_hfmg.py).

Each stage is checked on its own (binning vs torch.histc, folding, the cursor rounds,
the L2 error formula), then whole calibrations are compared: scales to 1e-6 relative,
offsets exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import reference_hfmg as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_hfmg import hfmg_reference, hfmg_reference_states

from kvcal.errors import CalibrationError
from kvcal.observers import hfmg, make_observer
from kvcal.observers.hfmg import (
    HfmgObserver,
    _inside_errors,
    _Moments,
    _tail_errors,
    bin_channels,
    candidate_ranges,
    fold_histograms,
    search_clip_ranges,
)
from kvcal.params import HfmgParams, IfmrParams, QuantSettings
from kvcal.quant import minmax_qparams

KINDS = ("normal", "uniform", "heavy", "positive", "negative", "shifted", "spiky", "tiny", "integers")
PATTERNS = ("grow", "same", "shrink", "eps")


def sample(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random float32 data of one family."""
    normal = torch.randn(shape, generator=gen)
    if kind == "normal":
        return normal
    if kind == "uniform":
        return torch.rand(shape, generator=gen) * 4 - 1
    if kind == "heavy":
        return normal * torch.exp(torch.randn(shape, generator=gen) * 1.5)
    if kind == "positive":
        return torch.exp(normal)
    if kind == "negative":
        return -torch.exp(normal) + 0.1
    if kind == "shifted":
        return 100 + normal * 0.01
    if kind == "spiky":
        return torch.where(torch.rand(shape, generator=gen) < 0.7, torch.zeros(shape), normal)
    if kind == "tiny":
        return normal * 1e-5
    if kind == "integers":
        return torch.randint(-3, 4, shape, generator=gen).to(torch.float32)
    raise AssertionError(kind)


def make_batches(
    kind: str, pattern: str, batch_num: int, shape: tuple[int, ...], granularity: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """`batch_num` batches whose range grows, stays exactly the same, shrinks within, or moves by < EPS."""
    first = sample(kind, shape, gen)
    batches = [first]
    axis_dims = tuple(range(first.dim() - 1)) if granularity == 1 else tuple(range(first.dim()))
    low = first.amin(dim=axis_dims, keepdim=True)
    high = first.amax(dim=axis_dims, keepdim=True)
    for i in range(1, batch_num):
        x = sample(kind, shape, gen)
        if pattern == "grow":
            x = x * (1 + i) + 0.25 * i
        elif pattern in ("same", "shrink", "eps"):
            x = torch.minimum(torch.maximum(x * (0.5 if pattern == "shrink" else 1.0), low), high)
            if pattern in ("same", "eps"):
                flat = x.reshape(-1, x.shape[-1]) if granularity == 1 else x.reshape(-1, 1)
                flat[0] = low.reshape(-1)
                flat[-1] = high.reshape(-1)
                if pattern == "eps":
                    # Ends moved by one ulp, where that is within EPS, still take the same-range path.
                    for row, end, way in ((0, low, -math.inf), (-1, high, math.inf)):
                        end = end.reshape(-1)
                        nudged = torch.nextafter(end, torch.tensor(way))
                        flat[row] = torch.where((nudged - end).abs() <= 1e-7, nudged, end)
        batches.append(x)
    return batches


def observe(batches: list[torch.Tensor], *, granularity: int, asymmetric: bool, bins: int,
            batch_num: int | None = None) -> HfmgObserver:
    settings_ = QuantSettings(HfmgParams(bins), granularity, asymmetric, batch_num or len(batches))
    observer = make_observer(settings_, "layer")
    assert isinstance(observer, HfmgObserver)
    for batch in batches:
        observer.update(batch)
    return observer


def results(observer: HfmgObserver) -> tuple[list[float], list[int]]:
    qparams = observer.compute()
    assert qparams.scale.dtype == torch.float32 and qparams.offset.dtype == torch.int32
    return qparams.scale.tolist(), qparams.offset.tolist()


def assert_same(ours: tuple[list[float], list[int]], theirs: tuple[list[float], list[int]]) -> None:
    scales, offsets = ours
    ref_scales, ref_offsets = theirs
    assert offsets == ref_offsets
    assert len(scales) == len(ref_scales)
    for a, b in zip(scales, ref_scales):
        assert abs(a - b) <= 1e-6 * max(abs(a), abs(b)), (scales, ref_scales)


def assert_state_matches_reference(observer: HfmgObserver, batches: list[torch.Tensor], granularity: int) -> None:
    state = observer.state
    assert state is not None
    lo, hi, hist = state
    expected = hfmg_reference_states(batches, granularity=granularity, num_of_bins=observer.num_of_bins)
    assert lo.tolist() == [float(e[0]) for e in expected]
    assert hi.tolist() == [float(e[1]) for e in expected]
    assert hist.tolist() == [e[2] for e in expected]


# --- binning -----------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [1024, 4096, 8192])
@pytest.mark.parametrize("seed", range(6))
def test_binning_is_torch_histc(bins: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows, channels = 300, 9
    x = torch.randn(rows, channels, generator=gen) * torch.rand(channels, generator=gen) * 10
    x[:, 1] = 1000 + x[:, 1] * 1e-3  # far from 0: coarse float32 spacing
    x[:, 2] = 0.0  # lo == hi channels between normal ones
    x[:, 3] = 0.1
    x[:, 4] = x[:, 4].half().float()  # float16 data
    lo, hi = x.amin(0), x.amax(0)
    # Values just below the top: (v - lo) * B / (hi - lo) can round up to B.
    x[:5, 5] = torch.nextafter(hi[5].expand(5), torch.tensor(-math.inf))
    x[5:10, 6] = hi[6]
    # Wider ranges than the data, as for a later batch binned over the union.
    lo[7], hi[8] = lo[7] - 3.0, hi[8] + hi[8].abs() * 3 + 1
    ours = bin_channels(x.t(), lo, hi, bins)
    assert ours.dtype == torch.int64 and ours.shape == (channels, bins)
    for c in range(channels):
        expected = torch.histc(x[:, c], bins, float(lo[c]), float(hi[c])).to(torch.int64)
        assert torch.equal(ours[c], expected), c
    assert (ours[2].nonzero().flatten().tolist(), ours[3].nonzero().flatten().tolist()) == ([bins // 2], [bins // 2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_binning_of_low_precision_data_is_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(500, 3, generator=gen) * 3).to(dtype)
    lo, hi = x.float().amin(0), x.float().amax(0)
    ours = bin_channels(x.t(), lo, hi, 1024)
    single = bin_channels(x[:, :1].t(), lo[:1], hi[:1], 1024)  # the one-channel (histc) path
    for c in range(3):
        expected = torch.histc(x[:, c].float(), 1024, float(lo[c]), float(hi[c])).to(torch.int64)
        assert torch.equal(ours[c], expected)
    assert torch.equal(single[0], ours[0])


# --- folding -----------------------------------------------------------------------------


def _fold_cases() -> list[tuple[float, float, float, float]]:
    return [
        (-1.0, 2.0, -1.0, 2.0),  # same range
        (-0.5, 0.75, -0.50000006, 0.75000006),  # moved by one ulp (< EPS): still bin by bin
        (-1.0, 2.0, -1.5, 2.0),
        (-1.0, 2.0, -1.0, 7.3),
        (-1.0, 2.0, -4.0, 5.0),  # edges align: old bins split exactly in two
        (0.3, 0.7, -0.2, 1.9),
        (100.0, 100.01, 99.0, 100.5),  # large offset, narrow old range
        (0.0, 0.0, 0.0, 2.5),  # all-equal old channel at the new minimum
        (1.5, 1.5, -1.0, 4.0),  # ... inside
        (0.0, 0.0, -3.0, 0.0),  # ... at the new maximum: j capped at B - 1 (last: no neighbour row)
    ]


@pytest.mark.parametrize("bins", [1024, 4096])
def test_fold_matches_reference(bins: int) -> None:
    gen = torch.Generator().manual_seed(bins)
    cases = _fold_cases()
    f32 = [tuple(float(np.float32(v)) for v in case) for case in cases]
    lo, hi, lo2, hi2 = (torch.tensor(col, dtype=torch.float32) for col in zip(*f32))
    hist = torch.randint(0, 1000, (len(cases), bins), generator=gen)
    hist *= torch.rand(len(cases), bins, generator=gen) < 0.5
    hist[lo == hi] = 0
    hist[lo == hi, bins // 2] = 12345
    ours = fold_histograms(hist, lo, hi, lo2, hi2)
    assert int(ours.sum()) == int(hist.sum())
    for c, (a, b, a2, b2) in enumerate(f32):
        expected = ref.fold_into(hist[c].tolist(), np.float32(a), np.float32(b), np.float32(a2), np.float32(b2))
        assert ours[c].tolist() == expected, c
    assert ours[7, 0] == 12345 and ours[9, bins - 1] == 12345
    assert torch.equal(ours[0], hist[0]) and torch.equal(ours[1], hist[1])  # same range: bin by bin


# Ranges (float32 bit patterns) where an old bin's split fraction rounds above 1: folding
# a spike of 100000 values there leaves -6 in the next bin (found by a random search).
_NEGATIVE_FOLD = ("-0x1.5ff08p+3", "-0x1.c64d1p+1", "-0x1.530444p+4", "0x1.2aa034p+3")


def test_fold_can_leave_negative_counts_like_the_reference() -> None:
    lo, hi, lo2, hi2 = (np.float32(float.fromhex(v)) for v in _NEGATIVE_FOLD)
    hist = torch.zeros(1, 1024, dtype=torch.int64)
    hist[0, 782] = 100_000
    ours = fold_histograms(hist, *(torch.tensor([float(v)]) for v in (lo, hi, lo2, hi2)))
    assert ours[0].tolist() == ref.fold_into(hist[0].tolist(), lo, hi, lo2, hi2)
    assert int(ours.min()) == -6


def test_negative_counts_end_to_end() -> None:
    lo, hi, lo2, hi2 = (float.fromhex(v) for v in _NEGATIVE_FOLD)
    width = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(1024))
    inside = float(np.float32(lo) + np.float32(782.5) * width)
    first = torch.cat([torch.tensor([lo, hi]), torch.full((100_000,), inside)])
    second = torch.tensor([lo2, hi2, 0.5, 1.5, -2.0])
    for asymmetric in (True, False):
        observer = observe([first, second], granularity=0, asymmetric=asymmetric, bins=1024)
        assert observer.state is not None and int(observer.state[2].min()) < 0
        assert_state_matches_reference(observer, [first, second], 0)
        assert_same(results(observer), hfmg_reference([first, second], granularity=0, asymmetric=asymmetric,
                                                     num_of_bins=1024))


# --- candidates and their errors ---------------------------------------------------------


def _histograms(seed: int, bins: int) -> torch.Tensor:
    """A mix of histogram shapes, one per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    rows.append(torch.randint(0, 3, (bins,), generator=gen))  # dense, step 1
    rows.append(torch.randint(0, 40, (bins,), generator=gen) * (torch.rand(bins, generator=gen) < 0.05))
    rows.append(torch.randint(0, 400_000, (bins,), generator=gen))  # step > 1
    centre = torch.exp(-((torch.arange(bins) - bins * torch.rand(1, generator=gen)) / (bins / 20)) ** 2)
    rows.append((centre * 5e5).to(torch.int64))  # a bump with empty tails
    spike = torch.zeros(bins, dtype=torch.int64)
    spike[int(torch.randint(0, bins, (1,), generator=gen))] = 7
    rows.append(spike)  # everything in one bin
    two = torch.zeros(bins, dtype=torch.int64)
    two[0], two[-1] = 3, 5
    rows.append(two)
    negative = torch.randint(0, 30, (bins,), generator=gen)
    negative[torch.randint(0, bins, (20,), generator=gen)] -= 60  # as folding can leave
    rows.append(negative)
    hist = torch.stack(rows)
    hist[:, 0] += 1  # data min and max sit in the end bins
    hist[:, -1] += 1
    return hist


@pytest.mark.parametrize("bins", [1024, 2048])
@pytest.mark.parametrize("seed", range(3))
def test_candidates_are_the_cursor_procedure(bins: int, seed: int) -> None:
    hist = _histograms(seed, bins)
    left, right, valid = candidate_ranges(hist)
    for c in range(hist.shape[0]):
        ours = list(zip(left[c][valid[c]].tolist(), right[c][valid[c]].tolist()))
        assert ours == ref._candidates(hist[c].tolist()), c
        assert bool(valid[c, 0])  # always at least one round


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(-2, 6), min_size=8, max_size=80), scale=st.sampled_from([1, 30_000, 90_001]))
def test_candidates_of_arbitrary_histograms(counts: list[int], scale: int) -> None:
    """Small histograms hit the `tl < tr` stops often; scaled ones have step > 1."""
    hist = torch.tensor([counts]) * scale
    left, right, valid = candidate_ranges(hist)
    ours = list(zip(left[0][valid[0]].tolist(), right[0][valid[0]].tolist()))
    assert ours == ref._candidates(hist[0].tolist())


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=16, max_size=300),
    negative=st.booleans(),
    lo=st.floats(-10, 10, width=32),
    span=st.sampled_from([1e-9, 2e-6, 1e-5, 1e-3, 1.0, 50.0]),
    asymmetric=st.booleans(),
)
def test_search_of_arbitrary_histograms(counts: list[int], negative: bool, lo: float, span: float,
                                        asymmetric: bool) -> None:
    """The pruned, early-stopped search picks the reference's candidate, d < EPS included."""
    hist = torch.tensor([counts])
    hist[0, 0] += 1
    hist[0, -1] += 1
    if negative:
        hist[0, len(counts) // 3] = -7
    low = torch.tensor([lo], dtype=torch.float32)
    high = (low + span).to(torch.float32)
    clip_lo, clip_hi = search_clip_ranges(hist, low, high)
    qparams = minmax_qparams(clip_lo, clip_hi, asymmetric)
    expected = ref.search_channel(np.float32(low[0]), np.float32(high[0]), hist[0].tolist(), asymmetric)
    assert_same((qparams.scale.tolist(), qparams.offset.tolist()), ([expected[0]], [expected[1]]))


def _search_host_and_tensor(hist: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """The host rounds (few channels on CPU) give the tensor rounds' candidates, stops and result."""
    Rounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    seen: dict[str, Rounds] = {}
    real_run, real_host = hfmg._Cursors.run, hfmg._Cursors.run_host

    def spy_run(self: hfmg._Cursors, done: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Rounds:
        seen["tensor"] = real_run(self, done)
        return seen["tensor"]

    def spy_host(self: hfmg._Cursors, done: Callable[[int, int, int], bool]) -> Rounds:
        seen["host"] = real_host(self, done)
        return seen["host"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hfmg._Cursors, "run", spy_run)
        mp.setattr(hfmg._Cursors, "run_host", spy_host)
        host = search_clip_ranges(hist, low, high)
        mp.setattr(hfmg, "_HOST_ROUND_CHANNELS", 0)
        tensor = search_clip_ranges(hist, low, high)
    assert set(seen) == {"host", "tensor"}
    for ours, theirs in zip(seen["host"], seen["tensor"]):
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
    assert torch.equal(host[0], tensor[0]) and torch.equal(host[1], tensor[1])


@pytest.mark.parametrize("bins", [1024, 4096])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("span", [1e-6, 1.0, 300.0])
def test_host_rounds_are_the_tensor_rounds(bins: int, seed: int, span: float) -> None:
    hist = _histograms(seed, bins)  # 7 channels, negative counts in one
    low = torch.linspace(-3, 1, hist.shape[0])
    _search_host_and_tensor(hist, low, low + span)
    _search_host_and_tensor(hist[2:3], low[:1], low[:1] + span)  # one channel


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(-3, 50), min_size=16, max_size=300),
    channels=st.integers(1, 3),
    scale=st.sampled_from([1, 30_000, 90_001]),
    span=st.sampled_from([1e-9, 2e-6, 3e-5, 1.0, 50.0]),
)
def test_host_rounds_of_arbitrary_histograms(counts: list[int], channels: int, scale: int, span: float) -> None:
    hist = torch.tensor([counts]).roll(1).repeat(channels, 1)
    hist = hist.roll(7, 1) if channels == 1 else torch.stack([row.roll(5 * c) for c, row in enumerate(hist)])
    hist = hist * scale
    hist[:, 0] = hist[:, 0].abs() + 1
    hist[:, -1] = hist[:, -1].abs() + 1
    low = torch.full((channels,), -0.5)
    _search_host_and_tensor(hist, low, low + span)


def test_errors_match_the_per_bin_formula() -> None:
    hist = _histograms(7, 1024)
    width = np.float32(0.037)
    for c in range(hist.shape[0]):
        row = hist[c : c + 1]
        cands = ref._candidates(row[0].tolist())
        # Plus narrow ranges, where a source bin covers many destination bins (d < 1).
        cands += [(500, 500), (10, 13), (200, 455), (3, 258), (0, 1023), (1000, 1023)]
        left = torch.tensor([p[0] for p in cands])
        right = torch.tensor([p[1] for p in cands])
        moments = _Moments(row, torch.float64)
        base = torch.zeros_like(left)
        ours = _tail_errors(moments, base, left, right) + _inside_errors(moments, base, left, right)
        ours *= float(width) ** 2  # bin units -> the spec's units
        h64 = row[0].to(torch.float64)
        expected = torch.tensor([ref._l2_error(h64, width, a, b) for a, b in cands], dtype=torch.float64)
        scale = expected.abs().max()
        assert torch.allclose(ours, expected, rtol=1e-12, atol=float(scale) * 1e-13), c


def test_errors_in_one_pass_are_tails_plus_inside() -> None:
    """`_errors` (the first candidates, inside and tails in one pass) gives exactly what
    `_tail_errors` and `_inside_errors` give."""
    hist = _histograms(8, 4096)
    gen = torch.Generator().manual_seed(8)
    left = torch.randint(0, 4096, (hist.shape[0], 9), generator=gen)
    right = torch.minimum(left + torch.randint(0, 4096, left.shape, generator=gen), torch.tensor(4095))
    moments = _Moments(hist, torch.float64)
    tails, errors = hfmg._errors(moments, left, right)
    base = moments.base[:, None].expand_as(left)
    inside = _inside_errors(moments, base.reshape(-1), left.reshape(-1), right.reshape(-1)).view(left.shape)
    assert torch.equal(tails, _tail_errors(moments, moments.base[:, None], left, right))
    assert torch.equal(errors, tails + inside)


@pytest.mark.parametrize("bins", [16, 1024, 4096])
@pytest.mark.parametrize("seed", range(3))
def test_first_host_rounds_are_the_first_rounds(bins: int, seed: int) -> None:
    """`first_host` (the candidates the host search scores up front) gives the first
    rounds of `run_host` and of the tensor rounds, past any stop."""
    hist = _histograms(seed, bins)
    moments = _Moments(hist, torch.float64)
    left, right = hfmg._Cursors(moments).first_host(12)
    all_left, all_right, _ = candidate_ranges(hist)
    count = min(12, all_left.shape[1])
    assert left.shape == right.shape == (hist.shape[0], 12)
    assert torch.equal(left[:, :count], all_left[:, :count])
    assert torch.equal(right[:, :count], all_right[:, :count])
    never = torch.full((hist.shape[0],), math.inf)  # a limit no bound exceeds
    host_done = hfmg._host_done(moments, torch.ones(hist.shape[0]), moments.negative, never)
    host_left, host_right, _ = hfmg._Cursors(moments).run_host(host_done)
    count = min(12, host_left.shape[1])
    assert torch.equal(left[:, :count], host_left[:, :count])
    assert torch.equal(right[:, :count], host_right[:, :count])


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(-3, 50), min_size=16, max_size=300),
    channels=st.integers(1, 3),
    span=st.sampled_from([1e-9, 2e-6, 1.0, 50.0]),
)
def test_search_does_not_depend_on_how_much_is_scored_up_front(counts: list[int], channels: int,
                                                                span: float) -> None:
    """Scoring more or fewer first candidates, seeding or not, host or tensor rounds:
    every candidate that can win is scored, so the clip ranges are the same."""
    hist = torch.stack([torch.tensor(counts).roll(3 * c) for c in range(channels)])
    hist[:, 0] = hist[:, 0].abs() + 1
    hist[:, -1] = hist[:, -1].abs() + 1
    low = torch.linspace(-1, 0.5, channels)
    high = low + span
    expected = search_clip_ranges(hist, low, high)
    variants = [("_FIRST_SCORED", 1), ("_FIRST_SCORED", 40), ("_SEED_AFTER", -1), ("_HOST_ROUND_CHANNELS", 0)]
    for name, value in variants:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hfmg, name, value)
            ours = search_clip_ranges(hist, low, high)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1]), name


# --- whole calibrations against the reference --------------------------------------------


@pytest.mark.parametrize("batch_num", [1, 2, 3])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("granularity", [0, 1])
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    pattern=st.sampled_from(PATTERNS),
    bins=st.sampled_from([1024, 4096]),
    rows=st.integers(1, 60),
    channels=st.integers(1, 3),
)
def test_matches_reference(granularity: int, asymmetric: bool, batch_num: int, seed: int, kind: str,
                           pattern: str, bins: int, rows: int, channels: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batches = make_batches(kind, pattern, batch_num, (2, rows, channels), granularity, gen)
    observer = observe(batches, granularity=granularity, asymmetric=asymmetric, bins=bins)
    assert_state_matches_reference(observer, batches, granularity)
    expected = hfmg_reference(batches, granularity=granularity, asymmetric=asymmetric, num_of_bins=bins)
    assert_same(results(observer), expected)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_matches_reference_8192_bins_and_many_channels(asymmetric: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randn(40, 6, generator=gen) * torch.linspace(0.01, 30, 6) + i for i in range(2)]
    batches[1][:, 0] = batches[0][:, 0]  # one channel keeps its range exactly
    observer = observe(batches, granularity=1, asymmetric=asymmetric, bins=8192)
    assert_state_matches_reference(observer, batches, 1)
    assert_same(results(observer), hfmg_reference(batches, granularity=1, asymmetric=asymmetric, num_of_bins=8192))


def _edge_cases() -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    outliers = torch.randn(50, 4, generator=gen)
    outliers[3, 1], outliers[7, 2] = 1e6, -3e5
    constant_then_spread = [torch.zeros(30, 3), torch.randn(30, 3, generator=gen) - 2.0]
    constant_then_spread[1][:, 2] = 0.0  # stays all-equal in one channel
    mixed = torch.randn(40, 4, generator=gen)
    mixed[:, 1] = 2.5
    mixed[:, 3] = 0.0
    return {
        "all zeros": [torch.zeros(8, 16, 3)],
        "constant": [torch.full((5, 4), 3.25), torch.full((2, 4), 3.25)],
        "one element": [torch.tensor([[0.7]])],
        "one channel": [torch.randn(64, 1, generator=gen)],
        "huge outliers": [outliers],
        "float16": [(torch.randn(30, 5, generator=gen) * 4).half(), (torch.randn(30, 5, generator=gen) * 9).half()],
        "bfloat16": [(torch.randn(3, 20, 4, generator=gen) * 4).bfloat16()],
        "negative dominant": [-torch.rand(50, 3, generator=gen) * 5 + 0.5],
        "constant then spread": constant_then_spread,
        "spread then constant": [torch.randn(30, 3, generator=gen), torch.full((30, 3), -7.0)],
        "lo == hi channels among others": [mixed, mixed * 2],
        "tiny ranges (d < EPS for some candidates)": [
            torch.randn(100, 4, generator=gen) * torch.tensor([1e-9, 3e-6, 1e-5, 3e-5])
        ],
    }


@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("name", list(_edge_cases()))
def test_edge_data(name: str, granularity: int, asymmetric: bool) -> None:
    batches = _edge_cases()[name]
    observer = observe(batches, granularity=granularity, asymmetric=asymmetric, bins=1024)
    assert_state_matches_reference(observer, batches, granularity)
    assert_same(results(observer), hfmg_reference(batches, granularity=granularity, asymmetric=asymmetric,
                                                  num_of_bins=1024))


def test_all_equal_data_gives_the_min_max_of_that_value() -> None:
    zeros = observe([torch.zeros(10, 2)], granularity=1, asymmetric=True, bins=1024).compute()
    assert zeros.scale.tolist() == [1.0, 1.0] and zeros.offset.tolist() == [-128, -128]
    constant = observe([torch.full((10,), 3.25)], granularity=0, asymmetric=False, bins=1024).compute()
    assert constant.scale.tolist() == [pytest.approx(3.25 / 127)] and constant.offset.tolist() == [0]


def test_output_shapes_follow_granularity() -> None:
    x = torch.randn(2, 7, 5)
    per_tensor = observe([x], granularity=0, asymmetric=True, bins=1024).compute()
    per_channel = observe([x], granularity=1, asymmetric=True, bins=1024).compute()
    assert per_tensor.scale.shape == (1,) and per_channel.scale.shape == (5,)
    assert per_channel.offset.shape == (5,)


# --- observer contract -------------------------------------------------------------------


def _state_copy(observer: HfmgObserver) -> list[torch.Tensor]:
    state = observer.state
    assert state is not None
    return [t.clone() for t in state]


def test_compute_is_pure_and_idempotent() -> None:
    gen = torch.Generator().manual_seed(2)
    observer = observe([torch.randn(100, 4, generator=gen), torch.randn(100, 4, generator=gen) * 3],
                       granularity=1, asymmetric=True, bins=1024)
    before = _state_copy(observer)
    first, second = observer.compute(), observer.compute()
    assert torch.equal(first.scale, second.scale) and torch.equal(first.offset, second.offset)
    assert all(torch.equal(a, b) for a, b in zip(before, _state_copy(observer)))


def test_state_and_factors_are_ordinary_tensors() -> None:
    """The observer works under inference mode inside, and hands out ordinary tensors
    that the caller may modify in place; it also runs under the caller's inference mode."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(200, 3, generator=gen) * (1 + i) for i in range(3)]
    observer = observe(batches, granularity=1, asymmetric=True, bins=1024)
    qparams = observer.compute()
    assert observer.state is not None
    assert not any(t.is_inference() for t in (*observer.state, qparams.scale, qparams.offset))
    qparams.scale.mul_(1.0)
    observer.state[2].add_(0)
    with torch.inference_mode():
        inside = observe(batches, granularity=1, asymmetric=True, bins=1024)
        assert torch.equal(inside.compute().scale, qparams.scale)
    assert all(torch.equal(a, b) for a, b in zip(_state_copy(inside), _state_copy(observer)))


def test_batches_past_batch_num_are_ignored() -> None:
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(50, 3, generator=gen) * (1 + i) for i in range(4)]
    observer = observe(batches, granularity=1, asymmetric=False, bins=1024, batch_num=2)
    assert observer.batches_seen == 2
    assert_same(results(observer), hfmg_reference(batches[:2], granularity=1, asymmetric=False, num_of_bins=1024))


def test_too_few_batches_is_an_error() -> None:
    observer = observe([torch.randn(10, 2)], granularity=1, asymmetric=True, bins=1024, batch_num=2)
    with pytest.raises(CalibrationError, match="1 of the 2 batches"):
        observer.compute()


def _tensor_bytes(observer: HfmgObserver) -> int:
    return sum(t.numel() * t.element_size() for t in vars(observer).values() if isinstance(t, torch.Tensor))


def test_memory_does_not_grow_with_batches() -> None:
    gen = torch.Generator().manual_seed(6)
    one = observe([torch.randn(64, 16, generator=gen)], granularity=1, asymmetric=True, bins=2048)
    eight = observe([torch.randn(64, 16, generator=gen) * (1 + i) for i in range(8)],
                    granularity=1, asymmetric=True, bins=2048)
    assert _tensor_bytes(one) == _tensor_bytes(eight) == 16 * (2048 * 8 + 4 + 4)


def test_wrong_parameters_are_rejected() -> None:
    with pytest.raises(TypeError, match="HfmgParams"):
        HfmgObserver(QuantSettings(IfmrParams()))


def test_a_range_too_wide_for_float32_is_an_error() -> None:
    observer = make_observer(QuantSettings(HfmgParams(1024)), "wide")
    with pytest.raises(CalibrationError, match="'wide'.*does not fit float32"):
        observer.update(torch.tensor([-3e38, 3e38]))


# --- merge -------------------------------------------------------------------------------


def _merged(a: list[torch.Tensor], b: list[torch.Tensor], **kw: object) -> HfmgObserver:
    first = observe(a, batch_num=len(a) + len(b), **kw)  # type: ignore[arg-type]
    second = observe(b, batch_num=len(a) + len(b), **kw)  # type: ignore[arg-type]
    first.merge(second)
    return first


def test_merge_of_equal_ranges_is_sequential_accumulation() -> None:
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(200, 3, generator=gen), torch.randn(200, 3, generator=gen)
    b[0], b[1] = a.amin(0), a.amax(0)
    b = torch.clamp(b, a.amin(0), a.amax(0))
    kw = {"granularity": 1, "asymmetric": True, "bins": 1024}
    merged = _merged([a], [b], **kw)
    sequential = observe([a, b], **kw)  # type: ignore[arg-type]
    assert merged.batches_seen == 2
    assert all(torch.equal(x, y) for x, y in zip(_state_copy(merged), _state_copy(sequential)))
    assert merged.compute().scale.tolist() == sequential.compute().scale.tolist()


def test_merge_folds_both_histograms_into_the_union() -> None:
    gen = torch.Generator().manual_seed(9)
    a = [torch.randn(100, 3, generator=gen), torch.randn(100, 3, generator=gen) * 2]
    b = [torch.randn(80, 3, generator=gen) * 3 + 1]
    kw = {"granularity": 1, "asymmetric": False, "bins": 1024}
    ab, ba = _merged(a, b, **kw), _merged(b, a, **kw)
    assert all(torch.equal(x, y) for x, y in zip(_state_copy(ab), _state_copy(ba)))  # order-free
    states_a = hfmg_reference_states(a, granularity=1, num_of_bins=1024)
    states_b = hfmg_reference_states(b, granularity=1, num_of_bins=1024)
    lo, hi, hist = _state_copy(ab)
    scales: list[float] = []
    offsets: list[int] = []
    for c, ((lo_a, hi_a, h_a), (lo_b, hi_b, h_b)) in enumerate(zip(states_a, states_b)):
        lo_u, hi_u = min(lo_a, lo_b), max(hi_a, hi_b)
        mine, theirs = ref.fold_into(h_a, lo_a, hi_a, lo_u, hi_u), ref.fold_into(h_b, lo_b, hi_b, lo_u, hi_u)
        folded = [x + y for x, y in zip(mine, theirs)]
        assert (float(lo[c]), float(hi[c]), hist[c].tolist()) == (float(lo_u), float(hi_u), folded)
        scale, offset = ref.search_channel(lo_u, hi_u, folded, False)
        scales.append(scale)
        offsets.append(offset)
    assert_same(results(ab), (scales, offsets))


def test_merge_into_an_empty_observer_copies() -> None:
    source = observe([torch.randn(30, 2)], granularity=1, asymmetric=True, bins=1024)
    empty = make_observer(source.settings, "layer")
    assert isinstance(empty, HfmgObserver)
    empty.merge(source)
    assert empty.batches_seen == 1
    assert all(torch.equal(x, y) for x, y in zip(_state_copy(empty), _state_copy(source)))
    assert empty.state is not None and source.state is not None
    assert empty.state[2].data_ptr() != source.state[2].data_ptr()  # a copy, not shared


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_batch_is_refused_and_the_state_kept(granularity: int, bad: float, dtype: torch.dtype) -> None:
    # HFMG's own per-channel extrema are what the base class checks for NaN/inf.
    settings = QuantSettings(HfmgParams(num_of_bins=1024), granularity, True, 3)
    observer = make_observer(settings, "model.layers.0.self_attn.k_proj")
    gen = torch.Generator().manual_seed(7)
    observer.update(torch.randn(16, 4, generator=gen).to(dtype))
    state = observer.state
    assert state is not None
    before = [t.clone() for t in state]
    x = (torch.randn(16, 4, generator=gen) * 3).to(dtype)
    x[9, 2] = bad
    with pytest.raises(CalibrationError, match=r"'model\.layers\.0\.self_attn\.k_proj': batch 2 contains NaN or inf"):
        observer.update(x)
    assert observer.batches_seen == 1
    after = observer.state
    assert after is not None
    assert all(torch.equal(a, b) for a, b in zip(before, after))
