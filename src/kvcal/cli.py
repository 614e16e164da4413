"""The `kvcal` command line: click commands only; each body calls one library function."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kvcal.errors import KvcalError

if TYPE_CHECKING:
    from kvcal.text_data import TextOptions

F = TypeVar("F", bound=Callable[..., Any])


def _debug_enabled(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or os.environ.get("KVCAL_DEBUG", "") not in ("", "0")


def handle_errors(func: F) -> F:
    """Turn a KvcalError (and a few expected exceptions) into one `error:` line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except (KvcalError, OSError, ValueError, TypeError) as exc:
            if _debug_enabled(ctx):
                raise
            from kvcal.output import print_error

            print_error(str(exc) if isinstance(exc, KvcalError) else f"{type(exc).__name__}: {exc}")
            ctx.exit(1)
        except KeyboardInterrupt:
            if _debug_enabled(ctx):
                raise
            from kvcal.output import print_error

            print_error("interrupted; nothing was written")
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:
            # Nothing the library knows to name: still one line, never a traceback.
            if _debug_enabled(ctx):
                raise
            from kvcal.output import print_error

            print_error(f"unexpected {type(exc).__name__}: {exc} (kvcal --debug shows where)")
            ctx.exit(1)

    return wrapper  # type: ignore[return-value]


def model_options(func: F) -> F:
    """--model, --model-arg and --checkpoint, shared by gen-config and calibrate."""
    func = click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False),
        default=None,
        help="State dict to load strictly after building the model (.pt/.pth with weights_only, or .safetensors).",
    )(func)
    func = click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="K=V",
        help="Argument for the model factory: K=V is a keyword (V parsed as JSON when it parses), "
        "a bare V is positional. Repeatable.",
    )(func)
    func = click.option(
        "--model",
        "model_entry",
        required=True,
        metavar="ENTRY",
        help="Model entry point: 'package.module:attr' or 'path/to/file.py:attr' (a module or a factory).",
    )(func)
    return func


_TEXT_PARAMS = ("tokenizer", "text_field", "seq_len", "batch_size", "num_samples")


def text_options(func: F) -> F:
    """--tokenizer, --text-field, --seq-len, --batch-size and --num-samples: how text datasets are batched.

    The command receives them as one `text: TextOptions` argument.
    """

    command = func

    @functools.wraps(command)
    def with_text(*args: Any, **kwargs: Any) -> Any:
        from kvcal.text_data import TextOptions

        kwargs["text"] = TextOptions(*(kwargs.pop(name) for name in _TEXT_PARAMS))
        return command(*args, **kwargs)

    func = with_text  # type: ignore[assignment]
    func = click.option(
        "--num-samples", type=click.IntRange(min=1), default=None,
        help="Text: use at most this many samples (default: as many as batch_num batches need).",
    )(func)
    func = click.option(
        "--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
        help="Text: samples per batch.",
    )(func)
    func = click.option(
        "--seq-len", type=click.IntRange(min=1), default=512, show_default=True,
        help="Text: each sample is truncated to this many tokens; batches are right-padded (padding is masked).",
    )(func)
    func = click.option(
        "--text-field", default="text", show_default=True, help="Text: the field of a .jsonl/.json record to use."
    )(func)
    func = click.option(
        "--tokenizer", type=click.Path(file_okay=False), default=None, metavar="DIR",
        help="Text: a local transformers tokenizer directory (default: the model directory of a "
        "'...from_pretrained' --model).",
    )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors (same as KVCAL_DEBUG=1).")
