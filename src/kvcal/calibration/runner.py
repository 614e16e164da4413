"""The batch runner: observers on a model's configured layers, batches through it, factors out.

Every front door shares it: `kvcal calibrate` and `run_calibration`, and
`create_quant_cali_model` (through `attach_observers`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvcal.calibration.summary import CalibrationResult, LayerSummary, summarize_layer
from kvcal.calibration.taps import (
    ActiveTap,
    ObserverFeed,
    Tap,
    attach_tap,
    batch_mask,
    resolve_tap,
)
from kvcal.dataset import Batch, Dataset, open_dataset
from kvcal.device import resolve_device
from kvcal.errors import CalibrationError, KvcalError, RecordError
from kvcal.kv.plan import CalibrationPlan
from kvcal.observers import Observer, make_observer
from kvcal.placement import place_model
from kvcal.quant import QParams
from kvcal.record.changes import OverwriteReport
from kvcal.record.store import check_writable, load_or_empty, merge_kv_cache
from kvcal.text_data import TextDataset

__all__ = [
    "Companions",
    "ProgressCallback",
    "attach_observers",
    "check_record_early",
    "dataset_on",
    "forward_batch",
    "run_batches",
    "run_calibration",
]

ProgressCallback = Callable[[int, int], None]
"""Called with (batches done, batches needed): once with done=0, then after each batch."""

Companions = Callable[[CalibrationResult], Mapping[Path, bytes]]
"""Files written in the same transaction as the record (the `--report` JSON), from the result."""


def attach_observers(
    model: nn.Module,
    plan: CalibrationPlan,
    *,
    tap: Tap = Tap.PROJ,
    on_complete: Callable[[str, Observer], None] | None = None,
    keep_sample: bool = False,
) -> ActiveTap:
    """Attach one observer per configured layer of `plan` to `model`, at the chosen tap.

    Args:
        model: the model; every plan layer must be one of its `nn.Linear` modules.
        plan: the layers and their settings.
        tap: where to observe (`Tap.AUTO` resolves to `CACHE` or `PROJ` for this model).
        on_complete: called once per layer, with its name and observer, right after the
            batch that completes it (inside the forward pass).
        keep_sample: keep a sample of each layer's last batch for the summary.

    Raises:
        ConfigError: a plan layer that is missing, not a Linear, or not mappable to the tap.
    """
    observers = {layer.name: make_observer(plan.settings(layer), layer.name) for layer in plan.layers}
    feed = ObserverFeed(observers, on_complete=on_complete, keep_sample=keep_sample)
    return attach_tap(model, plan.layer_names, feed, resolve_tap(model, tap))


def _incomplete_message(feed: ObserverFeed, batch_num: int, files_run: int, files_total: int) -> str | None:
    never = [name for name, obs in feed.observers.items() if obs.batches_seen == 0]
    short = [(name, obs.batches_seen) for name, obs in feed.observers.items() if 0 < obs.batches_seen < batch_num]
    if not never and not short:
        return None
    parts: list[str] = []
    if never and files_run > 0:
        names = ", ".join(repr(name) for name in never)
        parts.append(
            f"configured layer(s) never ran during the {files_run} forward pass(es): {names} "
            "(is the layer used by the model's forward?)"
        )
    elif never:
        parts.append("no batch was run")
    if short:
        counts = ", ".join(f"{name!r} saw {seen} of {batch_num}" for name, seen in short)
        parts.append(
            f"fewer batches than batch_num={batch_num}: the dataset has {files_total} data file(s); {counts}"
        )
    return "; ".join(parts) + "; nothing was written"


def check_record_early(record_path: str | os.PathLike[str], *, force: bool, dry_run: bool = False) -> None:
    """Fail before the forward passes on a record that cannot take the result.

    Unless `dry_run`, the record must be writable and lockable; unless `force`, an
    existing record must parse.
    """
    source = os.fspath(record_path)
    parent = Path(source).parent
    if not parent.is_dir():
        raise RecordError(f"cannot write record {source}: directory {parent} does not exist")
    if not dry_run:
        check_writable(source)
    if not force:
        # The merge parses it again under the lock; this only saves a wasted calibration.
        try:
            load_or_empty(source)
        except RecordError as exc:
            raise RecordError(
                f"{exc}; nothing was calibrated (with --force it is moved aside to {Path(source).name}.bak)"
            ) from None


def forward_batch(model: Callable[..., Any], batch: Batch, kwargs: dict[str, Any] | None = None) -> Any:
    """`model(*batch.args, **kwargs)` (the batch's own keyword arguments by default); errors name the file.

    Raises:
        KvcalError: raised inside the model by kvcal's hooks (NaN/inf, dtype, mask): the same
            type, with the data file added to its message.
        CalibrationError: anything else the model raised.
    """
    try:
        return model(*batch.args, **(batch.kwargs if kwargs is None else kwargs))
    except KvcalError as exc:
        # Raised by our taps (NaN/inf, dtype, mask): the layer is named, add the file.
        raise type(exc)(f"data file {batch.path}: {exc}") from exc
    except Exception as exc:
        raise CalibrationError(f"the model raised on data file {batch.path}: {type(exc).__name__}: {exc}") from exc


def run_batches(
    batches: Iterable[Batch],
    step: Callable[[Batch], object],
    *,
    complete: Callable[[], bool],
    progress: ProgressCallback | None,
    total: int,
    done: int = 0,
) -> list[Path]:
    """Run `step` on each batch until `complete()`; the files used. Shared by the KV and PTQ runs.

    Progress is reported as (done + batches run, total) after each batch; later files are
    not read.
    """
    files_run: list[Path] = []
    for batch in batches:
        step(batch)
        files_run.append(batch.path)
        del batch  # free the inputs before the next file is loaded
        if progress is not None:
            progress(done + len(files_run), total)
        if complete():
            break
    return files_run


def _run_batches(
    model: nn.Module,
    dataset: Dataset | TextDataset,
    active: ActiveTap,
    batch_num: int,
    progress: ProgressCallback | None,
) -> list[Path]:
    """Call the model on each batch until every layer is complete; the files used."""

    def step(batch: Batch) -> None:
        active.feed.mask = batch_mask(batch.kwargs)
        try:
            forward_batch(model, batch, active.call_kwargs(batch.kwargs))
        finally:
            active.feed.mask = None

    if progress is not None:
        progress(0, batch_num)
    return run_batches(dataset, step, complete=lambda: active.feed.complete, progress=progress, total=batch_num)


def dataset_on(
    dataset_dir: str | os.PathLike[str] | Dataset | TextDataset, target: torch.device
) -> Dataset | TextDataset:
    if isinstance(dataset_dir, (Dataset, TextDataset)):
        return dataclasses.replace(dataset_dir, device=target)
    return open_dataset(dataset_dir, target)


def _observe(
    model: nn.Module, plan: CalibrationPlan, dataset: Dataset | TextDataset, tap: Tap, progress: ProgressCallback | None
) -> tuple[list[Path], dict[str, QParams], tuple[LayerSummary, ...]]:
    """The batches through the observed model, then each layer's factors: (files run, factors, summaries)."""
    with attach_observers(model, plan, tap=tap, keep_sample=True) as active, torch.inference_mode():
        files_run = _run_batches(model, dataset, active, plan.batch_num, progress)
        problem = _incomplete_message(active.feed, plan.batch_num, len(files_run), len(dataset))
        if problem is not None:
            raise CalibrationError(problem)
        results = {name: observer.compute().cpu() for name, observer in active.feed.observers.items()}
        return files_run, results, _summaries(active, results)


def _summaries(active: ActiveTap, results: Mapping[str, QParams]) -> tuple[LayerSummary, ...]:
    feed = active.feed
    return tuple(
        summarize_layer(name, obs.settings, results[name], obs.batches_seen, feed.samples.get(name), active.tap)
        for name, obs in feed.observers.items()
    )


def run_calibration(
    *,
    model: nn.Module,
    plan: CalibrationPlan,
    dataset_dir: str | os.PathLike[str] | Dataset | TextDataset,
    record_path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    tap: Tap | str = Tap.PROJ,
    dry_run: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    record_checked: bool = False,
    companions: Companions | None = None,
) -> CalibrationResult:
    """Calibrate every layer of `plan` on the data files of `dataset_dir`, then write the record.

    The model is put in eval mode and moved to `device` ("auto": NPU, else CUDA, else
    CPU); a model dispatched by accelerate (`device_map`) is left where it is, its
    batches going to its input embedding's device. Batches run under
    `torch.inference_mode()` until every layer has `batch_num` batches (later files are
    not read). `tap` chooses what is observed (`proj`: the Linear output, AMCT's
    semantics; `cache`: what the KV cache stores; `auto`). Padded positions
    (`attention_mask` 0) are left out. All layers are then merged into the record in one
    atomic write (none with `dry_run`), together with the `companions` files. Any error
    leaves the record and the companions untouched. The record is checked before the
    first forward pass, unless `record_checked` says the caller already did.

    Raises:
        DatasetError: a missing, empty or unreadable dataset or data file.
        CalibrationError: too few batches, a layer that never ran, NaN/inf in a layer
            output, or the model raising on a batch (each naming the layer or file).
        ConfigError: a plan layer that is not a Linear of the model, or that the tap cannot map.
        RecordError: an existing record that does not parse (see `force`) or cannot be written.
    """
    if not isinstance(device, torch.device):
        resolve_device(device)  # an unavailable device fails before anything is read
    if not record_checked:
        check_record_early(record_path, force=force, dry_run=dry_run)
    model.eval()
    target = place_model(model, device)
    dataset = dataset_on(dataset_dir, target)
    files_run, results, summaries = _observe(model, plan, dataset, Tap(tap), progress)

    def result_of(report: OverwriteReport) -> CalibrationResult:
        return CalibrationResult(
            layers=summaries,
            batch_num=plan.batch_num,
            data_files=tuple(files_run),
            skipped_files=dataset.skipped,
            device=str(target),
            record_path=Path(record_path),
            dry_run=dry_run,
            report=report,
            qparams=results,
        )

    extra = None if companions is None else (lambda report: companions(result_of(report)))
    report = merge_kv_cache(record_path, results, dry_run=dry_run, force=force, companions=extra)
    return result_of(report)
