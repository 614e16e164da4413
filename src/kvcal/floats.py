"""float32 values as text: the shortest decimal that reads back as the same float32."""

from __future__ import annotations

import numpy as np

__all__ = ["f32_text", "f32_value", "f32_json"]


def f32_text(value: float) -> str:
    """Shortest decimal that reads back as the same float32 (`0.0318757`, `1e-10`)."""
    return str(np.float32(value))


def f32_value(value: float) -> float:
    """The shortest decimal of a float32 as a Python float (0.999999, not 0.99999898...)."""
    return float(f32_text(value))


def f32_json(value: float) -> float | str:
    """A float32 as a JSON number in its shortest form; NaN/inf (foreign records) as strings."""
    v = np.float32(value)
    if not np.isfinite(v):
        return str(float(v))
    return float(str(v))
