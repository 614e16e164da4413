"""Hooks on the configured Linear layers, and the batch loop behind `kvcal calibrate`.

Three front doors share this module's observers: `run_calibration` (the CLI),
`create_quant_cali_model` (the AMCT-style Python API) and, through the same observers,
`QuantCalibrationOp`.

The SQNR of the summary is measured on the layer's **last calibration batch** (the
`batch_num`-th call), on an evenly strided sample of at most `SQNR_SAMPLE_LIMIT` values
per layer (every channel kept), quantized with the final factors. Measuring it on every
batch would need the raw data of all batches, which HFMG deliberately never keeps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvcal.atomic import atomic_write
from kvcal.dataset import Dataset, open_dataset
from kvcal.device import resolve_device
from kvcal.errors import CalibrationError, KvcalError, RecordError, RecordOverwriteWarning
from kvcal.observers import Observer, make_observer
from kvcal.plan import CalibrationPlan, QuantSettings, check_layers_in_model
from kvcal.quant import QParams, fake_quant, sqnr_db, to_channels

__all__ = [
    "SQNR_SAMPLE_LIMIT",
    "SQNR_BASIS",
    "CalibrationHooks",
    "LayerSummary",
    "CalibrationResult",
    "ProgressCallback",
    "attach_observers",
    "calibrate_from_files",
    "create_quant_cali_model",
    "get_quant_cali_hooks",
    "remove_quant_cali_hooks",
    "run_calibration",
    "summarize_layer",
    "warn_overwrites",
    "write_report",
    "write_layer",
]

SQNR_SAMPLE_LIMIT = 1 << 20
SQNR_BASIS = (
    f"last calibration batch of each layer (an evenly strided sample of at most {SQNR_SAMPLE_LIMIT} values)"
)

CompleteCallback = Callable[[str, Observer], None]
ProgressCallback = Callable[[int, int], None]
"""Called with (batches done, batches needed): once with done=0, then after each batch."""


def _granularity_name(granularity: int) -> str:
    return "per_channel" if granularity == 1 else "per_tensor"


def _sample(x: Tensor, granularity: int, limit: int) -> Tensor:
    """An evenly strided copy of `x` as [channels, values], at most about `limit` values."""
    view = to_channels(x.detach(), granularity)
    stride = max(1, math.ceil(view.numel() / limit))
    return view[:, ::stride].clone()


class CalibrationHooks:
    """Forward hooks feeding the outputs of configured Linear layers to their observers.

    The hooks return nothing, so the model computes exactly what it did before. Use as a
    context manager, or call `detach()` (idempotent) to remove the hooks.
    """

    def __init__(
        self,
        observers: Mapping[str, Observer],
        modules: Mapping[str, nn.Module],
        *,
        on_complete: CompleteCallback | None = None,
        keep_sample: bool = False,
        sample_limit: int = SQNR_SAMPLE_LIMIT,
    ) -> None:
        self.observers: dict[str, Observer] = dict(observers)
        self.samples: dict[str, Tensor] = {}
        self._on_complete = on_complete
        self._keep_sample = keep_sample
        self._sample_limit = sample_limit
        self._handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in modules.items()
        ]

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        observer = self.observers[name]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if observer.complete:
                return
            try:
                observer.update(output)
            except TypeError as exc:
                # A float64 or integer output is a calibration problem, not a model crash.
                raise CalibrationError(str(exc)) from exc
            if observer.complete:
                if self._keep_sample:
                    self.samples[name] = _sample(output, observer.settings.granularity, self._sample_limit)
                if self._on_complete is not None:
                    self._on_complete(name, observer)

        return hook

    @property
    def complete(self) -> bool:
        """True once every observed layer has seen its `batch_num` batches."""
        return all(observer.complete for observer in self.observers.values())

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook; observers and their state stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> CalibrationHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()


def attach_observers(
    model: nn.Module,
    plan: CalibrationPlan,
    *,
    on_complete: CompleteCallback | None = None,
    keep_sample: bool = False,
) -> CalibrationHooks:
    """Attach one observer per configured layer of `plan` to `model`.

    Args:
        model: the model; every plan layer must be one of its `nn.Linear` modules.
        plan: the layers and their settings.
        on_complete: called once per layer, with its name and observer, right after the
            batch that completes it (inside the forward pass).
        keep_sample: keep a sample of each layer's last batch (`CalibrationHooks.samples`)
            for the SQNR of the summary.

    Raises:
        ConfigError: a plan layer that is missing from the model or not a Linear.
    """
    check_layers_in_model(plan.layer_names, model, "calibration plan")
    modules = dict(model.named_modules())
    observers = {layer.name: make_observer(plan.settings(layer), layer.name) for layer in plan.layers}
    return CalibrationHooks(
        observers,
        {name: modules[name] for name in observers},
        on_complete=on_complete,
        keep_sample=keep_sample,
    )


def warn_overwrites(report: Any, record_file: str | os.PathLike[str]) -> None:
    """One `RecordOverwriteWarning` per layer of `report` whose old factors were replaced."""
    for change in report.layers:
        if change.status == "changed":
            warnings.warn(
                f"{os.fspath(record_file)}: overwrote the factors of {change.describe()}",
                RecordOverwriteWarning,
                stacklevel=3,
            )


def write_layer(record_file: str | os.PathLike[str], name: str, qparams: QParams) -> None:
    """Merge one layer's factors into the record; warn about replaced old factors."""
    from kvcal.record import merge_kv_cache

    report = merge_kv_cache(record_file, {name: qparams.cpu()})
    warn_overwrites(report, record_file)


