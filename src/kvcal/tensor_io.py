"""Safe reading of tensor files (datasets and checkpoints): no pickle is ever executed.

`.pt`/`.pth` go through `torch.load(weights_only=True)`, the restricted unpickler that
refuses to build arbitrary objects; `.safetensors` through the safetensors package.
Failures to open a file at all (missing, permission, a directory) propagate as the
`OSError` they are; anything else becomes a `TensorFileError` whose callers add the
file's role (data file, checkpoint) to the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvcal.messages import first_line

__all__ = ["OPEN_ERRORS", "TensorFileError", "load_torch", "load_safetensors"]

OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)
_ZIP_MAGIC = b"PK\x03\x04"


class TensorFileError(Exception):
    """A tensor file that cannot be read safely; the message is one line, without the path."""


def load_torch(path: str | Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`.

    Raises:
        TensorFileError: the file is not a torch file at all, holds other pickled objects
            than tensors and containers, or is truncated or malformed.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive; its legacy format is a pickle (protocol byte 0x80).
    if not head.startswith((_ZIP_MAGIC, b"\x80")):
        raise TensorFileError(
            "not a torch file: torch.save writes a zip archive or a pickle, this file starts with "
            f"{head!r}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OPEN_ERRORS:
        raise
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            raise TensorFileError(
                f"holds pickled Python objects other than tensors, which are not loaded "
                f"(torch.load weights_only=True refused: {first_line(exc)})"
            ) from exc
        raise TensorFileError(f"not a readable torch file (truncated or malformed?): {first_line(exc)}") from exc


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a `.safetensors` file, on the CPU.

    Raises:
        TensorFileError: the safetensors package is missing, or the file is malformed.
    """
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise TensorFileError(
            "reading .safetensors needs the safetensors package (pip install 'kvcal[safetensors]')"
        ) from exc
    try:
        return dict(load_file(str(path), device="cpu"))
    except OPEN_ERRORS:
        raise
    except Exception as exc:
        raise TensorFileError(f"not a readable .safetensors file (truncated or malformed?): {first_line(exc)}") from exc
