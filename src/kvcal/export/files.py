"""Model directories in, export directories out: what every serving format shares.

Reading: a Hugging Face model directory's weights (`*.safetensors`, with their index when
sharded; else `pytorch_model*.bin`, loaded with `weights_only=True`) and the rest of its
files. Writing: safetensors files, sharded with an index past a size, into a directory
staged beside the output and renamed into place only once it is complete.

Decisions:

* Weight files are named by their suffix (`WEIGHT_SUFFIXES`, any `*.index.json`); they
  are never copied, so no old index can make an engine look for shards that are not
  there. Only the directory's top-level files are copied (symlinks followed, as in a Hub
  snapshot); subdirectories and hidden files are listed as skipped.
* Safetensors first: with `model.safetensors.index.json`, exactly the files it names;
  else `model.safetensors`; else every `*.safetensors` file. Then `.bin` the same way
  (`pytorch_model.bin.index.json`, else `pytorch_model.bin`). A tensor name found in two
  files is an error.
* Safetensors headers are read directly (8-byte length + JSON): names, shapes and sizes
  are known before any tensor is loaded, and each output shard loads only its tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kvcal.errors import ExportError
from kvcal.messages import first_line

__all__ = [
    "WEIGHT_SUFFIXES",
    "TensorInfo",
    "ModelDir",
    "read_model_dir",
    "load_tensors",
    "plan_shards",
    "write_safetensors",
    "write_text",
    "copy_files",
    "check_output_dir",
    "staged_directory",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
_SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes and checks when loading


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the model directory: its shape and size, and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path


@dataclass(frozen=True)
class ModelDir:
    """What an export reads from a model directory.

    Attributes:
        path: the directory.
        kind: where the weights are: safetensors files or a pickle-free torch.load of `.bin`.
        tensors: every weight tensor, name → info, in file order.
        files: the top-level non-weight files to copy.
        skipped: names of entries not copied (subdirectories, hidden files).
        config: the parsed `config.json` ({} when absent).
        loaded: for `.bin` weights, the tensors torch.load gave (safetensors: empty, read on use).
    """

    path: Path
    kind: Literal["safetensors", "bin"]
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    skipped: tuple[str, ...]
    config: dict[str, Any]
    loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (`__metadata__` removed)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("the file is shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > _HEADER_LIMIT:
                raise ValueError(f"header length {length} is not plausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read safetensors file {path}: {first_line(exc)}") from exc
    if not isinstance(header, dict):
        raise ExportError(f"cannot read safetensors file {path}: its header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _index_files(directory: Path, index: Path) -> list[Path]:
    """The weight files an index names, in first-mention order; each must exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot read weight index {index}: {first_line(exc)}") from exc
    files = [directory / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"weight index {index} names {missing[0]!r}, which is not in {directory}")
    return files


def _add_tensor(tensors: dict[str, TensorInfo], info: TensorInfo) -> None:
    old = tensors.get(info.name)
    if old is not None:
        raise ExportError(
            f"tensor {info.name!r} is in both {old.file} and {info.file}; which one the model uses is unclear"
        )
    tensors[info.name] = info


