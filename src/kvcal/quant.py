"""Pure quantization maths shared by observers, reports and tests (ALGORITHMS.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "Granularity",
    "QParams",
    "to_channels",
    "minmax_qparams",
    "fake_quant",
    "sqnr_db",
    "clipped_fraction",
]

EPS = 1.192092896e-7  # FLT_EPSILON


class Granularity(IntEnum):
    """One (scale, offset) for the whole tensor, or one per channel (an IntEnum: JSON keeps 0/1).

    PER_TENSOR: any input shape -> scale shape [1];
    PER_CHANNEL: input [..., C] (channels last) -> scale shape [C].
    """

    PER_TENSOR = 0
    PER_CHANNEL = 1

    @property
    def label(self) -> str:
        """The config spelling: `per_tensor` or `per_channel`."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any) -> Granularity:
        """Accept 0, 1, "0", "1", "per_tensor", "per_channel" (or a Granularity).

        Raises:
            TypeError: neither an int nor a str (bool is not accepted as an int).
            ValueError: any other int or str.
        """
        accepted = "accepted: 0, 1, '0', '1', 'per_tensor', 'per_channel'"
        if isinstance(value, int) and not isinstance(value, bool):
            if value in (0, 1):
                return cls(int(value))
            raise ValueError(f"quant_granularity must be 0 or 1, got {value!r}; {accepted}")
        if isinstance(value, str):
            text = value.strip()
            for member in cls:
                if text in (str(int(member)), member.label):
                    return member
            raise ValueError(f"quant_granularity {value!r} is not valid; {accepted}")
        raise TypeError(
            f"quant_granularity must be an int or str, got {value!r} ({type(value).__name__}); {accepted}"
        )


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


def to_channels(x: Tensor, granularity: Granularity) -> Tensor:
    """View an activation whose channels are last as [channels, values].

    PER_TENSOR: any shape -> [1, numel]; PER_CHANNEL: [..., C] -> [C, numel / C]
    (a transposed view, no copy).
    """
    if granularity == Granularity.PER_TENSOR:
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
    # One temporary, updated in place (the same float32 operations as the formula).
    q = torch.div(x.to(torch.float32), scale).round_().add_(offset).clamp_(qmin, qmax)
    return q.sub_(offset).mul_(scale)


_SQNR_CHUNK = 1 << 20


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when the error is exactly zero."""
    # float32 keeps this on any device (NPUs lack float64); a ratio needs no more.
    x, x_hat = x.to(torch.float32).reshape(-1), x_hat.to(torch.float32).reshape(-1)
    # Norms reduce without a squared temporary; the difference is taken a cache-sized
    # chunk at a time (a full-size temporary costs its page faults: 3x slower on 16M values).
    noise = sum(
        float(torch.linalg.vector_norm(x[i : i + _SQNR_CHUNK] - x_hat[i : i + _SQNR_CHUNK])) ** 2
        for i in range(0, x.numel(), _SQNR_CHUNK)
    )
    signal = float(torch.linalg.vector_norm(x)) ** 2
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def clipped_fraction(x: Tensor, qparams: QParams, num_bits: int = 8) -> float:
    """Fraction of the values of `x` [C, N] outside the range the factors represent.

    Channel c represents `[(qmin - offset_c) * scale_c, (qmax - offset_c) * scale_c]`;
    a value outside it is clipped by quantization (a value that merely rounds to the
    edge is not counted).
    """
    if x.numel() == 0:
        return 0.0
    scale = qparams.scale.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    offset = qparams.offset.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    x = x.to(torch.float32)
    # Clipped exactly when the rounded code falls outside [qmin, qmax], as fake_quant clamps.
    codes = torch.round(x / scale) + offset
    return float(((codes < qmin) | (codes > qmax)).sum().item()) / x.numel()
