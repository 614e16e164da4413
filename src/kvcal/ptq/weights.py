"""Weight maths of PTQ calibration (PTQ.md §4 steps 2–4, §5): ARQ, DMQ, FORCE_FP16 — pure and vectorized.

Layouts: a weight is viewed as rows, one per output channel (`output_rows`, what ARQ
scales) or one per input channel (`input_rows`, what DMQ balances). Linear `[out, in]`;
Conv2d/Conv3d `[C_out, C_in/g, k...]`; ConvTranspose2d `[C_in, C_out/g, k...]`, whose
output channel `g*(C_out/g) + j` is row `g*(C_out/g) + j` of its output rows. Every
function works on all channels at once, in float32 (float16/bfloat16 weights are
computed in float32 and the fake-quantized weight is returned in the weight's dtype).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcal.errors import CalibrationError
from kvcal.ptq.layers import LayerType
from kvcal.quant import EPS

__all__ = [
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "activation_channel_absmax",
    "arq_scales",
    "balance_weight",
    "balanced_input_view",
    "dmq_factors",
    "fake_quant_weight",
    "force_fp16",
    "input_rows",
    "output_rows",
]

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14


def _groups_view(weight: Tensor, groups: int) -> Tensor:
    """`[A, B, k...]` → `[g, A/g, B, k...]`."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def output_rows(weight: Tensor, layer_type: LayerType, groups: int = 1) -> Tensor:
    """One row per output channel: `[C_out, -1]` (a copy for ConvTranspose2d, else a view)."""
    if layer_type != "ConvTranspose2d":
        return weight.reshape(weight.shape[0], -1)
    # [C_in, C_out/g, k...] -> [g, C_in/g, C_out/g, k...] -> [g, C_out/g, C_in/g, k...]
    swapped = _groups_view(weight, groups).transpose(1, 2)
    return swapped.reshape(groups * weight.shape[1], -1)


