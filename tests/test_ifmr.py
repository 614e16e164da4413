"""IfmrObserver against the naive reference of ALGORITHMS.md "IFMR", plus its edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ifmr import ifmr_reference

from kvcal.errors import CalibrationError, ConfigError
from kvcal.observers import ifmr as ifmr_module
from kvcal.observers.ifmr import IfmrObserver, candidate_ratios, percentile_rank
from kvcal.params import HfmgParams, IfmrParams, QuantSettings
from kvcal.quant import QParams, to_channels

KINDS = ("normal", "uniform", "heavy", "relu", "negative", "integers", "outliers", "skewed")


def make_data(kind: str, shape: tuple[int, ...], seed: int, spread: float = 1.0) -> torch.Tensor:
    """Random float32 data of one of several shapes of distribution."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=gen)
    if kind == "normal":
        x = normal
    elif kind == "uniform":
        x = torch.rand(shape, generator=gen) * 2 - 0.5
    elif kind == "heavy":
        x = normal * torch.exp(torch.randn(shape, generator=gen))
    elif kind == "relu":
        x = torch.clamp(normal, min=0.0)
    elif kind == "negative":
        x = -normal.abs() - 0.1
    elif kind == "integers":
        x = torch.randint(-6, 9, shape, generator=gen).to(torch.float32)
    elif kind == "outliers":
        mask = torch.rand(shape, generator=gen) < 0.01
        x = torch.where(mask, normal * 1000.0, normal)
    elif kind == "skewed":
        x = normal * 0.1 + 3.0
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return x * spread


def ifmr_settings(
    granularity: int = 0, asymmetric: bool = True, batch_num: int = 1, **params: object
) -> QuantSettings:
    return QuantSettings(
        params=IfmrParams(**params),  # type: ignore[arg-type]
        granularity=granularity,
        asymmetric=asymmetric,
        batch_num=batch_num,
    )


def observe(batches: list[torch.Tensor], settings_: QuantSettings, name: str = "") -> IfmrObserver:
    observer = IfmrObserver(settings_, name)
    for batch in batches:
        observer.update(batch)
    return observer


def assert_matches_reference(qparams: QParams, batches: list[torch.Tensor], settings_: QuantSettings) -> None:
    params = settings_.params
    assert isinstance(params, IfmrParams)
    scales, offsets = ifmr_reference(
        batches,
        granularity=settings_.granularity,
        asymmetric=settings_.asymmetric,
        max_percentile=params.max_percentile,
        min_percentile=params.min_percentile,
        search_range=params.search_range,
        search_step=params.search_step,
    )
    assert qparams.scale.dtype == torch.float32
    assert qparams.offset.dtype == torch.int32
    assert qparams.scale.shape == (len(scales),)
    torch.testing.assert_close(qparams.scale, torch.tensor(scales, dtype=torch.float32), rtol=1e-6, atol=0.0)
    assert qparams.offset.tolist() == offsets


# --- differential tests -------------------------------------------------------------


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("batch_num", [1, 2, 3])
@pytest.mark.parametrize("kind", ["normal", "heavy", "skewed"])
def test_matches_reference(granularity: int, asymmetric: bool, batch_num: int, kind: str) -> None:
    # Ranges grow from batch to batch, so later batches move the percentile bounds.
    batches = [make_data(kind, (2, 37, 6), seed=10 * batch_num + i, spread=1.0 + i) for i in range(batch_num)]
    settings_ = ifmr_settings(granularity, asymmetric, batch_num)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize(
    "params",
    [
        {"max_percentile": 0.99, "min_percentile": 0.99},
        {"max_percentile": 0.9, "min_percentile": 0.999},
        {"max_percentile": 1.0, "min_percentile": 0.51},
        {"search_range": (0.5, 1.0), "search_step": 0.05},
        {"search_range": (0.9, 1.1), "search_step": 0.003},
        {"search_range": (1.0, 2.5), "search_step": 1.5},
        {"search_range": (0.3, 1.7), "search_step": 0.07, "max_percentile": 0.95},
    ],
)
def test_matches_reference_non_default(granularity: int, asymmetric: bool, params: dict[str, object]) -> None:
    batches = [make_data("outliers", (50, 4), seed=3), make_data("normal", (31, 4), seed=4, spread=2.0)]
    settings_ = ifmr_settings(granularity, asymmetric, 2, **params)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


