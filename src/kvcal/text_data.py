"""Text datasets: `.jsonl`, `.json` and `.txt` files tokenized into calibration batches.

A sample is one non-empty line of a `.txt` file, the `text_field` string of one line of
a `.jsonl` file, or of one element of the list a `.json` file holds. Samples are taken in
file order (files of a directory in sorted name order), at most `num_samples` of them.
Each sample is tokenized on its own and **truncated** to `seq_len` tokens (never packed
with others); `batch_size` consecutive samples form a batch (the last one may have
fewer), **padded on the right** to its longest sample, with `attention_mask` 0 on the padding, which calibration excludes.
The model is called as `model(input_ids=..., attention_mask=...)`.

transformers is needed only here, and only when a text dataset is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcal.dataset import SUPPORTED_EXTENSIONS, Batch, Dataset, open_dataset
from kvcal.errors import DatasetError
from kvcal.messages import first_line

__all__ = [
    "TEXT_EXTENSIONS",
    "TextOptions",
    "Sample",
    "TextDataset",
    "read_samples",
    "load_tokenizer",
    "open_text_dataset",
    "open_data",
]

TEXT_EXTENSIONS = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class TextOptions:
    """How text becomes batches (see the module docstring)."""

    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 512
    batch_size: int = 4
    num_samples: int | None = None


@dataclass(frozen=True)
class Sample:
    """One text sample and where it comes from (`line` is 1-based; for `.json`, the item index)."""

    text: str
    path: Path
    line: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file; a bad byte is an error naming the line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read text file {path}: {exc.strerror or exc}") from exc
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:5]) or "none"
        raise DatasetError(f"{where}: no {text_field!r} field (keys: {keys}); choose the field with --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _file_samples(path: Path, text_field: str) -> Iterator[Sample]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = "\n".join(line for _, line in _lines(path))
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        if not isinstance(document, list):
            raise DatasetError(f"{path}: a .json dataset must hold a list of records, got {type(document).__name__}")
        for index, record in enumerate(document):
            yield Sample(_field(record, text_field, f"{path}: item {index}"), path, index)
        return
    for number, line in _lines(path):
        if not line.strip():
            continue
        if suffix == ".txt":
            yield Sample(line, path, number)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: invalid JSON line: {exc.msg}") from None
        yield Sample(_field(record, text_field, f"{path}:{number}"), path, number)


def text_files(source: Path) -> tuple[Path, ...]:
    """The text files of a text dataset: the file itself, or a directory's text files in name order."""
    if source.is_file():
        return (source,)
    return tuple(
        p for p in sorted(source.iterdir(), key=lambda p: p.name)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TEXT_EXTENSIONS
    )


def read_samples(files: tuple[Path, ...], text_field: str, limit: int | None) -> list[Sample]:
    """Up to `limit` samples of `files`, in order; a file with no sample is an error."""
    samples: list[Sample] = []
    for path in files:
        before = len(samples)
        for sample in _file_samples(path, text_field):
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                return samples  # lines past the limit are never parsed
        if len(samples) == before:
            raise DatasetError(f"{path}: no text samples (the file is empty or has only blank lines)")
    return samples