@click.version_option(package_name="kvcal")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """kvcal: calibrate INT8 KV-cache quantization (IFMR / HFMG) for PyTorch models.

    \b
    Typical flow:
      kvcal gen-config --model scripts/demo_model.py:build --cfg configs/example.cfg -o config.json
      kvcal calibrate  --model scripts/demo_model.py:build --config config.json \\
                       --dataset data/ --record record.txt
      kvcal inspect-record record.txt
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# --- gen-config ---


@main.command("gen-config")
@model_options
@click.option(
    "--cfg",
    "cfg",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="QUANT.cfg",
    help="Simple config (protobuf text format, AMCTQuantCaliConfig) naming the layers and their settings; "
    "with --ptq, a PTQ simple config (AMCTConfig).",
)
@click.option(
    "--quant-layers",
    "quant_layers",
    multiple=True,
    metavar="NAME[,NAME...]",
    help="Layers to calibrate with the IFMR defaults, instead of --cfg. Comma-separated; repeatable.",
)
@click.option(
    "--batch-num",
    type=click.IntRange(min=1),
    default=None,
    help="With --quant-layers or --ptq (without --cfg): batches per layer (default 1).",
)
@click.option(
    "--algo",
    type=click.Choice(["ifmr", "hfmg"]),
    default=None,
    help="With --quant-layers: the algorithm, with its default parameters (default ifmr).",
)
@click.option(
    "--granularity",
    type=click.Choice(["per_tensor", "per_channel"]),
    default=None,
    help="With --quant-layers: one scale per layer or per channel (default per_tensor).",
)
@click.option(
    "--ptq",
    is_flag=True,
    help="Whole-network post-training quantization config (every Linear/Conv2d/Conv3d/ConvTranspose2d/AvgPool2d "
    "layer that the first batch of --dataset runs) instead of a KV-cache one.",
)
@click.option(
    "--dataset",
    "dataset_dir",
    type=click.Path(),
    default=None,
    metavar="PATH",
    help="With --ptq: data directory whose first batch (as calibrate loads it) is run once to find the layers.",
)
@click.option(
    "--skip-layers",
    "skip_layers",
    multiple=True,
    metavar="NAME[,NAME...]",
    help="With --ptq (without --cfg): quantizable layers to leave in float. Comma-separated; repeatable.",
)
@click.option(
    "--activation-offset/--no-activation-offset",
    "activation_offset",
    default=None,
    help="With --ptq (without --cfg): asymmetric (default) or symmetric activation quantization.",
)
@text_options
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="CONFIG.json",
    help="JSON config to write (replaced whole; left untouched on error).",
)
@handle_errors
def gen_config_command(
    model_entry: str,
    model_args: tuple[str, ...],
    checkpoint: str | None,
    cfg: str | None,
    quant_layers: tuple[str, ...],
    batch_num: int | None,
    algo: str | None,
    granularity: str | None,
    ptq: bool,
    dataset_dir: str | None,
    skip_layers: tuple[str, ...],
    activation_offset: bool | None,
    text: TextOptions,
    output: str,
) -> None:
    """Build the per-layer JSON config of a model from a .cfg or a list of layers.

    Layer names in --quant-layers and in the .cfg may be shell-style globs, expanded over
    the model's Linear layers in model order (the JSON lists the expanded names).

    \b
    Examples:
      kvcal gen-config --model scripts/demo_model.py:build --cfg configs/example.cfg -o config.json
      kvcal gen-config --model scripts/demo_model.py:build --quant-layers 'model.layers.*.self_attn.[kv]_proj' \\
          --algo hfmg --granularity per_channel --batch-num 2 -o config.json
      kvcal gen-config --ptq --model scripts/demo_cnn_model.py:build --dataset demo_out/cnn_data \\
          --cfg configs/ptq_example.cfg -o ptq_config.json

    With --ptq, the config covers the whole network (PTQ): the first batch of --dataset is
    run once to find the quantizable layers; --cfg is then a PTQ simple config, or
    --skip-layers/--batch-num/--activation-offset give the defaults to every layer.
    """
    if ptq:
        _gen_ptq_config(model_entry, model_args, checkpoint, cfg, quant_layers, batch_num, algo, granularity,
                        dataset_dir, skip_layers, activation_offset, output, text)
    else:
        if dataset_dir is not None or skip_layers or activation_offset is not None:
            raise click.UsageError("--dataset, --skip-layers and --activation-offset go with --ptq")
        _gen_kv_config(model_entry, model_args, checkpoint, cfg, quant_layers, batch_num, algo, granularity, output)


def _gen_kv_config(
    model_entry: str, model_args: tuple[str, ...], checkpoint: str | None, cfg: str | None,
    quant_layers: tuple[str, ...], batch_num: int | None, algo: str | None, granularity: str | None, output: str,
) -> None:
    """`gen-config` without --ptq: usage checks, the model-free .cfg checks, then `kvcal.kv.api.generate_config`."""
    if (cfg is None) == (not quant_layers):
        raise click.UsageError("give exactly one of --cfg and --quant-layers")
    if cfg is not None and (batch_num, algo, granularity) != (None, None, None):
        raise click.UsageError("--batch-num, --algo and --granularity go with --quant-layers; the .cfg sets them")
    from kvcal.kv.api import generate_config, split_layer_names
    from kvcal.model_loader import load_model
    from kvcal.output import render_gen_config

    names = split_layer_names(quant_layers) if quant_layers else None
    if cfg is not None:
        from kvcal.kv.cfg import load_cfg
        from kvcal.ptq.cfg import check_not_ptq_cfg

        check_not_ptq_cfg(cfg)  # a PTQ .cfg here: say to use --ptq, before the model loads
        load_cfg(cfg, None)  # every rule that needs no model, before the model loads
    model = load_model(model_entry, model_args, checkpoint)
    plan = generate_config(
        model=model,
        output=output,
        cfg=cfg,
        quant_layers=names,
        batch_num=batch_num or 1,
        algo="hfmg" if algo == "hfmg" else "ifmr",
        granularity=granularity or "per_tensor",
    )
    render_gen_config(plan, output)


def _gen_ptq_config(
    model_entry: str, model_args: tuple[str, ...], checkpoint: str | None, cfg: str | None,
    quant_layers: tuple[str, ...], batch_num: int | None, algo: str | None, granularity: str | None,
    dataset_dir: str | None, skip_layers: tuple[str, ...], activation_offset: bool | None, output: str,
    text: TextOptions,
) -> None:
    """`gen-config --ptq`: usage checks, then `kvcal.ptq.api.generate_ptq_config`."""
    if quant_layers or algo is not None or granularity is not None:
        raise click.UsageError("--quant-layers, --algo and --granularity are for KV-cache configs, not --ptq")
    if dataset_dir is None:
        raise click.UsageError("--ptq needs --dataset DIR: its first batch shows which layers run")
    if cfg is not None and (skip_layers or batch_num is not None or activation_offset is not None):
        raise click.UsageError("--skip-layers, --batch-num and --activation-offset go without --cfg; the .cfg sets them")
    from kvcal.output import library_warnings, render_ptq_config
    from kvcal.ptq.api import generate_ptq_config, split_names

    with library_warnings():
        result = generate_ptq_config(
            model_entry=model_entry,
            model_args=model_args,
            checkpoint=checkpoint,
            dataset_dir=dataset_dir,
            output=output,
            cfg=cfg,
            skip_layers=split_names(skip_layers, "--skip-layers") if skip_layers else None,
            batch_num=batch_num or 1,
            activation_offset=True if activation_offset is None else activation_offset,
            text=text,
        )
    render_ptq_config(result, output)


# --- layers ---


@main.command("layers")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON on stdout.")
@handle_errors
def layers_command(model_entry: str, model_args: tuple[str, ...], checkpoint: str | None, as_json: bool) -> None:
    """List the model's Linear layers: name, in/out features, and which are K/V or fused QKV projections.

    \b
    Example:
      kvcal layers --model scripts/demo_model.py:build
    """
    import json

    from kvcal.kv.layers import linear_layers
    from kvcal.model_loader import load_model
    from kvcal.output import render_layers

    layers = linear_layers(load_model(model_entry, model_args, checkpoint))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(layer) for layer in layers], indent=2))
    else:
        render_layers(layers)


# --- calibrate ---


@main.command("calibrate")
@model_options
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="CONFIG.json",
    help="Per-layer JSON config written by gen-config (validated against the model): KV-cache, or PTQ "
    "(gen-config --ptq) to calibrate the whole network.",
)
@click.option(
    "--dataset",
    "dataset_dir",
    required=True,
    type=click.Path(),
    metavar="PATH",
    help="Directory of data files (.pt/.pth/.npy/.npz/.safetensors), one batch each, in file-name order; "
    "or text: a .jsonl/.json/.txt file or a directory of them, tokenized with --tokenizer.",
)
@click.option(
    "--record",
    "record_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="RECORD.txt",
    help="Record to merge the factors into (created if missing; other entries are kept).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda[:N]|npu[:N]",
    help="Where the model and the calibration run; auto picks an Ascend NPU, else CUDA, else the CPU.",
)
@click.option(
    "--tap",
    type=click.Choice(["auto", "cache", "proj"]),
    default="auto",
    show_default=True,
    help="What to observe: 'cache' = the keys/values a transformers KV cache stores (after RoPE and "
    "q/k norm); 'proj' = the Linear output (AMCT's semantics); 'auto' = cache when the model writes one.",
)
@text_options
@click.option("--dry-run", is_flag=True, help="Calibrate and report, but write no record.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="REPORT.json",
    help="Also write the summary and the overwrite report as JSON.",
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar, summary or overwrite report; errors and warnings only."
)
@click.option("--force", is_flag=True, help="Move an unreadable record aside to RECORD.txt.bak and write a fresh one.")
@handle_errors
def calibrate_command(
    model_entry: str,
    model_args: tuple[str, ...],
    checkpoint: str | None,
    config_path: str,
    dataset_dir: str,
    record_path: str,
    device: str,
    tap: str,
    text: TextOptions,
    dry_run: bool,
    report_path: str | None,
    quiet: bool,
    force: bool,
) -> None:
    """Run the dataset through the model, compute each layer's INT8 factors (KV cache or PTQ), merge them into the record.

    By default (--tap auto) a transformers model is observed where its KV cache is written,
    so keys are calibrated after RoPE / q-k normalization, as serving engines store them;
    --tap proj observes the k_proj/v_proj outputs as AMCT does. Positions whose
    attention_mask is 0 are excluded.

    A PTQ config (written by gen-config --ptq) calibrates the whole network on a copy of
    the model: BN fusion, DMQ, ARQ weight factors, each layer's input through IFMR/HFMG;
    the summary adds weight, input, output and model SQNR, worst layer first.

    \b
    Examples:
      kvcal calibrate --model scripts/demo_model.py:build --config config.json \\
          --dataset demo_out/data --record record.txt --report report.json
      kvcal calibrate --model scripts/demo_cnn_model.py:build --config ptq_config.json \\
          --dataset demo_out/cnn_data --record ptq_record.txt
    """
    from kvcal.calibration.job import calibrate_from_files
    from kvcal.output import (
        calibration_progress,
        library_warnings,
        render_calibration_summary,
        render_overwrite_report,
    )

    with library_warnings(), calibration_progress(enabled=not quiet) as progress:
        result = calibrate_from_files(
            model_entry=model_entry,
            model_args=model_args,
            checkpoint=checkpoint,
            config_path=config_path,
            dataset_dir=dataset_dir,
            record_path=record_path,
            device=device,
            tap=tap,
            text=text,
            dry_run=dry_run,
            force=force,
            report_path=report_path,
            progress=progress,
        )
    if not quiet:
        render_calibration_summary(result)
        render_overwrite_report(result.report)


# --- inspect-record ---


@main.command("inspect-record")
@click.argument("record", type=click.Path())
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Show every channel's scale and offset of this layer (with --diff: limit the diff to it). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the same information as JSON on stdout.")
@click.option(
    "--diff",
    "other",
    type=click.Path(),
    default=None,
    metavar="OTHER",
    help="Compare RECORD (old) with OTHER (new) layer by layer: added, removed, changed, unchanged.",
)
@handle_errors
def inspect_record_command(record: str, layers: tuple[str, ...], as_json: bool, other: str | None) -> None:
    """Show what a record file holds: layer, kind, channels, scale and offset ranges.

    \b
    Examples:
      kvcal inspect-record record.txt
      kvcal inspect-record record.txt --layer model.layers.0.self_attn.k_proj
      kvcal inspect-record old_record.txt --diff record.txt --json
    """
    import json

    from kvcal.output import render_inspection
    from kvcal.record.inspect import inspect_record

    result = inspect_record(record, layers=layers, diff=other)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, allow_nan=False))
    else:
        render_inspection(result)


# --- export ---


@main.command("export")
@click.argument("record", type=click.Path(dir_okay=False), metavar="RECORD")
@click.option(
    "--model-dir",
    required=True,
    type=click.Path(file_okay=False),
    metavar="HF_DIR",
    help="The Hugging Face model directory the record was calibrated on (*.safetensors or pytorch_model.bin).",
)
@click.option(
    "--format",
    "export_format",
    required=True,
    type=click.Choice(["vllm-ascend"]),
    help="What to write: vllm-ascend = a directory vllm-ascend serves with its INT8 (C8) KV cache.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    metavar="OUT_DIR",
    help="Directory to create (written beside it, then renamed into place; left untouched on error).",
)
@click.option(
    "--allow-offset",
    is_flag=True,
    help="Export non-zero (asymmetric) offsets; only for an engine that applies kv_cache_offset.",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR when it exists and is not empty (once the export is complete).")
@handle_errors
def export_command(
    record: str, model_dir: str, export_format: str, output: str, allow_offset: bool, force: bool
) -> None:
    """Write the model with the record's KV-cache factors in the layout a serving engine loads.

    vllm-ascend: the weights unchanged, plus kv_cache_scale / kv_cache_offset per K/V layer,
    and quant_model_description.json (C8). Calibrate symmetric (activation_offset: false)
    with the cache tap: the C8 cache applies the scale only, to keys after RoPE.

    \b
    Example:
      kvcal export record.txt --model-dir /models/llama --format vllm-ascend -o /models/llama-c8
      vllm serve /models/llama-c8 --quantization ascend
    """
    from kvcal.export.vllm_ascend import export_vllm_ascend
    from kvcal.output import render_export

    result = export_vllm_ascend(
        record=record, model_dir=model_dir, output=output, allow_offset=allow_offset, force=force
    )
    render_export(result)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