_percentiles = st.one_of(
    st.sampled_from([0.999999, 0.99, 0.9, 1.0, 0.51]),
    st.floats(min_value=0.5, max_value=1.0, exclude_min=True),
)


@st.composite
def ifmr_cases(draw: st.DrawFn) -> tuple[list[torch.Tensor], QuantSettings]:
    granularity = draw(st.sampled_from([0, 1]))
    channels = draw(st.integers(1, 6))
    batch_num = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([1e-3, 1.0, 37.0]))
    batches = []
    for i in range(batch_num):
        rows = draw(st.integers(1, 40))
        lead = draw(st.sampled_from([(), (2,), (1, 3)]))
        batches.append(make_data(kind, (*lead, rows, channels), seed + i, spread * (1.0 + 0.5 * i)))
    start = draw(st.floats(min_value=0.2, max_value=1.5))
    width = draw(st.floats(min_value=0.05, max_value=1.0))
    steps = draw(st.integers(1, 80))
    end = start + width
    settings_ = ifmr_settings(
        granularity,
        draw(st.booleans()),
        batch_num,
        max_percentile=draw(_percentiles),
        min_percentile=draw(_percentiles),
        search_range=(start, end),
        search_step=(end - start) / steps,
    )
    return batches, settings_


@settings(max_examples=60, deadline=None)
@given(ifmr_cases())
def test_matches_reference_random(case: tuple[list[torch.Tensor], QuantSettings]) -> None:
    batches, settings_ = case
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("asymmetric", [True, False])
def test_many_chunks_and_tiny_batches(monkeypatch: pytest.MonkeyPatch, granularity: int, asymmetric: bool) -> None:
    # Tiny budgets force the streaming paths: several loss chunks, several percentile
    # chunks with a running top-k, and tiny batches glued into one chunk.
    monkeypatch.setattr(ifmr_module, "_LOSS_BUDGET_CPU", 7 * 60 * 3)
    monkeypatch.setattr(ifmr_module, "_PERCENTILE_BUDGET", 24)
    batches = [make_data("heavy", (n, 3), seed=n) for n in (1, 2, 1, 40, 3, 1, 25, 1)]
    settings_ = ifmr_settings(granularity, asymmetric, len(batches), max_percentile=0.97, min_percentile=0.9)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


def test_large_rank_percentiles_over_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ifmr_module, "_PERCENTILE_BUDGET", 64)
    batches = [make_data("uniform", (300,), seed=1), make_data("normal", (500,), seed=2)]
    settings_ = ifmr_settings(0, True, 2, max_percentile=0.6, min_percentile=0.75)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocks_limit", [1 << 20, 40])
def test_per_tensor_percentile_threshold_filter(monkeypatch: pytest.MonkeyPatch, kind: str, blocks_limit: int) -> None:
    # Small blocks put the block-maxima filter to work on small data (and a small limit
    # sends data with many equal values back to the running top-k).
    monkeypatch.setattr(ifmr_module, "_THRESHOLD_BLOCK", 7)
    monkeypatch.setattr(ifmr_module, "_THRESHOLD_BLOCKS_LIMIT", blocks_limit)
    filtered: list[bool] = []
    real = ifmr_module._kth_extremes_by_threshold

    def spy(*args: object) -> object:
        found = real(*args)  # type: ignore[arg-type]
        filtered.append(found is not None)
        return found

    monkeypatch.setattr(ifmr_module, "_kth_extremes_by_threshold", spy)
    batches = [make_data(kind, (n,), seed=n) for n in (333, 64, 1, 501)]
    settings_ = ifmr_settings(0, True, len(batches), max_percentile=0.99, min_percentile=0.97)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)
    # Integers' ties and relu's many zeros keep more than 40 blocks: those go back to the
    # running top-k; the other kinds keep 9 + 27 blocks and are filtered.
    assert filtered == [blocks_limit > 40 or kind not in ("integers", "relu")]