# Observers attached by create_quant_cali_model, per model, without touching the model.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, CalibrationHooks] = weakref.WeakKeyDictionary()


def create_quant_cali_model(
    config_file: str | os.PathLike[str], record_file: str | os.PathLike[str], model: nn.Module
) -> nn.Module:
    """Attach observers to `model` for the layers of a JSON config; return the model.

    Running batches through the returned model calibrates it: each layer's factors are
    merged into `record_file` when it completes `batch_num` batches (an overwrite of
    different old factors is reported as a `RecordOverwriteWarning`); later calls pass
    through untouched. What the model computes does not change. Calling this again on
    the same model replaces the previous observers; `remove_quant_cali_hooks(model)`
    removes them, and `get_quant_cali_hooks(model)` gives access to them.

    Raises:
        ConfigError: the config is malformed or does not match the model.
    """
    from kvcal.config_json import read_config

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = read_config(config_file, model)
    remove_quant_cali_hooks(model)
    record = os.fspath(record_file)

    def on_complete(name: str, observer: Observer) -> None:
        write_layer(record, name, observer.compute())

    _ATTACHED[model] = attach_observers(model, plan, on_complete=on_complete)
    return model


def get_quant_cali_hooks(model: nn.Module) -> CalibrationHooks | None:
    """The observers `create_quant_cali_model` attached to `model`, if any."""
    return _ATTACHED.get(model)


def remove_quant_cali_hooks(model: nn.Module) -> bool:
    """Remove the observers `create_quant_cali_model` attached; False when there were none."""
    hooks = _ATTACHED.pop(model, None)
    if hooks is None:
        return False
    hooks.detach()
    return True


@dataclass(frozen=True)
class LayerSummary:
    """One calibrated layer, as the summary table and the JSON report show it."""

    name: str
    algorithm: str
    granularity: str
    asymmetric: bool
    channels: int
    batches: int
    scale_min: float
    scale_max: float
    offset_min: int
    offset_max: int
    sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "algorithm": self.algorithm,
            "granularity": self.granularity,
            "asymmetric": self.asymmetric,
            "channels": self.channels,
            "batches": self.batches,
            "scale_min": self.scale_min,
            "scale_max": self.scale_max,
            "offset_min": self.offset_min,
            "offset_max": self.offset_max,
            # JSON has no infinity: an exact reconstruction is written as the string "inf".
            "sqnr_db": self.sqnr_db if math.isfinite(self.sqnr_db) else str(self.sqnr_db),
        }