def _safetensors_tensors(files: Sequence[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, entry in _safetensors_header(path).items():
            try:
                shape = tuple(int(n) for n in entry["shape"])
                start, end = (int(n) for n in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ExportError(f"cannot read safetensors file {path}: bad entry for {name!r}") from exc
            _add_tensor(tensors, TensorInfo(name, shape, end - start, path))
    return tensors


def _bin_tensors(files: Sequence[Path], loaded: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types (pickle, zip, runtime)
            raise ExportError(f"cannot load {path} (weights_only=True): {first_line(exc)}") from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExportError(f"{path} is not a state dict of tensors")
        for name, tensor in state.items():
            _add_tensor(
                tensors, TensorInfo(str(name), tuple(tensor.shape), tensor.numel() * tensor.element_size(), path)
            )
            loaded[str(name)] = tensor
    return tensors


def _safetensors_files(directory: Path) -> list[Path]:
    """The index's files, else `model.safetensors`, else every `*.safetensors` file; [] when none."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _index_files(directory, index)
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]  # as transformers loads it, whatever else lies there
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))


def _bin_files(directory: Path) -> list[Path]:
    """The index's files, else `pytorch_model.bin`; [] when none."""
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        return _index_files(directory, index)
    single = directory / "pytorch_model.bin"
    return [single] if single.is_file() else []


def _weight_files(directory: Path) -> tuple[Literal["safetensors", "bin"], list[Path]]:
    """Which weights a model directory holds: safetensors first, then `.bin`."""
    files = _safetensors_files(directory)
    if files:
        return "safetensors", files
    files = _bin_files(directory)
    if files:
        return "bin", files
    present = sorted(p.name for p in directory.iterdir() if _is_weight_file(p.name))
    found = f"; it has {', '.join(present)}" if present else ""
    raise ExportError(
        f"no weights in model directory {directory}: expected *.safetensors (with "
        f"model.safetensors.index.json when sharded) or pytorch_model.bin{found}"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {first_line(exc)}") from exc
    return config if isinstance(config, dict) else {}


def read_model_dir(path: str | os.PathLike[str]) -> ModelDir:
    """Scan a Hugging Face model directory: weight tensors (headers only for safetensors) and other files.

    Raises:
        ExportError: not a directory, no weights, or an unreadable weight file or index.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ExportError(f"model directory {directory} does not exist or is not a directory")
    kind, weight_files = _weight_files(directory)
    loaded: dict[str, torch.Tensor] = {}
    tensors = _safetensors_tensors(weight_files) if kind == "safetensors" else _bin_tensors(weight_files, loaded)
    files: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
        elif not _is_weight_file(entry.name):
            files.append(entry)
    return ModelDir(directory, kind, tensors, tuple(files), tuple(skipped), _read_config(directory), loaded)


def load_tensors(model: ModelDir, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors as stored: same dtype, shape and bytes; each its own contiguous memory."""
    if model.kind == "bin":
        # Cloned: tied weights of a .bin share storage, which safetensors refuses to save.
        return {name: model.loaded[name].detach().clone(memory_format=torch.contiguous_format) for name in names}
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(model.tensors[name].file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"cannot read tensors from {path}: {first_line(exc)}") from exc
    return {name: out[name] for name in names}


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a safetensors file with transformers' `{"format": "pt"}` metadata, and fsync it."""
    from safetensors.torch import save_file

    save_file(dict(tensors), path, metadata=_SAFETENSORS_METADATA)
    _fsync(path)


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file and fsync it."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def copy_files(files: Sequence[Path], directory: Path) -> None:
    """Copy each file's content (a symlink's target) into `directory`, under its own name."""
    for src in files:
        shutil.copyfile(src, directory / src.name)
        _fsync(directory / src.name)


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(output: str | os.PathLike[str], *, force: bool, inputs: Sequence[Path]) -> Path:
    """The directory to create or replace (a symlink resolved), refused before anything is read.

    Raises:
        ExportError: its parent is missing; it is a file; it is not empty and not `force`;
            or an input (the model directory, the record) lies inside it.
    """
    target = Path(os.path.realpath(output))
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {output}: directory {target.parent} does not exist")
    if target.exists() and not target.is_dir():
        raise ExportError(f"output {output} exists and is not a directory")
    for path in inputs:
        if _inside(Path(os.path.realpath(path)), target):
            raise ExportError(
                f"output {output} would contain or replace the input {path}; choose another output directory"
            )
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ExportError(
            f"output directory {output} exists and is not empty; choose a new directory, or pass "
            "--force / force=True to replace it (only once the new export is complete)"
        )
    return target


def _fresh_sibling(target: Path, tag: str) -> Path:
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.{tag}")
        if not candidate.exists():
            return candidate


def _install(staged: Path, target: Path, *, force: bool) -> bool:
    """Rename `staged` to `target`; a non-empty `target` (only with `force`) is moved aside, then removed."""
    if not target.exists():
        os.rename(staged, target)
        return False
    if not any(target.iterdir()):
        os.rmdir(target)
        os.rename(staged, target)
        return False
    if not force:  # filled while the export was written
        raise ExportError(f"output directory {target} is no longer empty; it was left as it is")
    old = _fresh_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


@contextlib.contextmanager
def staged_directory(target: Path, replaced: list[bool], *, force: bool) -> Iterator[Path]:
    """A new directory beside `target` to fill; on success it becomes `target`, else it is removed.

    `replaced` gets one item: whether a non-empty `target` was replaced (only with `force`).
    """
    staged = _fresh_sibling(target, "tmp")
    os.mkdir(staged)  # 0o777 less the umask, as for a directory the user creates
    try:
        yield staged
        replaced.append(_install(staged, target, force=force))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
