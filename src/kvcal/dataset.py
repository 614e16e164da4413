"""Dataset directory -> batches, with safe loaders only (no pickle is ever executed).

Each regular file directly in the directory with a supported extension is one batch, in
sorted file-name order. What a file holds decides the model call: one tensor/array `x`
-> `model(x)`; a list/tuple -> `model(*items)`; a dict or several named arrays ->
`model(**items)`. Files are read lazily, one per step of the iteration, so files past
the ones the calibration needs are never opened.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvcal.errors import DatasetError
from kvcal.messages import first_line
from kvcal.tensor_io import OPEN_ERRORS, TensorFileError, load_safetensors, load_torch

__all__ = ["SUPPORTED_EXTENSIONS", "Batch", "Dataset", "open_dataset", "load_batch"]

SUPPORTED_EXTENSIONS = (".pt", ".pth", ".npy", ".npz", ".safetensors")

_NPZ_POSITIONAL_PREFIX = "arr_"

# Skipped files are logged (the CLI prints kvcal's log warnings) and listed in Dataset.skipped.
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One data file, ready to call the model with: `model(*args, **kwargs)`."""

    path: Path
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, model: Any) -> Any:
        """Run `model` on this batch."""
        return model(*self.args, **self.kwargs)


@dataclass(frozen=True)
class Dataset:
    """A dataset directory: the batch files in order, and the files skipped.

    Iterating loads one file per step and moves its tensors to `device`.
    """

    directory: Path
    files: tuple[Path, ...]
    skipped: tuple[Path, ...] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Batch]:
        for path in self.files:
            yield load_batch(path, self.device)

    def skipped_messages(self) -> list[str]:
        """One warning line per skipped file (what `open_dataset` logs)."""
        accepted = ", ".join(SUPPORTED_EXTENSIONS)
        return [f"{path}: skipped, not a supported data file ({accepted})" for path in self.skipped]


def open_dataset(directory: str | Path, device: torch.device | str = "cpu") -> Dataset:
    """List a dataset directory without reading any data file.

    Hidden files (name starting with ".") and subdirectories are ignored silently; other
    files without a supported extension are listed in `Dataset.skipped` and logged as
    warnings on the `kvcal.dataset` logger.

    Raises:
        DatasetError: the directory is missing, not a directory, unreadable, or holds no
            supported file.
    """
    root = Path(directory)
    if not root.exists():
        raise DatasetError(f"dataset directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset {str(root)!r} is not a directory")
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DatasetError(f"cannot list dataset directory {str(root)!r}: {exc.strerror or exc}") from exc
    files: list[Path] = []
    skipped: list[Path] = []
    for path in entries:
        if path.name.startswith(".") or not path.is_file():
            continue
        (files if path.suffix.lower() in SUPPORTED_EXTENSIONS else skipped).append(path)
    dataset = Dataset(directory=root, files=tuple(files), skipped=tuple(skipped), device=torch.device(device))
    for message in dataset.skipped_messages():
        logger.warning(message)
    if not files:
        accepted = ", ".join(SUPPORTED_EXTENSIONS)
        extra = f" ({len(skipped)} other file(s) skipped)" if skipped else ""
        raise DatasetError(f"dataset directory {str(root)!r} has no data file ({accepted}){extra}")
    return dataset


