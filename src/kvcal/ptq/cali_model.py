"""`create_ptq_cali_model`: the PTQ calibration copy as a module that calibrates itself as batches run through it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvcal.calibration.runner import check_record_early
from kvcal.dataset import Batch
from kvcal.kv.ops import warn_overwrites
from kvcal.ptq.calibrate import PtqSession
from kvcal.ptq.job import ptq_result
from kvcal.ptq.model_copy import model_device
from kvcal.ptq.preview import ConfigPreview, preview_config, refuse_ada
from kvcal.ptq.summary import PtqCalibrationResult
from kvcal.record.store import merge_record

__all__ = ["PtqCalibrationModel", "create_ptq_cali_model"]


class PtqCalibrationModel(nn.Module):
    """A calibration copy of a model; each call is a forward pass of the copy that calibrates it.

    The first call runs its input through the copy once as it is (to find the quantizable
    layers, validate the config and find the Conv→BatchNorm pairs), fuses, balances (DMQ)
    and fake-quantizes the weights (ARQ), then observes the same input. When every enabled
    layer has seen `batch_num` calls, the activation factors are computed, the first
    input is run once more fully fake-quantized (the model SQNR), and every layer's values
    are merged into the record; `result` then holds the summary. Outputs are those of
    the copy: weights fake-quantized, activations float. The user's model is never
    changed; `model` is the copy once the first call has made it.
    """

    def __init__(self, model: nn.Module, preview: ConfigPreview, record_file: str, device: torch.device) -> None:
        super().__init__()
        self._source: list[nn.Module] = [model]  # a list: not registered as a submodule of this wrapper
        self._preview = preview
        self._record = record_file
        self._device = device
        self._session: PtqSession | None = None
        self._calls = 0
        self.result: PtqCalibrationResult | None = None

    @property
    def complete(self) -> bool:
        """True once the factors have been written to the record."""
        return self.result is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            self._calls += 1
            batch = Batch(Path(f"forward call {self._calls}"), args, kwargs)
            session = self._session
            if session is None:
                session = PtqSession.start(self._source[0], self._preview, batch, self._device)
                session.prepare()
                self._session, self._source = session, []
                self.model = session.copy
            output = session.observe(batch)
            if self.result is None and session.complete:
                self._finish(session)
            return output

    def _finish(self, session: PtqSession) -> None:
        factors, summaries, model_sqnr = session.finish()
        report = merge_record(self._record, ptq=factors)
        warn_overwrites(report, self._record)
        calls = tuple(Path(f"forward call {n}") for n in range(1, self._calls + 1))
        self.result = ptq_result(session, summaries, model_sqnr, factors, report, files=calls, skipped=(),
                                 device=self._device, record_path=self._record, dry_run=False)


def create_ptq_cali_model(
    config_file: str | os.PathLike[str], record_file: str | os.PathLike[str], model: nn.Module
) -> PtqCalibrationModel:
    """A calibration copy of `model` (on the device of its parameters) for the PTQ config `config_file`.

    Running batches through the returned module calibrates it (see `PtqCalibrationModel`):
    each enabled layer's `value` is merged into `record_file` once it has seen
    `batch_num` batches (different old values are reported as `RecordOverwriteWarning`).
    `model` itself is never changed.

    Raises:
        TypeError: `model` is not a module.
        ConfigError: a malformed config (`version`, `batch_num`), or an enabled ADA layer (before any data).
        RecordError: a record that does not parse or cannot be written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    preview = preview_config(config_file)
    refuse_ada(preview)
    record = os.fspath(record_file)
    check_record_early(record, force=False)
    return PtqCalibrationModel(model, preview, record, model_device(model))
