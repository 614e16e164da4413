"""Pure quantization maths shared by observers, reports and tests (ALGORITHMS.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "QParams",
    "to_channels",
    "minmax_qparams",
    "fake_quant",
    "sqnr_db",
]

EPS = 1.192092896e-7  # FLT_EPSILON


@dataclass(frozen=True)
class QParams:
    """Quantization factors: `scale` float32 [C] and `offset` int32 [C] (C = 1 per-tensor)."""

    scale: Tensor
    offset: Tensor

    def cpu(self) -> QParams:
        return QParams(self.scale.detach().cpu(), self.offset.detach().cpu())

    @property
    def channels(self) -> int:
        return int(self.scale.numel())


def to_channels(x: Tensor, granularity: int) -> Tensor:
    """View an activation as [channels, values].

    per-tensor (0): any shape -> [1, numel]; per-channel (1): [..., C] -> [C, numel / C]
    (a transposed view, no copy).
    """
    if granularity == 0:
        return x.reshape(1, -1)
    if x.dim() == 0:
        raise ValueError("per-channel calibration needs at least one dimension, got a 0-d tensor")
    return x.reshape(-1, x.shape[-1]).t()


def minmax_qparams(lo: Tensor, hi: Tensor, asymmetric: bool, num_bits: int = 8) -> QParams:
    """Min-max scale/offset of ALGORITHMS.md for clip ranges [lo, hi], all channels at once.

    Args:
        lo: float32 [C] lower clip bounds.
        hi: float32 [C] upper clip bounds.
        asymmetric: asymmetric form (integer offset) or symmetric (offset 0).
        num_bits: 8.
    """
    lo = lo.to(torch.float32)
    hi = hi.to(torch.float32)
    if asymmetric:
        hi = torch.clamp(hi, min=0.0)
        lo = torch.clamp(lo, max=0.0)
        scale = (hi - lo) / float(2**num_bits - 1)
        base = torch.full_like(scale, float(-(2 ** (num_bits - 1))))
        offset = torch.where(hi != lo, base - lo / scale, base)
    else:
        neg = hi.abs() < lo.abs()
        divisor = float(2 ** (num_bits - 1) - 1) + neg.to(torch.float32)
        scale = torch.maximum(hi.abs(), lo.abs()) / divisor
        offset = torch.zeros_like(scale)
    degenerate = scale < EPS
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    if asymmetric:
        offset = torch.where(degenerate, torch.full_like(offset, float(-(2 ** (num_bits - 1)))), offset)
    return QParams(scale=scale, offset=torch.round(offset).to(torch.int32))


def fake_quant(x: Tensor, qparams: QParams, num_bits: int = 8) -> Tensor:
    """Quantize then dequantize `x` laid out as [C, N] (see `to_channels`), in float32."""
    scale = qparams.scale.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    offset = qparams.offset.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    q = torch.clamp(torch.round(x.to(torch.float32) / scale) + offset, qmin, qmax)
    return (q - offset) * scale


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when the error is exactly zero."""
    # float32 keeps this on any device (NPUs lack float64); a ratio needs no more.
    x = x.to(torch.float32)
    noise = (x - x_hat.to(torch.float32)).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
