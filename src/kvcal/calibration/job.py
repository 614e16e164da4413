"""`kvcal calibrate` as one library call: files in, record (and report) out.

The config decides the mode: a PTQ config (it has a `version` key) calibrates the whole
network (`kvcal.ptq.job`), any other the KV cache. Every cheap check happens before the
model is loaded: the device, the config (for PTQ: `version`, `batch_num` and no ADA
layer; the rest needs the model and the first batch), the output paths (none may be
another input or output of the run), the dataset listing and the record's readability.
The report is written in the record's transaction, so an error leaves both as they were.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from kvcal.calibration.cache_tap import has_cache_tap
from kvcal.calibration.runner import (
    ProgressCallback,
    check_record_early,
    run_calibration,
)
from kvcal.calibration.summary import CalibrationResult
from kvcal.calibration.taps import Tap
from kvcal.dataset import Dataset
from kvcal.device import resolve_device
from kvcal.errors import ConfigError, KvcalError
from kvcal.jsonio import load_json
from kvcal.kv.config_json import read_config
from kvcal.kv.plan import check_layers_in_model
from kvcal.model_loader import load_model
from kvcal.paths import PathArg, check_distinct_paths
from kvcal.ptq.config_json import is_ptq_config
from kvcal.ptq.summary import PtqCalibrationResult
from kvcal.text_data import TextDataset, TextOptions, open_data

__all__ = ["calibrate_from_files", "report_json"]

logger = logging.getLogger(__name__)


def report_json(result: CalibrationResult | PtqCalibrationResult) -> bytes:
    """The `--report` file: `result.to_dict()` as indented JSON."""
    return (json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8")


def _warn_about_proj_tap(model: nn.Module, tap: Tap) -> None:
    if tap == Tap.PROJ and has_cache_tap(model):
        logger.warning(
            "--tap proj observes the k_proj/v_proj outputs: keys before RoPE/normalization, so the "
            "factors will not match what this model's KV cache stores (--tap cache does)"
        )


def _check_report_dir(report_path: PathArg | None) -> None:
    if report_path is None:
        return
    parent = Path(os.fspath(report_path)).parent
    if not parent.is_dir():
        raise KvcalError(f"cannot write report {os.fspath(report_path)}: directory {parent} does not exist")


def default_tokenizer(model_entry: str, model_args: tuple[str, ...] | list[str]) -> str | None:
    """The model directory of a `...from_pretrained` entry point (its first bare --model-arg), if any."""
    if not model_entry.endswith("from_pretrained"):
        return None
    bare = [arg for arg in model_args if "=" not in arg]
    return bare[0] if bare and Path(bare[0]).is_dir() else None


def _check_paths(record_path: PathArg, report_path: PathArg | None, inputs: list[tuple[str, PathArg]]) -> None:
    _check_report_dir(report_path)
    outputs: dict[str, PathArg] = {} if report_path is None else {"report": report_path}
    outputs["record"] = record_path
    check_distinct_paths(outputs, inputs)


def _text_options(text: TextOptions | None, model_entry: str, model_args: tuple[str, ...] | list[str]) -> TextOptions:
    options = text or TextOptions()
    if options.tokenizer is None:
        options = dataclasses.replace(options, tokenizer=default_tokenizer(model_entry, model_args))
    return options


def _inputs(config_path: PathArg, files: Iterable[Path], checkpoint: PathArg | None) -> list[tuple[str, PathArg]]:
    inputs: list[tuple[str, PathArg]] = [("config", config_path), *(("data file", f) for f in files)]
    if checkpoint is not None:
        inputs.append(("checkpoint", checkpoint))
    return inputs


_ReportFile = Callable[[CalibrationResult | PtqCalibrationResult], Mapping[Path, bytes]]
"""The `--report` file, written in the record's transaction (either mode's result)."""


@dataclasses.dataclass(frozen=True)
class _Sources:
    """Where a run reads and writes: the command's file arguments and options."""

    model_entry: str
    model_args: tuple[str, ...]
    checkpoint: PathArg | None
    config_path: PathArg
    dataset_dir: PathArg
    record_path: PathArg
    report_path: PathArg | None
    text: TextOptions | None
    dry_run: bool
    force: bool