@pytest.mark.parametrize("seed", range(6))
def test_threshold_filter_gives_the_kth_extremes(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(ifmr_module, "_THRESHOLD_BLOCK", 5)
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(-20, 20, (n, 1), generator=gen).to(torch.float16) for n in (97, 3, 200)]
    values = torch.cat(parts).reshape(-1).to(torch.float32).sort().values
    for k_max, k_min in [(1, 9), (7, 1), (30, 30), (59, 2)]:
        found = ifmr_module._kth_extremes_by_threshold(parts, k_max, k_min)
        assert found is not None
        assert float(found[0]) == float(values[-k_max]) and float(found[1]) == float(values[k_min - 1])
    assert ifmr_module._kth_extremes_by_threshold(parts, 200, 1) is None  # fewer blocks than k


def test_near_tie_resolved_beyond_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # max_init is tiny next to |min_init|: both candidates' losses agree to 3e-8 relative,
    # which float32 sums cannot tell apart; the exact argmin is the second candidate.
    data = [make_data("normal", (1410,), seed=14, spread=1e-3)]
    settings_ = ifmr_settings(0, True, max_percentile=0.51, search_range=(1.0, 2.0), search_step=0.5)
    assert_matches_reference(observe(data, settings_).compute(), data, settings_)
    # The data really is such a near-tie: float32 sums alone pick the other candidate.
    monkeypatch.setattr(ifmr_module, "_FLOAT64_DEVICES", ())
    with pytest.raises(AssertionError):
        assert_matches_reference(observe(data, settings_).compute(), data, settings_)


@pytest.mark.parametrize("bound", [0.01, 10.0])
@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("asymmetric", [True, False])
def test_refinement_with_any_number_of_contenders(
    monkeypatch: pytest.MonkeyPatch, bound: float, granularity: int, asymmetric: bool
) -> None:
    # A loose bound re-scores a few candidates per channel; 10 re-scores every candidate.
    monkeypatch.setattr(ifmr_module, "_sum_error_bound", lambda terms, partials: bound)
    batches = [make_data(kind, (30, 5), seed=i) for i, kind in enumerate(["heavy", "integers", "relu"])]
    for kind_batches in ([batches[0]], [batches[1]], [batches[2]]):
        settings_ = ifmr_settings(granularity, asymmetric, search_range=(0.5, 1.5), search_step=0.05)
        assert_matches_reference(observe(kind_batches, settings_).compute(), kind_batches, settings_)


def test_sum_error_bound() -> None:
    assert ifmr_module._sum_error_bound(1, 1) == pytest.approx(1e-15)
    u32, u64 = 2.0**-24, 2.0**-53
    low, high = 4096 * u32 / (1 - 4096 * u32), 9 * u64 / (1 - 9 * u64)
    assert ifmr_module._sum_error_bound(4097, 10) == pytest.approx(low + high + low * high, rel=1e-9)
    assert ifmr_module._sum_error_bound(2**25, 1) == math.inf


