"""`kvcal calibrate` on a PTQ config: the batches through a `PtqSession`, then one record merge.

`run_ptq_calibration` is to PTQ what `kvcal.calibration.runner.run_calibration` is to the
KV cache, and shares its batch loop, record checks and record store.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from kvcal.calibration.runner import (
    ProgressCallback,
    check_record_early,
    dataset_on,
    run_batches,
)
from kvcal.dataset import Batch, Dataset
from kvcal.device import resolve_device
from kvcal.errors import CalibrationError
from kvcal.ptq.calibrate import PtqSession
from kvcal.ptq.preview import ConfigPreview, preview_config, refuse_ada
from kvcal.ptq.summary import PtqCalibrationResult, PtqLayerSummary
from kvcal.record.changes import OverwriteReport
from kvcal.record.ptq_value import PtqFactors
from kvcal.record.store import merge_record
from kvcal.text_data import TextDataset

__all__ = ["PtqCompanions", "ptq_result", "run_ptq_calibration"]

PtqCompanions = Callable[[PtqCalibrationResult], Mapping[Path, bytes]]
"""Files written in the same transaction as the record (the `--report` JSON), from the result."""


def run_ptq_calibration(
    *,
    model: nn.Module,
    config_path: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str] | Dataset | TextDataset,
    record_path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dry_run: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    record_checked: bool = False,
    companions: PtqCompanions | None = None,
    preview: ConfigPreview | None = None,
) -> PtqCalibrationResult:
    """Calibrate every enabled layer of a PTQ config on a copy of `model`, then merge the record.

    `model` is never changed: a calibration copy is made on `device` ("auto": NPU, else
    CUDA, else CPU). Batches run under `torch.inference_mode()`; the progress callback
    counts the DMQ pass (when there is one), the `batch_num` observed batches and the
    evaluation pass. Every enabled layer is merged into the record in one atomic write
    (none with `dry_run`), with the `companions` files; any error leaves both untouched.

    Raises:
        ConfigError: a config that is malformed, does not match the model, or has ADA layers.
        DatasetError, CalibrationError, RecordError, DeviceError: as `run_calibration`.
    """
    preview = preview or preview_config(config_path)
    refuse_ada(preview)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    if not record_checked:
        check_record_early(record_path, force=force, dry_run=dry_run)
    dataset = dataset_on(dataset_dir, target)
    batches = iter(dataset)
    first = next(batches, None)
    if first is None:
        raise CalibrationError("the dataset gave no batch; nothing was written")
    with torch.inference_mode():
        session = PtqSession.start(model, preview, first, target)
        files = _observe(session, itertools.chain([first], batches), progress, len(dataset))
        factors, summaries, model_sqnr = session.finish()
    if progress is not None:
        progress(session.passes, session.passes)

    def result_of(report: OverwriteReport) -> PtqCalibrationResult:
        return ptq_result(session, summaries, model_sqnr, factors, report, files=tuple(files),
                          skipped=dataset.skipped, device=target, record_path=record_path, dry_run=dry_run)

    extra = None if companions is None else (lambda report: companions(result_of(report)))
    report = merge_record(record_path, ptq=factors, dry_run=dry_run, force=force, companions=extra)
    return result_of(report)


def ptq_result(
    session: PtqSession,
    summaries: tuple[PtqLayerSummary, ...],
    model_sqnr: float,
    factors: dict[str, PtqFactors],
    report: OverwriteReport,
    *,
    files: tuple[Path, ...],
    skipped: tuple[Path, ...],
    device: torch.device,
    record_path: str | os.PathLike[str],
    dry_run: bool,
) -> PtqCalibrationResult:
    """The result of a finished session and its record merge."""
    return PtqCalibrationResult(
        layers=summaries,
        model_sqnr_db=model_sqnr,
        float_layers=tuple(layer.name for layer in session.plan.layers if not layer.quant_enable),
        fused=tuple((pair.conv, pair.bn) for pair in session.fused),
        batch_num=session.plan.batch_num,
        data_files=files,
        skipped_files=skipped,
        device=str(device),
        record_path=Path(record_path),
        dry_run=dry_run,
        report=report,
        factors=factors,
    )


def _observe(
    session: PtqSession, batches: Iterator[Batch], progress: ProgressCallback | None, total_files: int
) -> list[Path]:
    """`prepare` (the DMQ pass counted in the progress), then the observed batches; the files used."""
    total = session.passes
    if progress is not None:
        progress(0, total)
    session.prepare()
    done = int(session.needs_dmq_pass)
    if progress is not None and done:
        progress(done, total)
    files = run_batches(batches, session.observe, complete=lambda: session.complete, progress=progress,
                        total=total, done=done)
    problem = session.incomplete_message(len(files), total_files)
    if problem is not None:
        raise CalibrationError(problem)
    return files
