"""What kvcal adds to PTQ calibration (PTQ.md §6): per-layer and whole-model SQNR, and the result of a run.

Per layer: the SQNR of the fake-quantized weight against the float weight (fused, and
balanced with DMQ), of the fake-quantized input against the input, and of the layer's
output with both quantized against its float output — input and output measured on the
layer's input in the last calibration batch (the leading samples of that batch, at most
`SAMPLE_LIMIT` values). For the model: its output on the first calibration batch with
every enabled layer's weight and input fake-quantized, against the float model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kvcal.calibration.summary import RunResult
from kvcal.floats import f32_json
from kvcal.quant import QParams, clipped_fraction, fake_quant, sqnr_db
from kvcal.record.ptq_value import PtqFactors

__all__ = [
    "SAMPLE_LIMIT",
    "SQNR_BASIS",
    "PtqCalibrationResult",
    "PtqLayerSummary",
    "fake_quant_input",
    "layer_output_sqnr",
    "leading_samples",
    "output_sqnr",
]

SAMPLE_LIMIT = 1 << 16

SQNR_BASIS = {
    "weight": "fake-quantized weight against the float weight (after BN fusion and DMQ)",
    "input": f"the layer's input in the last calibration batch (leading samples, at most {SAMPLE_LIMIT} values), "
    "fake-quantized against float",
    "output": "the layer's output on that input with input and weight fake-quantized, against float input and weight",
    "model": "the model's output on the first calibration batch with every enabled layer fake-quantized, "
    "against the float model",
}


def _f32(value: float | None) -> float | str | None:
    return None if value is None else f32_json(value)


def _json_float(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else str(value)


def leading_samples(x: Tensor, limit: int = SAMPLE_LIMIT) -> Tensor:
    """A copy of the leading samples (dim 0) of `x`, at most about `limit` values (at least one sample)."""
    x = x.detach()
    if x.dim() < 2:
        return x.clone()
    per_sample = max(1, x[0].numel())
    return x[: max(1, limit // per_sample)].clone()


def fake_quant_input(x: Tensor, qparams: QParams) -> Tensor:
    """`x` quantized per tensor with `qparams` and dequantized, in `x`'s dtype and shape."""
    return fake_quant(x.reshape(1, -1), qparams).reshape(x.shape).to(x.dtype)


def layer_output_sqnr(module: nn.Module, x: Tensor, qparams: QParams, float_weight: Tensor | None) -> float:
    """SQNR of `module(fq(x))` (its fake-quantized weight in place) against the output with `float_weight`.

    The module's hooks must be inert while this runs. `float_weight` None: a layer without
    weight (AvgPool2d), compared with `module(x)`.
    """
    quantized = module(fake_quant_input(x, qparams))
    if float_weight is None:
        reference = module(x)
    else:
        weight = float_weight.to(device=x.device, dtype=module.weight.dtype)  # type: ignore[union-attr]
        reference = functional_call(module, {"weight": weight}, (x,))
    return sqnr_db(reference, quantized)


def _float_leaves(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _float_leaves(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _float_leaves(item)


def output_sqnr(reference: Any, quantized: Any) -> float:
    """SQNR over every floating-point tensor of two model outputs; NaN when they have none or differ in shape."""
    ref, out = list(_float_leaves(reference)), list(_float_leaves(quantized))
    if not ref or len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        return math.nan
    return sqnr_db(
        torch.cat([t.reshape(-1).to(torch.float32) for t in ref]),
        torch.cat([t.reshape(-1).to(torch.float32) for t in out]),
    )


def input_clipped(x: Tensor, qparams: QParams) -> float:
    """The fraction of the values of `x` outside the range the activation factors represent."""
    return clipped_fraction(x.reshape(1, -1), qparams)


@dataclass(frozen=True)
class PtqLayerSummary:
    """One calibrated PTQ layer, as the summary table and the JSON report show it."""

    name: str
    layer_type: str
    algorithm: str
    asymmetric: bool
    batches: int
    scale_d: float
    offset_d: int
    weight_bits: int | None
    channel_wise: bool | None
    scale_w_min: float | None
    scale_w_max: float | None
    weight_channels: int
    balance_min: float | None
    balance_max: float | None
    fused_bn: str | None
    weight_sqnr_db: float
    input_sqnr_db: float
    output_sqnr_db: float
    input_clipped: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "type": self.layer_type,
            "algorithm": self.algorithm,
            "asymmetric": self.asymmetric,
            "batches": self.batches,
            "scale_d": _f32(self.scale_d),
            "offset_d": self.offset_d,
            "weight_bits": self.weight_bits,
            "channel_wise": self.channel_wise,
            "weight_channels": self.weight_channels,
            "scale_w_min": _f32(self.scale_w_min),
            "scale_w_max": _f32(self.scale_w_max),
            "tensor_balance_factor_min": _f32(self.balance_min),
            "tensor_balance_factor_max": _f32(self.balance_max),
            "fused_bn": self.fused_bn,
            "weight_sqnr_db": _json_float(self.weight_sqnr_db),
            "input_sqnr_db": _json_float(self.input_sqnr_db),
            "output_sqnr_db": _json_float(self.output_sqnr_db),
            "input_clipped_fraction": _json_float(self.input_clipped),
        }


@dataclass(frozen=True, kw_only=True)
class PtqCalibrationResult(RunResult):
    """What a PTQ calibration did: per-layer summary (config order), model SQNR, data used, record report."""

    layers: tuple[PtqLayerSummary, ...]
    model_sqnr_db: float
    float_layers: tuple[str, ...]
    fused: tuple[tuple[str, str], ...]
    factors: dict[str, PtqFactors] = field(default_factory=dict, repr=False)

    def worst_first(self) -> list[PtqLayerSummary]:
        """The layers by output SQNR, lowest first (NaN last)."""
        return sorted(self.layers, key=lambda s: (math.isnan(s.output_sqnr_db), s.output_sqnr_db))

    def to_dict(self) -> dict[str, Any]:
        """The `--report` JSON: summary plus overwrite report."""
        return {
            "mode": "ptq",
            **self.run_dict(),
            "model_sqnr_db": _json_float(self.model_sqnr_db),
            "sqnr_basis": dict(SQNR_BASIS),
            "fused_bn": [{"conv": conv, "bn": bn} for conv, bn in self.fused],
            "float_layers": list(self.float_layers),
            "layers": [layer.to_dict() for layer in self.layers],
            "overwrite_report": self.report.to_dict(),
        }