# --- edge data ------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize(
    "data",
    [
        torch.zeros(4, 5),
        torch.full((3, 5), 2.5),
        torch.full((3, 5), -0.75),
        torch.tensor([[0.3]]),
        torch.tensor([[-4.0]]),
        make_data("normal", (64, 1), seed=5),
        torch.cat([make_data("normal", (60, 2), seed=6), torch.tensor([[1e15, -3e14]])]),
        torch.cat([make_data("normal", (60, 2), seed=7), torch.tensor([[1e30, 2.0]])]),
        torch.tensor([[1e-30, -1e-30], [0.0, 1e-38]]),
    ],
    ids=["zeros", "const-pos", "const-neg", "one-pos", "one-neg", "one-channel", "outliers", "inf-loss", "tiny"],
)
def test_edge_data_matches_reference(granularity: int, asymmetric: bool, data: torch.Tensor) -> None:
    settings_ = ifmr_settings(granularity, asymmetric)
    qparams = observe([data], settings_).compute()
    assert bool(torch.isfinite(qparams.scale).all())
    assert_matches_reference(qparams, [data], settings_)


@pytest.mark.parametrize("granularity", [0, 1])
def test_all_zeros_gives_degenerate_scale(granularity: int) -> None:
    asym = observe([torch.zeros(3, 4)], ifmr_settings(granularity, True)).compute()
    sym = observe([torch.zeros(3, 4)], ifmr_settings(granularity, False)).compute()
    channels = 1 if granularity == 0 else 4
    assert asym.scale.tolist() == [1.0] * channels
    assert asym.offset.tolist() == [-128] * channels
    assert sym.scale.tolist() == [1.0] * channels
    assert sym.offset.tolist() == [0] * channels


def test_constant_negative_asymmetric() -> None:
    # max_init clamps to 0, so every candidate has the scale -v/255: the first one wins.
    qparams = observe([torch.full((10,), -0.5)], ifmr_settings(0, True)).compute()
    expected = (torch.tensor(0.0) - torch.tensor(-0.5)) / 255.0
    assert qparams.scale.item() == expected.item()
    assert qparams.offset.item() == -round(-0.5 / expected.item()) - 128 == 127


def test_negative_dominant_symmetric_divides_by_128() -> None:
    data = torch.cat([torch.linspace(-2.0, 0.9, 2000), torch.tensor([-2.0, 0.9])])
    qparams = observe([data], ifmr_settings(0, False)).compute()
    ratios = candidate_ratios(0.7, 1.3, 0.01)
    by_128 = ratios * torch.tensor(2.0) / 128.0
    by_127 = ratios * torch.tensor(2.0) / 127.0
    scale = qparams.scale[0]
    assert bool((by_128 == scale).any())
    assert not bool((by_127 == scale).any())
    assert qparams.offset.tolist() == [0]