def _open_and_load(
    sources: _Sources, batch_num: int, target: torch.device
) -> tuple[Dataset | TextDataset, nn.Module, _ReportFile | None]:
    """The checks shared by both modes, then the model: (dataset, model, report companion).

    The dataset must give `batch_num` batches, no output may be another input or output,
    and the record must take the result; only then is the model loaded.
    """
    options = _text_options(sources.text, sources.model_entry, sources.model_args)
    dataset = open_data(sources.dataset_dir, options, needed_batches=batch_num, device=target)
    _check_paths(sources.record_path, sources.report_path, _inputs(sources.config_path, dataset.files, sources.checkpoint))
    check_record_early(sources.record_path, force=sources.force, dry_run=sources.dry_run)
    model = load_model(sources.model_entry, sources.model_args, sources.checkpoint)
    if sources.report_path is None:
        return dataset, model, None
    report_file = Path(sources.report_path)
    return dataset, model, lambda result: {report_file: report_json(result)}


def calibrate_from_files(
    *,
    model_entry: str,
    model_args: tuple[str, ...] | list[str] = (),
    checkpoint: PathArg | None = None,
    config_path: PathArg,
    dataset_dir: PathArg,
    record_path: PathArg,
    device: str = "auto",
    tap: Tap | str = Tap.AUTO,
    text: TextOptions | None = None,
    dry_run: bool = False,
    force: bool = False,
    report_path: PathArg | None = None,
    progress: ProgressCallback | None = None,
) -> CalibrationResult | PtqCalibrationResult:
    """`kvcal calibrate`: every check that needs no model first, then load the model and run.

    Before the model loads: the device, the config (parsed; its layers are checked against
    the model after), the dataset (it must give `batch_num` batches; text is read and the
    tokenizer loaded), the output paths, and the record (writable, lockable, parsable).
    A PTQ config returns a `PtqCalibrationResult` (`tap` does not apply to it).

    Raises:
        KvcalError: any bad input, before the model is loaded wherever it can be known then.
    """
    target = resolve_device(device)
    document = load_json(config_path)
    sources = _Sources(model_entry, tuple(model_args), checkpoint, config_path, dataset_dir, record_path,
                       report_path, text, dry_run, force)
    if is_ptq_config(document):
        return _calibrate_ptq(sources, document, target, Tap(tap), progress)
    plan = read_config(config_path)
    dataset, model, companions = _open_and_load(sources, plan.batch_num, target)
    check_layers_in_model(plan.layer_names, model, os.fspath(config_path))
    _warn_about_proj_tap(model, Tap(tap))
    return run_calibration(
        model=model,
        plan=plan,
        dataset_dir=dataset,
        record_path=record_path,
        device=device,
        tap=Tap(tap),
        dry_run=dry_run,
        force=force,
        progress=progress,
        record_checked=True,
        companions=companions,
    )


def _calibrate_ptq(
    sources: _Sources, document: object, target: torch.device, tap: Tap, progress: ProgressCallback | None
) -> PtqCalibrationResult:
    """The PTQ mode of `calibrate_from_files`: the same early checks, then `run_ptq_calibration`."""
    from kvcal.ptq.job import run_ptq_calibration
    from kvcal.ptq.preview import preview_config, refuse_ada

    if tap != Tap.AUTO:
        raise ConfigError(
            f"--tap {tap.value} is for KV-cache configs; {os.fspath(sources.config_path)} is a PTQ config, "
            "which observes each layer's input"
        )
    preview = preview_config(sources.config_path, document)
    refuse_ada(preview)
    dataset, model, companions = _open_and_load(sources, preview.batch_num, target)
    return run_ptq_calibration(
        model=model,
        config_path=sources.config_path,
        dataset_dir=dataset,
        record_path=sources.record_path,
        device=target,
        dry_run=sources.dry_run,
        force=sources.force,
        progress=progress,
        record_checked=True,
        companions=companions,
        preview=preview,
    )
