"""The `kvcal` command line: click commands only; each body calls one library function."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kvcal.errors import KvcalError

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


# --- gen-config (owned by the config work) ---


# --- calibrate (owned by the runtime work) ---


# --- inspect-record (owned by the record work) ---


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
