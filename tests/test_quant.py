"""kvcal.quant against naive scalar versions of ALGORITHMS.md "Min-max", fake-quant and SQNR."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcal.quant import EPS, QParams, fake_quant, minmax_qparams, sqnr_db, to_channels

F32 = np.float32


def naive_minmax(lo: float, hi: float, asymmetric: bool) -> tuple[float, int]:
    """ALGORITHMS.md "Min-max", one channel, float32 scalars, in the order the text gives."""
    lo32, hi32 = F32(lo), F32(hi)
    if asymmetric:
        hi32 = max(hi32, F32(0.0))
        lo32 = min(lo32, F32(0.0))
        scale = (hi32 - lo32) / F32(255)
        if scale < F32(EPS):
            return 1.0, -128
        offset = F32(-128) - lo32 / scale if hi32 != lo32 else F32(-128)
        return float(scale), int(np.rint(offset))
    neg = abs(hi32) < abs(lo32)
    scale = max(abs(hi32), abs(lo32)) / (F32(128) if neg else F32(127))
    if scale < F32(EPS):
        scale = F32(1.0)
    return float(scale), 0


def assert_minmax_matches_naive(lo: list[float], hi: list[float], asymmetric: bool) -> None:
    qparams = minmax_qparams(torch.tensor(lo), torch.tensor(hi), asymmetric)
    assert qparams.scale.dtype == torch.float32
    assert qparams.offset.dtype == torch.int32
    expected = [naive_minmax(a, b, asymmetric) for a, b in zip(lo, hi)]
    assert qparams.scale.tolist() == [scale for scale, _ in expected]
    assert qparams.offset.tolist() == [offset for _, offset in expected]


_bounds = st.one_of(
    st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, 1e-38, -1e-38, 1e-6, -1e-6, 3e-5, -3e-5, 1.0, -1.0, 127.0, -128.0]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_bounds, _bounds), min_size=1, max_size=20), st.booleans())
def test_minmax_matches_naive(pairs: list[tuple[float, float]], asymmetric: bool) -> None:
    # Sorted pairs are real clip ranges; the rule itself does not need lo <= hi.
    pairs = [(min(a, b), max(a, b)) if i % 2 else (a, b) for i, (a, b) in enumerate(pairs)]
    assert_minmax_matches_naive([a for a, _ in pairs], [b for _, b in pairs], asymmetric)


@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (-1.0, 1.0),
        (-2.0, 0.5),  # negative side dominates
        (-0.5, 2.0),
        (0.5, 2.0),  # lo above 0: asymmetric clamps it to 0
        (-3.0, -1.0),  # hi below 0
        (0.0, 0.0),  # hi == lo
        (1.5, 1.5),
        (-1e-7, 1e-7),  # degenerate scale
        (-1e-9, 0.0),
        (-5.0, 5.0),  # symmetric tie: divide by 127
    ],
)
def test_minmax_cases(lo: float, hi: float, asymmetric: bool) -> None:
    assert_minmax_matches_naive([lo], [hi], asymmetric)


def test_minmax_known_values() -> None:
    asym = minmax_qparams(torch.tensor([-1.0, 0.0, -2.0]), torch.tensor([3.0, 0.0, 0.0]), True)
    assert asym.scale.tolist() == [float(F32(4.0) / F32(255)), 1.0, float(F32(2.0) / F32(255))]
    # -128 - (-1) / (4/255) = -64.25 -> -64; degenerate -> -128; -128 + 255 = 127.
    assert asym.offset.tolist() == [-64, -128, 127]
    sym = minmax_qparams(torch.tensor([-2.0, -1.0, -1.0]), torch.tensor([1.0, 2.0, 1.0]), False)
    assert sym.scale.tolist() == [float(F32(2.0) / F32(128)), float(F32(2.0) / F32(127)), float(F32(1.0) / F32(127))]
    assert sym.offset.tolist() == [0, 0, 0]


def test_minmax_round_half_to_even() -> None:
    # hi - lo = 255 gives scale 1, so offset = -128 - lo lands on .5 exactly.
    qparams = minmax_qparams(torch.tensor([-0.5, -1.5, -2.5]), torch.tensor([254.5, 253.5, 252.5]), True)
    assert qparams.scale.tolist() == [1.0, 1.0, 1.0]
    assert qparams.offset.tolist() == [-128, -126, -126]  # -127.5 -> -128, -126.5 -> -126, -125.5 -> -126


def naive_fake_quant(x: float, scale: float, offset: int) -> float:
    q = np.clip(np.rint(F32(x) / F32(scale)) + F32(offset), F32(-128), F32(127))
    return float((q - F32(offset)) * F32(scale))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=-8192.0, max_value=8192.0, allow_nan=False, width=32), min_size=2, max_size=40),
    st.booleans(),
)
def test_fake_quant_matches_naive(values: list[float], asymmetric: bool) -> None:
    x = torch.tensor(values).reshape(2, -1) if len(values) % 2 == 0 else torch.tensor(values).reshape(1, -1)
    qparams = minmax_qparams(x.amin(dim=1) * 0.8, x.amax(dim=1) * 0.8, asymmetric)
    out = fake_quant(x, qparams)
    assert out.dtype == torch.float32
    assert out.shape == x.shape
    for c in range(x.shape[0]):
        scale, offset = qparams.scale[c].item(), int(qparams.offset[c])
        assert out[c].tolist() == [naive_fake_quant(v, scale, offset) for v in x[c].tolist()]


def test_fake_quant_grid_points_and_clipping() -> None:
    qparams = QParams(scale=torch.tensor([0.5]), offset=torch.tensor([-10], dtype=torch.int32))
    grid = (torch.arange(-128, 128, dtype=torch.float32) + 10) * 0.5
    assert torch.equal(fake_quant(grid.reshape(1, -1), qparams), grid.reshape(1, -1))
    out = fake_quant(torch.tensor([[1e6, -1e6, 0.3]]), qparams)
    assert out.tolist() == [[(127 + 10) * 0.5, (-128 + 10) * 0.5, 0.5]]


def test_fake_quant_per_channel_and_half_input() -> None:
    qparams = QParams(scale=torch.tensor([1.0, 0.25]), offset=torch.tensor([0, 3], dtype=torch.int32))
    x = torch.tensor([[0.4, 1.6], [0.4, 1.6]], dtype=torch.float16)
    out = fake_quant(x, qparams)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, 2.0], [naive_fake_quant(0.4, 0.25, 3), naive_fake_quant(1.6, 0.25, 3)]]


def test_sqnr_db() -> None:
    x = torch.tensor([1.0, 1.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, torch.tensor([1.1, 0.9])) == pytest.approx(10 * math.log10(2.0 / 0.02), rel=1e-5)
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    half = torch.tensor([3.0, 4.0], dtype=torch.float16)
    assert sqnr_db(half, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0 / 1.0), rel=1e-6)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3), (2, 3, 4), (1, 5, 1, 6)])
def test_to_channels_per_tensor(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    view = to_channels(x, 0)
    assert view.shape == (1, x.numel())
    assert torch.equal(view.reshape(-1), x.reshape(-1))


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 3, 4), (1, 5, 1, 6)])
def test_to_channels_per_channel(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    view = to_channels(x, 1)
    channels = shape[-1]
    assert view.shape == (channels, x.numel() // channels)
    for c in range(channels):
        assert torch.equal(view[c], x[..., c].reshape(-1))
    assert view.data_ptr() == x.data_ptr()  # a view, not a copy


def test_to_channels_per_channel_rejects_scalar() -> None:
    with pytest.raises(ValueError, match="0-d"):
        to_channels(torch.tensor(1.0), 1)


def test_qparams_is_frozen_and_moves_to_cpu() -> None:
    qparams = QParams(scale=torch.tensor([0.5, 0.25], requires_grad=True), offset=torch.tensor([1, 2], dtype=torch.int32))
    assert qparams.channels == 2
    moved = qparams.cpu()
    assert moved.scale.device.type == "cpu"
    assert not moved.scale.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        qparams.scale = torch.tensor([1.0])  # type: ignore[misc]