def load_tokenizer(directory: str) -> Any:
    """A local transformers tokenizer, right padding, with a pad token.

    Raises:
        DatasetError: transformers is missing, or the directory holds no loadable tokenizer.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DatasetError(
            "text datasets are tokenized with transformers, which is not installed: pip install transformers"
        ) from None
    if not Path(directory).is_dir():
        raise DatasetError(f"tokenizer directory {directory} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise DatasetError(f"cannot load a tokenizer from {directory}: {first_line(exc)}") from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        # Padded positions are masked out of the statistics: which id fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise DatasetError(f"the tokenizer in {directory} has no pad, eos or unk token to pad batches with")
    return tokenizer


@dataclass(frozen=True)
class TextDataset:
    """Tokenized batches of text samples; iterating tokenizes one batch per step."""

    directory: Path
    files: tuple[Path, ...]
    samples: tuple[Sample, ...]
    tokenizer: Any = field(repr=False)
    options: TextOptions
    skipped: tuple[Path, ...] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.options.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        size = self.options.batch_size
        for start in range(0, len(self.samples), size):
            chunk = self.samples[start : start + size]
            encoded = self.tokenizer(
                [s.text for s in chunk], truncation=True, max_length=self.options.seq_len,
                padding="longest", return_tensors="pt",
            )
            kwargs = {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask")}
            yield Batch(Path(f"{chunk[0].path}:{chunk[0].line}"), kwargs=kwargs)


def _check_options(options: TextOptions) -> None:
    for name in ("seq_len", "batch_size", "num_samples"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise DatasetError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def open_text_dataset(
    source: str | Path, options: TextOptions, *, needed_batches: int | None = None, device: torch.device | str = "cpu"
) -> TextDataset:
    """Read the samples calibration needs and load the tokenizer; no model is involved yet.

    Raises:
        DatasetError: no tokenizer given, bad text (file and line named), too few samples
            for `needed_batches`, or a tokenizer that cannot be loaded.
    """
    _check_options(options)
    root = Path(source)
    files = text_files(root)
    if not files:
        raise DatasetError(f"dataset {root} has no text file ({', '.join(TEXT_EXTENSIONS)})")
    if options.tokenizer is None:
        raise DatasetError(f"dataset {root} is text: give --tokenizer DIR (a local transformers tokenizer)")
    needed = None if needed_batches is None else needed_batches * options.batch_size
    limit = min(x for x in (options.num_samples, needed) if x is not None) if (options.num_samples or needed) else None
    samples = read_samples(files, options.text_field, limit)
    if needed_batches is not None and math.ceil(len(samples) / options.batch_size) < needed_batches:
        least = (needed_batches - 1) * options.batch_size + 1  # the last batch may be partial
        raise DatasetError(
            f"dataset {root} gives {len(samples)} text sample(s); {needed_batches} batch(es) of "
            f"--batch-size {options.batch_size} need at least {least}"
            + (f" (--num-samples is {options.num_samples})" if options.num_samples is not None else "")
        )
    tokenizer = load_tokenizer(options.tokenizer)
    directory = root if root.is_dir() else root.parent
    return TextDataset(directory, files, tuple(samples), tokenizer, options, device=torch.device(device))


def _is_text(root: Path) -> bool:
    """Whether a dataset path is text: a text file, or a directory of text files and no tensor files."""
    if root.is_file():
        if root.suffix.lower() in TEXT_EXTENSIONS:
            return True
        raise DatasetError(
            f"dataset {root} is a file: a single-file dataset is text ({', '.join(TEXT_EXTENSIONS)}); "
            "tensor batches go in a directory, one file each"
        )
    if not root.is_dir():
        return False  # open_dataset says it does not exist
    suffixes = {p.suffix.lower() for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}
    # A directory with tensor files is a tensor dataset (other files, a README.txt too, are skipped).
    text = suffixes & set(TEXT_EXTENSIONS) and not suffixes & set(SUPPORTED_EXTENSIONS)
    return bool(text)


def open_data(
    source: str | Path,
    options: TextOptions,
    *,
    needed_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset | TextDataset:
    """A tensor dataset directory or a text dataset (file or directory), checked before any model runs.

    Raises:
        DatasetError: a missing or unusable dataset, or fewer batches than `needed_batches`.
    """
    root = Path(source)
    if _is_text(root):
        return open_text_dataset(root, options, needed_batches=needed_batches, device=device)
    dataset = open_dataset(root, device)
    if needed_batches is not None and len(dataset) < needed_batches:
        raise DatasetError(
            f"dataset directory {root} has {len(dataset)} data file(s); batch_num asks for {needed_batches} "
            "(one batch per file)"
        )
    return dataset