def _from_output_rows(rows: Tensor, shape: torch.Size, layer_type: LayerType, groups: int) -> Tensor:
    """The inverse of `output_rows`: rows back to the weight's shape."""
    if layer_type != "ConvTranspose2d":
        return rows.reshape(shape)
    c_in, c_out_g = shape[0], shape[1]
    swapped = rows.reshape(groups, c_out_g, c_in // groups, *shape[2:])
    return swapped.transpose(1, 2).reshape(shape)


def input_rows(weight: Tensor, layer_type: LayerType, groups: int = 1) -> Tensor:
    """One row per input channel: `[C_in, -1]` (grouped conv: `[g, C_out/g, C_in/g, k...]` → C_in rows)."""
    if layer_type == "Linear":
        return weight.t()
    if layer_type == "ConvTranspose2d":
        return weight.reshape(weight.shape[0], -1)
    grouped = _groups_view(weight, groups).transpose(1, 2)  # [g, C_in/g, C_out/g, k...]
    return grouped.reshape(groups * weight.shape[1], -1)


def _input_factor_view(factor: Tensor, weight: Tensor, layer_type: LayerType, groups: int) -> tuple[Tensor, Tensor]:
    """(the weight viewed so the factor broadcasts along its input channels, the factor shaped for it)."""
    if layer_type == "Linear":
        return weight, factor.reshape(1, -1)
    tail = [1] * (weight.dim() - 2)
    if layer_type == "ConvTranspose2d":
        return weight, factor.reshape(-1, 1, *tail)
    grouped = _groups_view(weight, groups)  # [g, C_out/g, C_in/g, k...]
    return grouped, factor.reshape(groups, 1, -1, *tail)


def balance_weight(weight: Tensor, factor: Tensor, layer_type: LayerType, groups: int = 1) -> Tensor:
    """`W * f` along the input channels, in float32 (DMQ): the layer's output is unchanged when
    its input is divided by `f`."""
    w = weight.to(torch.float32)
    view, f = _input_factor_view(factor.to(device=w.device, dtype=torch.float32), w, layer_type, groups)
    return (view * f).reshape(weight.shape)


def balanced_input_view(factor: Tensor, layer_type: LayerType, input_dim: int) -> Tensor:
    """`f` shaped to divide a layer input of `input_dim` dimensions: last dim (Linear) or dim 1 (Conv)."""
    if layer_type == "Linear":
        return factor
    return factor.reshape(-1, *([1] * (input_dim - 2)))


def activation_channel_absmax(x: Tensor, layer_type: LayerType) -> Tensor:
    """`max|x|` per input channel, float32 `[C_in]`: over the last dim (Linear) or dim 1 (Conv)."""
    a = x.detach().abs()
    if layer_type == "Linear":
        return a.reshape(-1, a.shape[-1]).amax(dim=0).to(torch.float32)
    dims = [d for d in range(a.dim()) if d != 1]
    return a.amax(dim=dims).to(torch.float32)


def dmq_factors(act_max: Tensor, wts_max: Tensor, alpha: float, layer: str) -> Tensor:
    """The DMQ `tensor_balance_factor` (PTQ.md §5), float32 `[C_in]`.

    `s_j = a_j^α / w_j^(1-α)`, 0 where `w_j < eps`; over the channels with `s_j >= eps`,
    `act_outlier = max(a/s)` and `wts_outlier = max(w*s)`; then channels with `a_j` and
    `w_j` both `< eps` get 1.0, only `a_j < eps` `wts_outlier / w_j`, only `w_j < eps`
    `a_j / act_outlier`.

    Raises:
        CalibrationError: naming `layer`, when an outlier is needed but no channel has
            `s_j >= eps`, or when a factor is outside (EPS, 1/EPS).
    """
    a = act_max.to(torch.float32)
    w = wts_max.to(device=a.device, dtype=torch.float32)
    a_small, w_small = a < EPS, w < EPS
    s = torch.where(w_small, torch.zeros_like(a), a.pow(alpha) / w.pow(1.0 - alpha))
    valid = s >= EPS
    needs_outlier = bool((a_small ^ w_small).any())
    if needs_outlier and not bool(valid.any()):
        raise CalibrationError(
            f"layer {layer!r}: DMQ cannot balance it: no input channel has both a non-zero activation in the "
            "first batch and a non-zero weight"
        )
    ninf = torch.full_like(s, -math.inf)
    act_outlier = torch.where(valid, a / s, ninf).amax()
    wts_outlier = torch.where(valid, w * s, ninf).amax()
    s = torch.where(a_small & ~w_small, wts_outlier / w, s)
    s = torch.where(w_small & ~a_small, a / act_outlier, s)
    s = torch.where(a_small & w_small, torch.ones_like(s), s)
    bad = ~((s > EPS) & (s < 1.0 / EPS))
    if bool(bad.any()):
        channel = int(torch.nonzero(bad)[0])
        raise CalibrationError(
            f"layer {layer!r}: DMQ factor {float(s[channel])!r} of input channel {channel} is outside "
            f"({EPS}, {1.0 / EPS:.7g}) (activation max {float(a[channel])!r}, weight max {float(w[channel])!r}); "
            "calibrate this layer without dmq_balancer"
        )
    return s


def arq_scales(rows: Tensor, num_bits: int, channel_wise: bool) -> Tensor:
    """ARQ symmetric scales of weight rows `[C_out, -1]`: float32 `[C_out]`, or `[1]` per tensor.

    `q = 2^(b-1) - 1`, plus 1 where `|mx| < |mn|`; `scale = max(|mx|, |mn|) / q`; a scale
    `< EPS` becomes 1.0.
    """
    r = rows.to(torch.float32)
    if channel_wise:
        mn, mx = r.amin(dim=1), r.amax(dim=1)
    else:
        mn, mx = r.amin().reshape(1), r.amax().reshape(1)
    q = float(2 ** (num_bits - 1) - 1) + (mx.abs() < mn.abs()).to(torch.float32)
    scale = torch.maximum(mx.abs(), mn.abs()) / q
    return torch.where(scale < EPS, torch.ones_like(scale), scale)


def fake_quant_weight(
    weight: Tensor, scale: Tensor, layer_type: LayerType, groups: int = 1, num_bits: int = 8
) -> Tensor:
    """`clamp(round(W / scale_w), -2^(b-1), 2^(b-1) - 1) * scale_w` per output channel, in the weight's dtype."""
    rows = output_rows(weight.to(torch.float32), layer_type, groups)
    s = scale.to(device=rows.device, dtype=torch.float32).reshape(-1, 1)
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    # One temporary, updated in place: a fresh buffer per step costs its page faults again.
    quantized = torch.div(rows, s).round_().clamp_(qmin, qmax).mul_(s)
    return _from_output_rows(quantized, weight.shape, layer_type, groups).to(weight.dtype)


def force_fp16(scale: Tensor) -> Tensor:
    """`FORCE_FP16_QUANT`: `float32(float16(s))`; for `s > 65504` or `s < 2^-14`, `float32(float16(sqrt(s)))^2`."""
    s = scale.to(torch.float32)
    direct = s.to(torch.float16).to(torch.float32)
    root = torch.sqrt(s).to(torch.float16).to(torch.float32)
    outside = (s > FP16_MAX) | (s < FP16_MIN_NORMAL)
    return torch.where(outside, root * root, direct)
