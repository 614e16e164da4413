"""ARQ, DMQ and FORCE_FP16 maths against the naive reference of PTQ.md §4–§5 (one channel at a time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ptq_helpers import one_torch_thread  # noqa: F401
from reference_ptq import (
    act_absmax_reference,
    arq_reference,
    dmq_reference,
    force_fp16_reference,
    weight_absmax_reference,
)
from torch import nn

from kvcal.errors import CalibrationError
from kvcal.ptq.weights import (
    activation_channel_absmax,
    arq_scales,
    balance_weight,
    balanced_input_view,
    dmq_factors,
    fake_quant_weight,
    force_fp16,
    input_rows,
    output_rows,
)


def _layer(kind: str, groups: int = 1) -> nn.Module:
    torch.manual_seed(3)
    return {
        "Linear": lambda: nn.Linear(12, 6),
        "Conv2d": lambda: nn.Conv2d(4 * groups, 6 * groups, 3, groups=groups),
        "Conv3d": lambda: nn.Conv3d(4, 5, (1, 2, 2)),
        "ConvTranspose2d": lambda: nn.ConvTranspose2d(4 * groups, 3 * groups, 2, groups=groups),
    }[kind]()


def _weight(kind: str, groups: int = 1) -> torch.Tensor:
    weight = _layer(kind, groups).weight.detach().clone()
    # Make channel 1 negative-dominated and channel 2 constant: both branches of q.
    flat = weight.reshape(weight.shape[0], -1)
    flat[1] = -flat[1].abs() * 3
    flat[2] = 0.25
    return weight


CASES = [
    (kind, bits, channel_wise)
    for kind in ("Linear", "Conv2d", "Conv3d", "ConvTranspose2d")
    for bits in ((6, 7, 8) if kind == "Conv2d" else (8,))
    for channel_wise in (False, True)
]


@pytest.mark.parametrize(("kind", "bits", "channel_wise"), CASES)
def test_arq_matches_the_reference(kind: str, bits: int, channel_wise: bool) -> None:
    weight = _weight(kind)
    scale = arq_scales(output_rows(weight, kind), bits, channel_wise)
    quantized = fake_quant_weight(weight, scale, kind, 1, bits)
    ref_scales, ref_quantized = arq_reference(weight, kind, 1, bits, channel_wise)
    assert scale.tolist() == ref_scales
    assert torch.equal(quantized, ref_quantized)
    assert quantized.dtype == weight.dtype


@pytest.mark.parametrize("kind", ["ConvTranspose2d", "Conv2d"])
@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_layers_have_output_channel_rows(kind: str, groups: int) -> None:
    weight = _weight(kind, groups)
    scale = arq_scales(output_rows(weight, kind, groups), 8, True)
    ref_scales, ref_quantized = arq_reference(weight, kind, groups, 8, True)
    assert scale.tolist() == ref_scales
    assert torch.equal(fake_quant_weight(weight, scale, kind, groups), ref_quantized)
    layer = _layer(kind, groups)
    out_channels = layer.out_channels  # type: ignore[union-attr]
    assert scale.numel() == out_channels


def test_conv_transpose_rows_follow_output_channels() -> None:
    # Output channel g*(C_out/g) + j of a grouped ConvTranspose2d is weight[g*C_in/g : ..., j].
    weight = torch.arange(2 * 3 * 2 * 1 * 1, dtype=torch.float32).reshape(4, 3, 1, 1)  # C_in 4, g 2, C_out 6
    rows = output_rows(weight, "ConvTranspose2d", 2)
    assert rows.tolist() == [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11]]
    assert input_rows(weight, "ConvTranspose2d", 2).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_float16_weights_are_computed_in_float32() -> None:
    weight = _weight("Conv2d").to(torch.float16)
    scale = arq_scales(output_rows(weight, "Conv2d"), 8, True)
    ref_scales, ref_quantized = arq_reference(weight.float(), "Conv2d", 1, 8, True)
    assert scale.tolist() == ref_scales
    quantized = fake_quant_weight(weight, scale, "Conv2d")
    assert quantized.dtype == torch.float16
    assert torch.equal(quantized, ref_quantized.to(torch.float16))


def test_an_all_zero_weight_gets_scale_one() -> None:
    assert arq_scales(torch.zeros(3, 4), 8, True).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("kind", "groups"), [("Linear", 1), ("Conv2d", 1), ("Conv2d", 2), ("Conv3d", 1),
                                              ("ConvTranspose2d", 1), ("ConvTranspose2d", 3)])
def test_input_channel_maxima_and_balance(kind: str, groups: int) -> None:
    weight = _weight(kind, groups)
    wmax = input_rows(weight, kind, groups).abs().amax(dim=1)
    assert wmax.tolist() == weight_absmax_reference(weight, kind, groups)
    f = torch.linspace(0.5, 2.0, wmax.numel())
    balanced = balance_weight(weight, f, kind, groups)
    reference = input_rows(weight, kind, groups) * f.reshape(-1, 1)
    assert torch.equal(input_rows(balanced, kind, groups), reference)


@pytest.mark.parametrize(("kind", "shape"), [("Linear", (2, 5, 7)), ("Linear", (7,)), ("Conv2d", (2, 7, 3, 3)),
                                             ("Conv3d", (2, 7, 2, 3, 3))])
def test_activation_channel_maxima_and_the_balanced_input(kind: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    assert activation_channel_absmax(x, kind).tolist() == act_absmax_reference(x, kind)
    f = torch.linspace(0.5, 2.0, 7)
    divided = x / balanced_input_view(f, kind, x.dim())
    channel = -1 if kind == "Linear" else 1
    assert torch.equal(divided.select(channel, 3), x.select(channel, 3) / f[3])


def _factors(a: list[float], w: list[float], alpha: float) -> list[float]:
    return dmq_factors(torch.tensor(a), torch.tensor(w), alpha, "layer").tolist()


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_dmq_factors_match_the_reference(alpha: float) -> None:
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(16, generator=gen) * 10).tolist()
    w = (torch.rand(16, generator=gen) * 0.5).tolist()
    np.testing.assert_allclose(_factors(a, w, alpha), dmq_reference(a, w, alpha), rtol=2e-6)


@pytest.mark.parametrize(
    ("a", "w"),
    [
        ([3.0, 0.0, 1.5, 2.0], [0.5, 0.2, 0.4, 0.1]),  # an activation channel that is zero
        ([3.0, 1.0, 1.5, 2.0], [0.5, 0.0, 0.4, 0.1]),  # a weight channel that is zero
        ([3.0, 0.0, 1.5, 2.0], [0.5, 0.0, 0.4, 0.1]),  # both zero in one channel
        ([3.0, 0.0, 1.5, 0.0], [0.0, 0.2, 0.4, 0.0]),  # all three cases at once
        ([1e-8, 1.0], [0.5, 0.5]),  # a tiny activation whose s is still >= eps
    ],
)
def test_dmq_edge_cases(a: list[float], w: list[float]) -> None:
    got = _factors(a, w, 0.5)
    np.testing.assert_allclose(got, dmq_reference(a, w, 0.5), rtol=2e-6)
    both = [j for j in range(len(a)) if a[j] == 0 and w[j] == 0]
    assert all(got[j] == 1.0 for j in both)


def test_dmq_without_a_usable_channel_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="'layer'.*no input channel"):
        _factors([0.0, 0.0], [0.5, 0.2], 0.5)


def test_dmq_factor_out_of_range_is_an_error_naming_the_layer() -> None:
    with pytest.raises(CalibrationError, match=r"layer 'layer': DMQ factor .* input channel 0"):
        _factors([1e30, 1.0], [1e-6, 1.0], 0.8)


@pytest.mark.parametrize(
    "scale",
    [0.01, 0.0318757, 1.0, 3.14159, 65504.0, 65519.0, 65520.0, 70000.0, 1e6, 2.0**-14, 2.0**-14 * 0.999, 1e-6, 1e-9],
)
def test_force_fp16_matches_the_reference(scale: float) -> None:
    got = force_fp16(torch.tensor([scale], dtype=torch.float32)).item()
    assert got == force_fp16_reference(scale)
    assert np.isfinite(got) and got > 0


def test_force_fp16_takes_the_sqrt_branch_outside_the_normal_range() -> None:
    for value in (1e6, 1e-6):  # float16(1e6) is inf, float16(1e-6) subnormal
        root = np.float32(np.float16(np.sqrt(np.float32(value))))
        assert force_fp16(torch.tensor([value])).item() == float(root * root)
    assert force_fp16(torch.tensor([65504.0])).item() == 65504.0  # the largest float16: direct