def test_scale_is_one_of_the_candidates() -> None:
    data = make_data("normal", (500,), seed=11)
    qparams = observe([data], ifmr_settings(0, True, max_percentile=1.0, min_percentile=1.0)).compute()
    max_init, min_init = data.max(), data.min()
    ratios = candidate_ratios(0.7, 1.3, 0.01)
    candidates = (ratios * max_init - min_init) / 255.0
    assert bool((candidates == qparams.scale[0]).any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", [0, 1])
def test_half_precision_kept_in_own_dtype(dtype: torch.dtype, granularity: int) -> None:
    batches = [make_data("heavy", (3, 20, 4), seed=s).to(dtype) for s in (1, 2)]
    settings_ = ifmr_settings(granularity, True, 2)
    observer = observe(batches, settings_)
    assert observer.stored_dtypes == [dtype, dtype]
    assert_matches_reference(observer.compute(), batches, settings_)


def test_mixed_dtypes_across_batches() -> None:
    batches = [make_data("normal", (30, 3), seed=1).to(torch.float16), make_data("normal", (30, 3), seed=2)]
    settings_ = ifmr_settings(1, False, 2)
    observer = observe(batches, settings_)
    assert observer.stored_dtypes == [torch.float16, torch.float32]
    assert_matches_reference(observer.compute(), batches, settings_)


# --- observer contract ----------------------------------------------------------------


def test_compute_is_idempotent_and_pure() -> None:
    batches = [make_data("normal", (40, 3), seed=s) for s in (1, 2)]
    observer = observe(batches, ifmr_settings(1, True, 2))
    first = observer.compute()
    second = observer.compute()
    assert torch.equal(first.scale, second.scale)
    assert torch.equal(first.offset, second.offset)
    assert observer.batches_seen == 2
    assert observer.stored_dtypes == [torch.float32, torch.float32]


@pytest.mark.parametrize("granularity", [0, 1])
@pytest.mark.parametrize("transposed", [False, True])
def test_input_modified_after_update_does_not_change_result(granularity: int, transposed: bool) -> None:
    # Contiguous input is copied flat, a non-contiguous view (transposed) by `contiguous()`.
    base = make_data("normal", (3, 40) if transposed else (40, 3), seed=1)
    data = base.t() if transposed else base
    settings_ = ifmr_settings(granularity, True)
    expected = observe([data.clone()], settings_).compute()
    observer = observe([data], settings_)
    base.mul_(10.0)
    assert torch.equal(observer.compute().scale, expected.scale)
    assert torch.equal(observer.compute().offset, expected.offset)


@pytest.mark.parametrize("granularity", [0, 1])
def test_merge_equals_single_run(granularity: int) -> None:
    batches = [make_data("heavy", (25, 5), seed=s, spread=1.0 + s) for s in range(3)]
    settings_ = ifmr_settings(granularity, True, 3)
    single = observe(batches, settings_).compute()
    left = observe(batches[:1], settings_)
    right = observe(batches[1:], settings_)
    left.merge(right)
    assert left.batches_seen == 3
    merged = left.compute()
    assert torch.equal(merged.scale, single.scale)
    assert torch.equal(merged.offset, single.offset)
    assert right.batches_seen == 2  # the merged-in observer is left as it was


def test_merge_into_empty_observer() -> None:
    batches = [make_data("normal", (25, 2), seed=s) for s in range(2)]
    settings_ = ifmr_settings(1, False, 2)
    empty = IfmrObserver(settings_)
    empty.merge(observe(batches, settings_))
    assert empty.channels == 2
    assert torch.equal(empty.compute().scale, observe(batches, settings_).compute().scale)


def test_batches_past_batch_num_are_ignored() -> None:
    batches = [make_data("normal", (30, 2), seed=s) for s in range(2)]
    settings_ = ifmr_settings(0, True, 2)
    expected = observe(batches, settings_).compute()
    observer = observe([*batches, batches[0] * 100.0, torch.full((3, 2), 1e6)], settings_)
    assert observer.batches_seen == 2
    assert len(observer.stored_dtypes) == 2
    assert torch.equal(observer.compute().scale, expected.scale)


def test_compute_before_batch_num_is_an_error() -> None:
    observer = observe([make_data("normal", (10,), seed=1)], ifmr_settings(0, True, 3))
    with pytest.raises(CalibrationError, match="1 of the 3"):
        observer.compute()


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool])
def test_rejected_dtypes(dtype: torch.dtype) -> None:
    observer = IfmrObserver(ifmr_settings(), "layers.0.k_proj")
    with pytest.raises(TypeError, match=str(dtype)):
        observer.update(torch.zeros(4, dtype=dtype))
    assert observer.batches_seen == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_data_names_the_layer(bad: float) -> None:
    observer = IfmrObserver(ifmr_settings(), "model.layers.3.v_proj")
    data = torch.ones(2, 8)
    data[1, 3] = bad
    with pytest.raises(CalibrationError, match=r"model\.layers\.3\.v_proj.*NaN or inf"):
        observer.update(data)


def test_mismatched_channel_counts() -> None:
    observer = IfmrObserver(ifmr_settings(1, True, 2), "k_proj")
    observer.update(torch.ones(3, 4))
    with pytest.raises(CalibrationError, match="'k_proj'.*3 channels.*had 4"):
        observer.update(torch.ones(4, 3))


