"""IFMR loss brackets (kvcal.observers.ifmr_prune) against every candidate's exact loss, and
the pruned search against the naive reference."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ifmr import KINDS, assert_matches_reference, ifmr_settings, make_data, observe

from kvcal.observers import ifmr as ifmr_module
from kvcal.observers.ifmr import IfmrObserver
from kvcal.observers.ifmr_prune import LossBrackets, loss_brackets
from kvcal.params import QuantSettings

PARAMS = [
    {},
    {"max_percentile": 0.99, "min_percentile": 0.95},
    {"search_range": (0.3, 1.7), "search_step": 0.07, "max_percentile": 0.95},
    {"max_percentile": 1.0, "min_percentile": 1.0},
    {"search_range": (1.0, 2.0), "search_step": 0.5, "max_percentile": 0.51},
]


def candidates(
    x: torch.Tensor, settings_: QuantSettings
) -> tuple[IfmrObserver, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """An observer holding `x` as one channel, its (max_init, min_init), and the candidates'
    (scales, lo, hi) exactly as the search builds them."""
    observer = IfmrObserver(settings_)
    observer._parts = [x.reshape(-1, 1)]
    bounds = observer._initial_bounds(x.numel(), 1)
    return observer, bounds, observer._candidates(*bounds)


def exact_losses(x: torch.Tensor, settings_: QuantSettings) -> torch.Tensor:
    """Every candidate's loss, scored on every value with float64 sums (the search's own definition)."""
    observer, _, (scales, lo, hi) = candidates(x, settings_)
    loss, _, _ = observer._losses(scales, lo, hi, torch.device("cpu"), False, wide=True)
    return loss[:, 0]


def brackets_of(x: torch.Tensor, settings_: QuantSettings, bins: int) -> LossBrackets | None:
    observer, _, (scales, lo, hi) = candidates(x, settings_)
    return loss_brackets(observer._parts, scales[:, 0], lo[:, 0], hi[:, 0], bins)


def assert_brackets_hold(x: torch.Tensor, settings_: QuantSettings, bins: int) -> LossBrackets | None:
    loss = exact_losses(x, settings_)
    brackets = brackets_of(x, settings_, bins)
    if brackets is None:
        # Only where every clip range is the single point 0 (e.g. a zero median with
        # max_percentile 0.51 on relu data): then every candidate is the same.
        assert bool((loss == loss[0]).all())
        return None
    # The float64 sums of the exact losses carry ~1e-16 relative error of their own.
    assert bool((brackets.low <= loss * (1 + 1e-12)).all()), (brackets.low - loss).max()
    assert bool((loss <= brackets.high * (1 + 1e-12)).all()), (loss - brackets.high).max()
    return brackets


@pytest.mark.parametrize(("kind", "asymmetric"), list(itertools.product(KINDS, [True, False])))
@pytest.mark.parametrize("params", range(len(PARAMS)))
@pytest.mark.parametrize("bins", [16, 300, 1 << 16])
def test_brackets_hold_every_exact_loss(kind: str, asymmetric: bool, params: int, bins: int) -> None:
    # Coarse bins (wider than a quantization step) and fine ones; float16 and float32.
    for seed, dtype, spread in [(1, torch.float32, 1.0), (2, torch.float16, 1e-3), (3, torch.float32, 50.0)]:
        x = make_data(kind, (3000,), seed=seed, spread=spread).to(dtype)
        assert_brackets_hold(x, ifmr_settings(0, asymmetric, **PARAMS[params]), bins)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_brackets_hold_on_rounding_boundaries_and_clip_bounds(asymmetric: bool) -> None:
    # Values exactly at, and one float32 step either side of, every candidate's rounding
    # boundaries and clip bounds: where float32 division can pick the other code.
    base = make_data("normal", (2000,), seed=5)
    settings_ = ifmr_settings(0, asymmetric)
    _, (max_init, min_init), (scales, lo, hi) = candidates(base, settings_)
    points = []
    for i in range(0, scales.shape[0], 6):
        s = scales[i, 0]
        codes = torch.arange(-130, 131, 7, dtype=torch.float32)
        points += [(codes + 0.5) * s, lo[min(i, lo.shape[0] - 1)], hi[i]]
    edges = torch.cat([p.reshape(-1) for p in points])
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    near = near[(near >= min_init) & (near <= max_init)]
    x = torch.cat([base, near])
    assert_brackets_hold(x, settings_, 1 << 16)
    assert_brackets_hold(x, settings_, 512)


def test_brackets_keep_few_candidates_on_large_data() -> None:
    # What the pruning is for: a million values, the default 61 candidates.
    x = make_data("normal", (1 << 20,), seed=9)
    brackets = assert_brackets_hold(x, ifmr_settings(0, True), 1 << 16)
    assert brackets is not None
    kept = int((brackets.low <= brackets.high.min()).sum())
    assert 1 <= kept <= 3
    assert float(((brackets.high - brackets.low) / brackets.high).max()) < 2e-3


def test_no_brackets_for_a_degenerate_range() -> None:
    zeros = torch.zeros(1000)
    assert brackets_of(zeros, ifmr_settings(0, True), 64) is None


@pytest.fixture
def prune_small(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Prune from 64 values x candidates on, and record (kept, candidates) of each pruned search."""
    monkeypatch.setattr(ifmr_module, "_PRUNE_MIN_WORK", 64)
    seen: list[tuple[int, int]] = []
    real = ifmr_module.loss_brackets

    def spy(parts, scales, lo, hi):  # type: ignore[no-untyped-def]
        brackets = real(parts, scales, lo, hi, 512)
        if brackets is not None:
            seen.append((int((brackets.low <= brackets.high.min()).sum()), scales.numel()))
        return brackets

    monkeypatch.setattr(ifmr_module, "loss_brackets", spy)
    return seen


