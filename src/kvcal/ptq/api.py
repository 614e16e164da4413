"""The PTQ front doors: the reference toolkit's `create_quant_config`, `generate_ptq_config`
behind `kvcal gen-config --ptq`, and `create_ptq_cali_model` (from `kvcal.ptq.cali_model`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from kvcal.errors import ConfigError
from kvcal.params import check_batch_num, check_bool
from kvcal.paths import check_distinct_paths
from kvcal.ptq.cali_model import create_ptq_cali_model
from kvcal.ptq.cfg import PtqCfg, check_cfg_names, load_ptq_cfg, plan_from_cfg
from kvcal.ptq.config_json import check_output_path, write_config
from kvcal.ptq.layers import Discovery, discover_layers, missing_name, module_classes
from kvcal.ptq.plan import Note, PtqPlan, PtqWarning, resolve_layer
from kvcal.text_data import TextOptions

__all__ = [
    "PtqResult",
    "build_ptq_plan",
    "check_skip_names",
    "create_ptq_cali_model",
    "create_quant_config",
    "generate_ptq_config",
    "plan_from_arguments",
    "split_names",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PtqResult:
    """A PTQ config built for a model: the plan, what discovery saw, and the notes about it."""

    plan: PtqPlan
    discovery: Discovery
    notes: tuple[Note, ...]


def plan_from_arguments(
    discovery: Discovery,
    *,
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    label: str = "skip_layers",
) -> tuple[PtqPlan, list[Note]]:
    """The plan without a `.cfg`: defaults everywhere, the listed layers skipped (PTQ.md §3).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a bad `batch_num`.
        ConfigError: a skipped name that is listed twice, missing (closest names given) or
            not quantizable, or no layer left to quantize; `label` names the list.
    """
    check_batch_num(batch_num)
    check_bool("activation_offset", activation_offset)
    names = check_skip_names(skip_layers, discovery.modules, label, discovery.layers)
    for name in names:
        if name not in discovery.layers:
            raise ConfigError(f"{label}: layer {name!r} {discovery.why_not_quantizable(name)}")
    notes: list[Note] = []
    layers = tuple(
        resolve_layer(
            name,
            layer_type,
            quant_enable=name not in names,
            chosen=None,
            common=None,
            activation_offset=activation_offset,
            notes=notes,
        )
        for name, layer_type in discovery.layers.items()
    )
    try:
        plan = PtqPlan(batch_num=batch_num, activation_offset=activation_offset, layers=layers)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return plan, notes


def check_skip_names(
    skip_layers: Sequence[str] | None,
    modules: Mapping[str, type[nn.Module]],
    label: str = "skip_layers",
    preferred: Iterable[str] | None = None,
) -> list[str]:
    """The skipped names: each a module of the model, none twice (checkable before the forward pass).

    Raises:
        TypeError: not a list of str.
        ConfigError: a name listed twice or missing (closest names given, `preferred` first).
    """
    names = _names(skip_layers, "skip_layers")
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"{label}: layer {name!r} is listed twice")
        if name not in modules:
            raise ConfigError(f"{label}: {missing_name(name, modules, preferred)}")
    return names


def _names(values: Sequence[str] | None, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{what} must be a list of layer names, got {values!r}")
    bad = next((value for value in values if not isinstance(value, str)), None)
    if bad is not None:
        raise TypeError(f"{what} must hold layer names (str), got {bad!r} ({type(bad).__name__})")
    return list(values)


def build_ptq_plan(
    model: nn.Module,
    input_data: Any,
    *,
    cfg: PtqCfg | str | os.PathLike[str] | None = None,
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    source: str = "input_data",
    label: str = "skip_layers",
) -> PtqResult:
    """Discover the quantizable layers with `input_data` and build the plan from `cfg` or the arguments.

    A `.cfg` path is parsed (and all its model-independent rules checked) before the
    model runs. With `cfg`, the three other arguments are not used.

    Raises:
        ConfigError: an invalid `.cfg` or argument, a model that raises on the input or has
            no quantizable layer for it.
    """
    parsed = load_ptq_cfg(cfg) if cfg is not None and not isinstance(cfg, PtqCfg) else cfg
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if parsed is None:
        check_batch_num(batch_num)
        check_bool("activation_offset", activation_offset)
        check_skip_names(skip_layers, module_classes(model), label)
    else:
        check_cfg_names(parsed, module_classes(model))
    discovery = discover_layers(model, input_data, source=source)
    if not discovery.layers:
        excluded = "; ".join(f"{m.name!r} ({m.type_name}): {m.reason}" for m in discovery.excluded[:3])
        more = f" … ({len(discovery.excluded)} in all)" if len(discovery.excluded) > 3 else ""
        detail = f"; not quantizable: {excluded}{more}" if excluded else ""
        raise ConfigError(
            f"{source}: the model has no quantizable layer (Linear, Conv2d, Conv3d, "
            f"ConvTranspose2d, AvgPool2d) for this input{detail}"
        )
    if parsed is not None:
        plan, notes = plan_from_cfg(parsed, discovery)
    else:
        plan, notes = plan_from_arguments(
            discovery, skip_layers=skip_layers, batch_num=batch_num, activation_offset=activation_offset, label=label
        )
    return PtqResult(plan=plan, discovery=discovery, notes=tuple(notes))


def create_quant_config(
    config_file: str | os.PathLike[str],
    model: nn.Module,
    input_data: Any,
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    config_defination: str | os.PathLike[str] | None = None,
) -> None:
    """The reference toolkit's API: write the PTQ JSON config `config_file` for `model`.

    Every excluded Linear/Conv/AvgPool module, every override that is ignored and every
    DMQ dropped is reported as a `kvcal.ptq.plan.PtqWarning`; settings that do not apply
    to a type and are adjusted as the reference toolkit does (quant_bits 6/7 → 8, ADA on
    other types) are logged at INFO on the `kvcal.ptq.api` logger.

    Args:
        config_file: the JSON config to write (replaced whole if it exists; untouched on error).
        model: the model; it is left exactly as it was.
        input_data: sample input, run once: a tensor, a tuple of positional arguments or a
            dict of keyword arguments.
        skip_layers: quantizable layers to leave in float (`quant_enable: false`).
        batch_num: batches the calibration will use.
        activation_offset: asymmetric activations by default.
        config_defination: (sic, the reference's spelling) a PTQ `.cfg`; it wins, and
            `skip_layers`, `batch_num` and `activation_offset` then only warn when given.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a bad `batch_num`.
        ConfigError: an invalid `.cfg` or argument, or a model that raises on `input_data`.
    """
    if not isinstance(config_file, (str, os.PathLike)):
        raise TypeError(f"config_file must be a path, got {config_file!r} ({type(config_file).__name__})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config_defination is not None:
        if not isinstance(config_defination, (str, os.PathLike)):
            raise TypeError(f"config_defination must be the path of a .cfg file, got {config_defination!r}")
        check_distinct_paths({"output": config_file}, [(".cfg file", config_defination)], error=ConfigError)
        _warn_ignored_arguments(skip_layers, batch_num, activation_offset)
    check_output_path(os.fspath(config_file))
    result = build_ptq_plan(
        model,
        input_data,
        cfg=config_defination,
        skip_layers=skip_layers,
        batch_num=batch_num,
        activation_offset=activation_offset,
    )
    report_notes(result)
    write_config(result.plan, config_file)


def _warn_ignored_arguments(skip_layers: Any, batch_num: Any, activation_offset: Any) -> None:
    """With a `.cfg`, the three keyword arguments are not used: say so when one differs from its default."""
    given = [
        name
        for name, differs in (
            (
                "skip_layers",
                skip_layers is not None and not (isinstance(skip_layers, (list, tuple)) and not skip_layers),
            ),
            ("batch_num", batch_num != 1 or isinstance(batch_num, bool)),
            ("activation_offset", activation_offset is not True),
        )
        if differs
    ]
    if given:
        warnings.warn(
            f"{', '.join(given)} ignored: config_defination is given, and the .cfg sets "
            "skip_layers, batch_num and activation_offset",
            PtqWarning,
            stacklevel=3,
        )


def report_notes(result: PtqResult) -> None:
    """The API's report: a PtqWarning per excluded module and per warning note; info notes logged."""
    for module in result.discovery.excluded:
        warnings.warn(
            f"layer {module.name!r} ({module.type_name}) is not quantized: {module.reason}", PtqWarning, stacklevel=3
        )
    for note in result.notes:
        if note.level == "warning":
            warnings.warn(note.message, PtqWarning, stacklevel=3)
        else:
            logger.info(note.message)


def split_names(values: Sequence[str], option: str) -> list[str]:
    """`--skip-layers` values (each `NAME[,NAME...]`, repeatable) → names, spaces stripped.

    Raises:
        ConfigError: an empty name (e.g. `a,,b` or a trailing comma).
    """
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            if not name.strip():
                raise ConfigError(f"{option} {value!r}: empty layer name")
            names.append(name.strip())
    return names


def generate_ptq_config(
    *,
    model_entry: str,
    model_args: Sequence[str] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    dataset_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    cfg: str | os.PathLike[str] | None = None,
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    text: TextOptions | None = None,
) -> PtqResult:
    """`kvcal gen-config --ptq`: the first batch of `dataset_dir` as sample input → the PTQ JSON.

    The dataset is read as `kvcal calibrate` reads it: tensor files, or text tokenized
    with `text` (its tokenizer defaults to the model directory of a `from_pretrained` entry).

    Cheap checks come first: the output path, the whole `.cfg` (all rules that need no
    model), the dataset listing and the first data file; then the model is loaded and run
    once. Nothing is written on error.

    Raises:
        KvcalError: any bad input (ConfigError, DatasetError, ModelLoadError).
    """
    from kvcal.calibration.job import default_tokenizer
    from kvcal.model_loader import load_model
    from kvcal.text_data import open_data

    target = os.fspath(output)
    check_output_path(target)
    parsed = None
    if cfg is not None:
        check_distinct_paths({"output": target}, [(".cfg file", cfg)], error=ConfigError)
        parsed = load_ptq_cfg(cfg)
    options = text or TextOptions()
    if options.tokenizer is None:
        options = dataclasses.replace(options, tokenizer=default_tokenizer(model_entry, model_args))
    dataset = open_data(dataset_dir, options, needed_batches=1, device="cpu")
    inputs: list[tuple[str, str | os.PathLike[str]]] = [("data file", f) for f in dataset.files]
    if checkpoint is not None:
        inputs.append(("checkpoint", checkpoint))
    check_distinct_paths({"output": target}, inputs, error=ConfigError)
    batch = next(iter(dataset))
    model = load_model(model_entry, tuple(model_args), checkpoint)
    return _build_and_write(model, batch, parsed, skip_layers, batch_num, activation_offset, target)


def _build_and_write(
    model: nn.Module,
    batch: Any,
    parsed: PtqCfg | None,
    skip_layers: Sequence[str] | None,
    batch_num: int,
    activation_offset: bool,
    target: str,
) -> PtqResult:
    result = build_ptq_plan(
        model,
        batch.kwargs if batch.kwargs else batch.args,
        cfg=parsed,
        skip_layers=skip_layers,
        batch_num=batch_num,
        activation_offset=activation_offset,
        source=f"data file {batch.path}",
        label="--skip-layers",
    )
    write_config(result.plan, target)
    return result
