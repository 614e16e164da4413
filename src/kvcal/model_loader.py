"""The user's model from an entry point: `package.module:attr` or `path/to/file.py:attr`.

See CLI.md "Loading the user's model". Every failure is a `ModelLoadError` that names
the entry point (and the checkpoint when that is what failed).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kvcal.errors import ModelLoadError
from kvcal.messages import describe, did_you_mean
from kvcal.tensor_io import TensorFileError, load_safetensors, load_torch

__all__ = ["load_model", "parse_model_args"]

_counter = itertools.count()
_MAX_LISTED = 5


def load_model(
    entry: str,
    model_args: Sequence[str] = (),
    checkpoint: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Import the entry point, build the model, load the checkpoint strictly, put it in eval mode.

    Args:
        entry: `package.module:attr` or `path/to/file.py:attr`; `attr` may be dotted. An
            `nn.Module` instance is used as is; a callable is called with `model_args`.
        model_args: `K=V` (a keyword argument) or `V` (a positional one); V is parsed as
            a JSON literal when it parses, else taken as a string.
        checkpoint: a state dict: `.safetensors`, else anything `torch.load(weights_only=True)` reads.

    Raises:
        ModelLoadError: naming the entry point and what went wrong.
    """
    target, attr = _split_entry(entry)
    module = _import_file(target, entry) if _is_file_target(target) else _import_module(target, entry)
    obj = _resolve(module, attr, target, entry)
    model = _build(obj, model_args, entry)
    if checkpoint is not None:
        _load_checkpoint(model, os.fspath(checkpoint), entry)
    model.eval()
    return model


def parse_model_args(model_args: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """Split `--model-arg` values into positional and keyword arguments.

    `K=V` is a keyword (K must be a Python identifier); a value without `=` is positional.
    Every value is a JSON literal when it parses (`4`, `true`, `null`, `[1, 2]`, `"x"`),
    else the string itself.

    Raises:
        ModelLoadError: a keyword that is not an identifier, or given twice.
    """
    if isinstance(model_args, (str, bytes)):
        raise TypeError(f"model_args must be a sequence of 'K=V' / 'V' strings, got the single string {model_args!r}")
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for arg in model_args:
        if not isinstance(arg, str):
            raise TypeError(f"each model argument must be a str, got {arg!r} ({type(arg).__name__})")
        key, sep, value = arg.partition("=")
        if not sep:
            positional.append(_parse_value(arg))
            continue
        if not key.isidentifier():
            raise ModelLoadError(
                f"--model-arg {arg!r}: {key!r} is not a valid keyword name (use K=V with K a Python identifier, "
                "or a bare V for a positional argument)"
            )
        if key in keywords:
            raise ModelLoadError(f"--model-arg {arg!r}: keyword {key!r} is given twice")
        keywords[key] = _parse_value(value)
    return positional, keywords


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_entry(entry: str) -> tuple[str, str]:
    if not isinstance(entry, str):
        raise TypeError(f"the model entry point must be a str, got {entry!r} ({type(entry).__name__})")
    # rpartition: a Windows path keeps its drive colon.
    target, sep, attr = entry.rpartition(":")
    if not sep or not target or not attr:
        raise ModelLoadError(
            f"model entry point {entry!r} is not 'package.module:attr' or 'path/to/file.py:attr'"
        )
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ModelLoadError(f"model entry point {entry!r}: {attr!r} is not a (dotted) Python attribute name")
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target or (os.altsep or "/") in target


@contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    """`directory` first on sys.path for the duration of an import (no-op if already there)."""
    if directory in sys.path:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        try:
            sys.path.remove(directory)
        except ValueError:  # the imported code removed it itself
            pass


def _import_file(target: str, entry: str) -> ModuleType:
    path = os.path.abspath(target)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model entry point {entry!r}: file {target!r} does not exist")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    # A unique name: two entry files called model.py must not replace each other.
    name = f"_kvcal_entry_{stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"model entry point {entry!r}: cannot import {target!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as a normal import does (dataclasses, pickling need it).
    sys.modules[name] = module
    try:
        with _on_sys_path(os.path.dirname(path)):
            spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)  # also on Ctrl-C: no half-run module stays behind
        if not isinstance(exc, (Exception, SystemExit)):
            raise
        raise ModelLoadError(
            f"model entry point {entry!r}: importing {target!r} failed: {describe(exc)}"
        ) from exc
    return module


def _import_module(target: str, entry: str) -> ModuleType:
    # The working directory is importable, as with `python -m` (a console script lacks it).
    try:
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(target)
    except (Exception, SystemExit) as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and (target == missing or target.startswith(missing + ".")):
            reason = f"no module named {missing!r}"
        else:
            reason = describe(exc)
        raise ModelLoadError(f"model entry point {entry!r}: cannot import {target!r}: {reason}") from exc


def _resolve(module: ModuleType, attr: str, target: str, entry: str) -> Any:
    obj: Any = module
    owner = target
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = did_you_mean(part, [n for n in dir(obj) if not n.startswith("_")])
            raise ModelLoadError(f"model entry point {entry!r}: {owner!r} has no attribute {part!r}{hint}") from None
        except Exception as exc:
            raise ModelLoadError(
                f"model entry point {entry!r}: reading {part!r} of {owner!r} failed: {describe(exc)}"
            ) from exc
        owner = f"{owner}.{part}" if owner != target else f"{target}:{part}"
    return obj


def _build(obj: Any, model_args: Sequence[str], entry: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        if model_args:
            raise ModelLoadError(
                f"model entry point {entry!r} is an nn.Module instance; --model-arg needs a factory or class"
            )
        return obj
    if not callable(obj):
        raise ModelLoadError(
            f"model entry point {entry!r} is a {type(obj).__name__}, neither an nn.Module nor a callable returning one"
        )
    positional, keywords = parse_model_args(model_args)
    try:
        result = obj(*positional, **keywords)
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(f"model entry point {entry!r} raised {describe(exc)}") from exc
    if not isinstance(result, nn.Module):
        raise ModelLoadError(
            f"model entry point {entry!r} returned a {type(result).__name__}, not a torch.nn.Module"
        )
    return result


def _load_checkpoint(model: nn.Module, path: str, entry: str) -> None:
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {path!r} for model entry point {entry!r} does not exist")
    state = _read_state_dict(path)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(
            f"checkpoint {path!r} does not hold a state dict (a mapping of names to tensors), "
            f"got {type(state).__name__}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        summary = _mismatch_summary(model, state)
        raise ModelLoadError(
            f"checkpoint {path!r} does not match the model from {entry!r}: {summary or exc}"
        ) from None


def _read_state_dict(path: str) -> Any:
    reader = load_safetensors if path.lower().endswith(".safetensors") else load_torch
    try:
        return reader(path)
    except TensorFileError as exc:
        raise ModelLoadError(f"checkpoint {path!r}: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"checkpoint {path!r} cannot be read: {describe(exc)}") from None


def _mismatch_summary(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for singular, plural, items in (
        ("missing key", "missing keys", missing),
        ("unexpected key", "unexpected keys", unexpected),
        ("shape mismatch", "shape mismatches", resized),
    ):
        if items:
            shown = ", ".join(items[:_MAX_LISTED])
            more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {singular if len(items) == 1 else plural}: {shown}{more}")
    return "; ".join(parts)