def load_batch(path: str | Path, device: torch.device | str = "cpu") -> Batch:
    """Read one data file into a `Batch` on `device`.

    Raises:
        DatasetError: naming the file, when it is unreadable, truncated, pickled or holds
            something that is not tensors/arrays.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            content = _load_torch(path)
        elif suffix == ".npy":
            content = _load_npy(path)
        elif suffix == ".npz":
            content = _load_npz(path)
        elif suffix == ".safetensors":
            content = _load_safetensors(path)
        else:
            raise DatasetError(f"{path}: unsupported data file extension {path.suffix!r}")
        return _to_batch(path, content, torch.device(device))
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read data file: {exc.strerror or exc}") from exc


def _load_torch(path: Path) -> Any:
    try:
        return load_torch(path)
    except TensorFileError as exc:
        text = str(exc)
        if text.startswith("not a torch file"):
            hint = "; write data files with torch.save, or use .npy/.npz/.safetensors"
        elif "pickled" in text:
            hint = "; save plain tensors, lists/tuples or dicts of tensors"
        else:
            hint = ""
        raise DatasetError(f"{path}: {exc}{hint}") from exc


def _numpy_to_tensor(path: Path, name: str, array: np.ndarray) -> Tensor:
    if array.dtype.hasobject:
        raise DatasetError(f"{path}: array {name} holds Python objects, which are not loaded")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as exc:
        raise DatasetError(f"{path}: array {name} has dtype {array.dtype}, which torch cannot hold: {exc}") from exc


def _numpy_error(path: Path, kind: str, exc: Exception) -> DatasetError:
    if "allow_pickle" in str(exc):
        return DatasetError(f"{path}: holds pickled Python objects, which are not loaded (allow_pickle=False)")
    return DatasetError(f"{path}: not a readable {kind} file (truncated or malformed?): {first_line(exc)}")


def _load_npy(path: Path) -> Tensor:
    # Our own handle: np.load leaks the one it opens when a zip archive is malformed.
    with open(path, "rb") as handle:
        try:
            array = np.load(handle, allow_pickle=False)
        except OPEN_ERRORS:
            raise
        except Exception as exc:
            raise _numpy_error(path, ".npy", exc) from exc
        if not isinstance(array, np.ndarray):
            raise DatasetError(f"{path}: not a .npy array (it is an archive of several arrays; name it .npz)")
    return _numpy_to_tensor(path, "", array)


def _load_npz(path: Path) -> tuple[Tensor, ...] | dict[str, Tensor]:
    with open(path, "rb") as handle:
        try:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DatasetError(
                    f"{path}: not an .npz archive (it holds a single {type(loaded).__name__}; name it .npy)"
                )
            with loaded as archive:
                # Members are read (and CRC-checked) here, so truncation surfaces now.
                named = {name: _numpy_to_tensor(path, repr(name), archive[name]) for name in archive.files}
        except (DatasetError, *OPEN_ERRORS):
            raise
        except Exception as exc:
            raise _numpy_error(path, ".npz", exc) from exc
    positional = [f"{_NPZ_POSITIONAL_PREFIX}{i}" for i in range(len(named))]
    # np.savez(f, a, b) names unnamed arrays arr_0, arr_1, ...: those are positional arguments.
    if named and sorted(named) == sorted(positional):
        return tuple(named[name] for name in positional)
    return named


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_safetensors(path)
    except TensorFileError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


def _move(path: Path, value: Any, device: torch.device, where: str) -> Any:
    """Move every tensor inside lists/tuples/dicts to `device`; other leaves stay as they are."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, np.ndarray):
        return _numpy_to_tensor(path, where, value).to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(path, item, device, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, dict):
        return {key: _move(path, item, device, f"{where}[{key!r}]") for key, item in value.items()}
    return value


def _to_batch(path: Path, content: Any, device: torch.device) -> Batch:
    if isinstance(content, (Tensor, np.ndarray)):
        return Batch(path, args=(_move(path, content, device, "content"),))
    if isinstance(content, (list, tuple)):
        if not content:
            raise DatasetError(f"{path}: holds an empty {type(content).__name__}; nothing to call the model with")
        return Batch(path, args=tuple(_move(path, item, device, f"item {i}") for i, item in enumerate(content)))
    if isinstance(content, dict):
        if not content:
            raise DatasetError(f"{path}: holds no tensors; nothing to call the model with")
        bad = [key for key in content if not isinstance(key, str)]
        if bad:
            raise DatasetError(f"{path}: dict keys must be argument names (str), got {bad[0]!r}")
        return Batch(path, kwargs={key: _move(path, item, device, repr(key)) for key, item in content.items()})
    raise DatasetError(
        f"{path}: holds a {type(content).__name__}; expected a tensor/array, a list/tuple of them, or a dict "
        "of named tensors"
    )