def test_per_tensor_accepts_changing_shapes() -> None:
    batches = [make_data("normal", (3, 4), seed=1), make_data("normal", (7,), seed=2)]
    settings_ = ifmr_settings(0, True, 2)
    assert_matches_reference(observe(batches, settings_).compute(), batches, settings_)


def test_needs_ifmr_params() -> None:
    with pytest.raises(TypeError, match="HfmgParams"):
        IfmrObserver(QuantSettings(params=HfmgParams()))


# --- helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percentile", "n", "expected"),
    [
        (0.999999, 1, 1),
        (0.999999, 4194304, 5),
        (0.999999, 4096, 1),
        (1.0, 1000, 1),
        (1.0 - 1e-8, 10**9, 1),  # 1 - p < EPS
        (0.99, 1000, 10),
        (0.9, 7, 7 - int(0.9 * 7)),
        (0.51, 1, 1),
        (0.51, 2, 1),
        (0.51, 3, 2),
    ],
)
def test_percentile_rank(percentile: float, n: int, expected: int) -> None:
    assert percentile_rank(percentile, n) == expected


def test_default_candidates_are_the_61_ratios_of_the_spec() -> None:
    ratios = candidate_ratios(0.7, 1.3, 0.01)
    assert ratios.dtype == torch.float32
    assert ratios.numel() == 61
    assert ratios[-1].item() == pytest.approx(1.2999999523, abs=1e-10)
    expected = torch.tensor([round(0.70 + i / 100, 2) for i in range(61)], dtype=torch.float32)
    # Each ratio is the float32 nearest its two-decimal value, give or take one ulp.
    torch.testing.assert_close(ratios, expected, rtol=2e-7, atol=0.0)


def test_candidates_follow_search_range_and_step() -> None:
    assert candidate_ratios(0.8, 1.2, 0.02).numel() == 20
    assert candidate_ratios(0.5, 1.0, 0.05).numel() == 10
    assert candidate_ratios(1.0, 2.5, 1.5).tolist() == [1.0]
    assert candidate_ratios(0.9, 1.1, 0.003).numel() == 67


def test_candidates_use_float64_parameters_not_their_float32_roundings() -> None:
    # The defaults: 61 from the float64 values, 60 had they been rounded to float32 first.
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in (0.7, 1.3, 0.01)]
    assert torch.arange(*f32, dtype=torch.float32).numel() == 60
    assert candidate_ratios(0.7, 1.3, 0.01).numel() == 61
    # A range whose float32 ends coincide still has candidates from its float64 values.
    assert candidate_ratios(1.0, 1.00000001, 1e-9).numel() == 10


def test_observer_searches_61_default_candidates() -> None:
    observer = IfmrObserver(ifmr_settings(), "layers.0.k_proj")
    assert observer._ratios.numel() == 61


def test_first_argmin_takes_first_tie_and_skips_nan() -> None:
    loss = torch.tensor(
        [[3.0, math.nan, 1.0, math.inf], [1.0, 2.0, 1.0, math.inf], [1.0, 2.0, 0.5, math.inf]],
        dtype=torch.float64,
    )
    assert ifmr_module._first_argmin(loss).tolist() == [1, 1, 2, 0]


@pytest.mark.parametrize("granularity", [0, 1])
def test_extrema_are_those_of_the_whole_batch(granularity: int) -> None:
    """The NaN/inf check reduces the batch in its memory order: the same min and max."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 50, 16, generator=gen)
    observer = IfmrObserver(ifmr_settings(granularity), "v_proj")
    view = to_channels(x, granularity)
    low, high = observer._extrema(view)
    assert low.dim() == high.dim() == 0
    assert float(low) == float(x.min()) and float(high) == float(x.max())
    x[1, 7, 3] = math.nan
    assert all(math.isnan(float(v)) for v in observer._extrema(to_channels(x, granularity)))