def summarize_layer(
    name: str, settings: QuantSettings, qparams: QParams, batches: int, sample: Tensor | None
) -> LayerSummary:
    """The summary row of one layer; SQNR is NaN when no sample was kept."""
    scale = qparams.scale.detach().to("cpu", torch.float32)
    offset = qparams.offset.detach().to("cpu", torch.int64)
    sqnr = math.nan if sample is None else sqnr_db(sample, fake_quant(sample, qparams, settings.num_bits))
    return LayerSummary(
        name=name,
        algorithm=settings.algo,
        granularity=_granularity_name(settings.granularity),
        asymmetric=settings.asymmetric,
        channels=qparams.channels,
        batches=batches,
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        offset_min=int(offset.min()),
        offset_max=int(offset.max()),
        sqnr_db=sqnr,
    )


@dataclass(frozen=True)
class CalibrationResult:
    """What `run_calibration` did: per-layer summary, data used and the record report."""

    layers: tuple[LayerSummary, ...]
    batch_num: int
    data_files: tuple[Path, ...]
    skipped_files: tuple[Path, ...]
    device: str
    record_path: Path
    dry_run: bool
    report: Any  # kvcal.record.OverwriteReport
    qparams: dict[str, QParams] = field(default_factory=dict, repr=False)

    @property
    def batches_used(self) -> int:
        return len(self.data_files)

    def to_dict(self) -> dict[str, Any]:
        """The `--report` JSON: summary plus overwrite report."""
        return {
            "record": str(self.record_path),
            "dry_run": self.dry_run,
            "device": self.device,
            "batch_num": self.batch_num,
            "batches_used": self.batches_used,
            "data_files": [str(path) for path in self.data_files],
            "skipped_files": [str(path) for path in self.skipped_files],
            "sqnr_basis": SQNR_BASIS,
            "layers": [layer.to_dict() for layer in self.layers],
            "overwrite_report": self.report.to_dict(),
        }


def _incomplete_message(hooks: CalibrationHooks, batch_num: int, files_run: int, files_total: int) -> str | None:
    never = [name for name, obs in hooks.observers.items() if obs.batches_seen == 0]
    short = [(name, obs.batches_seen) for name, obs in hooks.observers.items() if 0 < obs.batches_seen < batch_num]
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


def _check_record_early(record_path: str | os.PathLike[str], *, force: bool) -> None:
    """Fail before the forward passes on a record that cannot take the result."""
    from kvcal.record import load_or_empty

    source = os.fspath(record_path)
    parent = Path(source).parent
    if not parent.is_dir():
        raise RecordError(f"cannot write record {source}: directory {parent} does not exist")
    if not force:
        # The merge parses it again under the lock; this only saves a wasted calibration.
        try:
            load_or_empty(source)
        except RecordError as exc:
            raise RecordError(
                f"{exc}; nothing was calibrated (with --force it is moved aside to {Path(source).name}.bak)"
            ) from None


