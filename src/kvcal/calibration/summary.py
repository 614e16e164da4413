"""The per-layer summary of a calibration and the result of a whole run (data only).

SQNR and the clipped fraction are measured on each layer's **last calibration batch**
(the `batch_num`-th), as tapped and with padding removed, on an evenly strided sample
of at most `SQNR_SAMPLE_LIMIT` values (every channel kept), quantized with the final
factors. Measuring every batch would need the raw data of all batches, which HFMG
deliberately never keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvcal.calibration.taps import SQNR_SAMPLE_LIMIT, Tap
from kvcal.params import QuantSettings
from kvcal.quant import Granularity, QParams, clipped_fraction, fake_quant, sqnr_db
from kvcal.record.changes import OverwriteReport

__all__ = ["SQNR_BASIS", "CalibrationResult", "LayerSummary", "RunResult", "summarize_layer"]

SQNR_BASIS = (
    f"last calibration batch of each layer (an evenly strided sample of at most {SQNR_SAMPLE_LIMIT} values)"
)


def _json_float(value: float) -> float | str:
    # JSON has no infinity or NaN: those are written as the strings "inf", "-inf", "nan".
    return value if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class LayerSummary:
    """One calibrated layer, as the summary table and the JSON report show it."""

    name: str
    tap: Tap
    algorithm: str
    granularity: Granularity
    asymmetric: bool
    channels: int
    batches: int
    scale_min: float
    scale_max: float
    offset_min: int
    offset_max: int
    sqnr_db: float
    clipped: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "tap": self.tap.value,
            "algorithm": self.algorithm,
            "granularity": self.granularity.label,
            "asymmetric": self.asymmetric,
            "channels": self.channels,
            "batches": self.batches,
            "scale_min": self.scale_min,
            "scale_max": self.scale_max,
            "offset_min": self.offset_min,
            "offset_max": self.offset_max,
            "sqnr_db": _json_float(self.sqnr_db),
            "clipped_fraction": _json_float(self.clipped),
        }


def summarize_layer(
    name: str, settings: QuantSettings, qparams: QParams, batches: int, sample: Tensor | None, tap: Tap
) -> LayerSummary:
    """The summary row of one layer; SQNR and clipped fraction are NaN when no sample was kept."""
    scale = qparams.scale.detach().to("cpu", torch.float32)
    offset = qparams.offset.detach().to("cpu", torch.int64)
    if sample is None:
        sqnr = clipped = math.nan
    else:
        sqnr = sqnr_db(sample, fake_quant(sample, qparams, settings.num_bits))
        clipped = clipped_fraction(sample, qparams, settings.num_bits)
    return LayerSummary(
        name=name,
        tap=tap,
        algorithm=settings.algo,
        granularity=settings.granularity,
        asymmetric=settings.asymmetric,
        channels=qparams.channels,
        batches=batches,
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        offset_min=int(offset.min()),
        offset_max=int(offset.max()),
        sqnr_db=sqnr,
        clipped=clipped,
    )


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What every calibration run reports besides its layers: the data used, the device, the record."""

    batch_num: int
    data_files: tuple[Path, ...]
    skipped_files: tuple[Path, ...]
    device: str
    record_path: Path
    dry_run: bool
    report: OverwriteReport

    @property
    def batches_used(self) -> int:
        return len(self.data_files)

    def run_dict(self) -> dict[str, Any]:
        """The run's fields of the `--report` JSON, in their order there."""
        return {
            "record": str(self.record_path),
            "dry_run": self.dry_run,
            "device": self.device,
            "batch_num": self.batch_num,
            "batches_used": self.batches_used,
            "data_files": [str(path) for path in self.data_files],
            "skipped_files": [str(path) for path in self.skipped_files],
        }


@dataclass(frozen=True, kw_only=True)
class CalibrationResult(RunResult):
    """What `run_calibration` did: per-layer summary, data used and the record report."""

    layers: tuple[LayerSummary, ...]
    qparams: dict[str, QParams] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The `--report` JSON: summary plus overwrite report."""
        return {
            **self.run_dict(),
            "sqnr_basis": SQNR_BASIS,
            "layers": [layer.to_dict() for layer in self.layers],
            "overwrite_report": self.report.to_dict(),
        }