@pytest.mark.parametrize(("kind", "asymmetric"), list(itertools.product(KINDS, [True, False])))
@pytest.mark.parametrize("params", range(len(PARAMS)))
def test_pruned_search_matches_reference(prune_small: list[tuple[int, int]], kind: str, asymmetric: bool,
                                         params: int) -> None:
    batches = [make_data(kind, (n,), seed=n) for n in (700, 1, 301)]
    settings_ = ifmr_settings(0, asymmetric, len(batches), **PARAMS[params])
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)
    # Every parameter set but the last (2 candidates) has enough candidates to prune.
    assert len(prune_small) == (0 if params == len(PARAMS) - 1 else 1)


def test_pruning_does_prune(prune_small: list[tuple[int, int]]) -> None:
    batches = [make_data("normal", (4000,), seed=1)]
    settings_ = ifmr_settings(0, True)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)
    assert len(prune_small) == 1
    kept, candidates = prune_small[0]
    assert candidates == 61 and kept < candidates


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    asymmetric=st.booleans(),
    n=st.integers(min_value=64, max_value=3000),
    seed=st.integers(min_value=0, max_value=10_000),
    spread=st.sampled_from([1e-4, 1.0, 300.0]),
    max_percentile=st.sampled_from([1.0, 0.999999, 0.99, 0.9]),
)
def test_pruned_equals_exhaustive(kind: str, asymmetric: bool, n: int, seed: int, spread: float,
                                  max_percentile: float) -> None:
    x = make_data(kind, (n,), seed=seed, spread=spread)
    settings_ = ifmr_settings(0, asymmetric, max_percentile=max_percentile)
    exhaustive = observe([x], settings_).compute()
    original = ifmr_module._PRUNE_MIN_WORK
    ifmr_module._PRUNE_MIN_WORK = 64
    try:
        pruned = observe([x], settings_).compute()
    finally:
        ifmr_module._PRUNE_MIN_WORK = original
    assert torch.equal(pruned.scale, exhaustive.scale)
    assert torch.equal(pruned.offset, exhaustive.offset)


def test_a_bracket_that_misses_falls_back_to_every_candidate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Brackets claiming candidate 0 alone can win, with a loss no candidate has: the exact
    # scoring of candidate 0 disagrees, and the search scores every candidate instead.
    monkeypatch.setattr(ifmr_module, "_PRUNE_MIN_WORK", 64)

    def wrong(parts, scales, lo, hi):  # type: ignore[no-untyped-def]
        low = torch.full((scales.numel(),), 1e30, dtype=torch.float64)
        low[0] = 0.0
        return LossBrackets(low=low, high=torch.full_like(low, 1e-30))

    monkeypatch.setattr(ifmr_module, "loss_brackets", wrong)
    batches = [make_data("heavy", (2000,), seed=4)]
    settings_ = ifmr_settings(0, True)
    with caplog.at_level(logging.DEBUG, logger="kvcal.observers.ifmr"):
        result = observe(batches, settings_).compute()
    assert_matches_reference(result, batches, settings_)
    assert "missed its exact loss" in caplog.text


def test_no_pruning_for_several_channels_or_little_work(
    prune_small: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ifmr_module, "_PRUNE_MIN_WORK", 2000)
    per_channel = [make_data("normal", (500, 4), seed=2)]
    observe(per_channel, ifmr_settings(1, True)).compute()
    few = [make_data("normal", (30,), seed=3)]  # 30 values x 61 candidates < 2000
    observe(few, ifmr_settings(0, True)).compute()
    coarse = [make_data("normal", (500,), seed=4)]
    observe(coarse, ifmr_settings(0, True, search_range=(0.5, 1.5), search_step=0.2)).compute()  # 5 < 8 candidates
    assert prune_small == []


def test_nan_brackets_rule_nothing_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # A NaN bound must keep its candidate: here candidate 3 (the others claim to lose).
    monkeypatch.setattr(ifmr_module, "_PRUNE_MIN_WORK", 64)
    kept: list[int] = []
    real = ifmr_module.IfmrObserver._exact_search

    def spy(self, scales, lo, hi, device, lo_floor, brackets=None):  # type: ignore[no-untyped-def]
        kept.append(scales.shape[0])
        return real(self, scales, lo, hi, device, lo_floor, brackets)

    def nan_bounds(parts, scales, lo, hi):  # type: ignore[no-untyped-def]
        low = torch.full((scales.numel(),), 1e300, dtype=torch.float64)
        low[0], low[3] = 0.0, float("nan")
        return LossBrackets(low=low, high=torch.full_like(low, 1e299))

    monkeypatch.setattr(ifmr_module, "loss_brackets", nan_bounds)
    monkeypatch.setattr(ifmr_module.IfmrObserver, "_exact_search", spy)
    observe([make_data("normal", (500,), seed=6)], ifmr_settings(0, True)).compute()
    assert kept[0] == 2  # candidates 0 and 3 scored exactly (then their brackets fail: all 61)
    assert kept[1:] == [61]