def run_calibration(
    *,
    model: nn.Module,
    plan: CalibrationPlan,
    dataset_dir: str | os.PathLike[str] | Dataset,
    record_path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dry_run: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    record_checked: bool = False,
) -> CalibrationResult:
    """Calibrate every layer of `plan` on the data files of `dataset_dir`, then write the record.

    The record is checked before the first forward pass, unless `record_checked` says the
    caller already did (`calibrate_from_files` checks it before loading the model; a
    large record takes long to parse, and the merge parses it once more under the lock).

    The model is put in eval mode and moved to `device`; batches run under
    `torch.inference_mode()` until every layer has `batch_num` batches (later files
    are not read). All layers are then merged into the record in one atomic write
    (none with `dry_run`). Any error leaves the record untouched.

    Raises:
        DatasetError: a missing, empty or unreadable dataset or data file.
        CalibrationError: too few batches, a layer that never ran, NaN/inf in a layer
            output, or the model raising on a batch (each naming the layer or file).
        ConfigError: a plan layer that is not a Linear of the model.
        RecordError: an existing record that does not parse (see `force`) or cannot be written.
    """
    from kvcal.record import merge_kv_cache

    target = device if isinstance(device, torch.device) else resolve_device(device)
    if isinstance(dataset_dir, Dataset):
        dataset = dataclasses.replace(dataset_dir, device=target)
    else:
        dataset = open_dataset(dataset_dir, target)
    if not record_checked:
        _check_record_early(record_path, force=force)
    model.eval()
    model.to(target)
    files_run: list[Path] = []
    with attach_observers(model, plan, keep_sample=True) as hooks, torch.inference_mode():
        if progress is not None:
            progress(0, plan.batch_num)
        for batch in dataset:
            try:
                batch.call(model)
            except KvcalError as exc:
                # Raised by our hooks (NaN/inf, dtype): the layer is named, add the file.
                raise type(exc)(f"data file {batch.path}: {exc}") from exc
            except Exception as exc:
                raise CalibrationError(
                    f"the model raised on data file {batch.path}: {type(exc).__name__}: {exc}"
                ) from exc
            files_run.append(batch.path)
            del batch  # free the inputs before the next file is loaded
            if progress is not None:
                progress(len(files_run), plan.batch_num)
            if hooks.complete:
                break
        problem = _incomplete_message(hooks, plan.batch_num, len(files_run), len(dataset))
        if problem is not None:
            raise CalibrationError(problem)
        results = {name: observer.compute().cpu() for name, observer in hooks.observers.items()}
        settings = {layer.name: plan.settings(layer) for layer in plan.layers}
        summaries = tuple(
            summarize_layer(name, settings[name], qparams, hooks.observers[name].batches_seen, hooks.samples.get(name))
            for name, qparams in results.items()
        )
    report = merge_kv_cache(record_path, results, dry_run=dry_run, force=force)
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


def _check_report_path(report_path: str | os.PathLike[str] | None) -> None:
    if report_path is None:
        return
    parent = Path(os.fspath(report_path)).parent
    if not parent.is_dir():
        raise KvcalError(f"cannot write report {os.fspath(report_path)}: directory {parent} does not exist")


def write_report(result: CalibrationResult, path: str | os.PathLike[str]) -> None:
    """Write `result.to_dict()` as JSON: a temporary file beside `path`, fsync, rename."""
    import json

    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), text.encode("utf-8"))


def calibrate_from_files(
    *,
    model_entry: str,
    model_args: tuple[str, ...] | list[str] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    config_path: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    record_path: str | os.PathLike[str],
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> CalibrationResult:
    """`kvcal calibrate`: resolve the device, load the model and config, run, write the report.

    Cheap checks (device, output directories, dataset listing, config against the
    model, record readability) all happen before the first forward pass.
    """
    from kvcal.config_json import read_config
    from kvcal.model_loader import load_model

    target = resolve_device(device)
    _check_report_path(report_path)
    dataset = open_dataset(dataset_dir, target)  # a bad dataset fails before a large model loads
    _check_record_early(record_path, force=force)
    model = load_model(model_entry, tuple(model_args), checkpoint)
    plan = read_config(config_path, model)
    result = run_calibration(
        model=model,
        plan=plan,
        dataset_dir=dataset,
        record_path=record_path,
        device=target,
        dry_run=dry_run,
        force=force,
        progress=progress,
        record_checked=True,
    )
    if report_path is not None:
        write_report(result, report_path)
    return result
