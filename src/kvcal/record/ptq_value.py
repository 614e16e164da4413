"""The PTQ fields of a record entry's `value` (`SingleLayerRecord`, PTQ.md §4 step 5): validate, read, write, compare.

A PTQ merge owns seven fields: `scale_d`, `offset_d`, `scale_w`, `offset_w`,
`tensor_balance_factor`, `act_type`, `wts_type`. It sets each to its new value, or clears
it when the new result has none (a layer calibrated without DMQ loses a stale
`tensor_balance_factor`, which a deployment tool would otherwise apply); every other
field of the `value` (`shift_bit`, `skip_fusion`, `dst_type`, ...) is kept as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcal.proto.scale_offset_record_pb2 import SingleLayerRecord
from kvcal.record.changes import FieldChange, FieldValue, PtqLayerChange, Status

__all__ = ["PTQ_FIELDS", "PtqFactors", "compare_value", "value_fields", "write_value"]

PTQ_FIELDS = ("scale_d", "offset_d", "scale_w", "offset_w", "tensor_balance_factor", "act_type", "wts_type")
_SCALARS = ("scale_d", "offset_d", "act_type", "wts_type")
_INT32 = (-(2**31), 2**31 - 1)


def _scales(key: str, values: Any, layer: str) -> tuple[float, ...]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    as32 = array.astype(np.float32)
    bad = ~(np.isfinite(as32) & (as32 > 0))
    if array.size == 0 or bad.any():
        got = "nothing" if array.size == 0 else repr(float(array[bad][0]))
        raise ValueError(f"layer {layer!r}: {key} must be finite and positive, got {got}")
    return tuple(float(v) for v in as32)


def _offsets(key: str, values: Any, layer: str) -> tuple[int, ...]:
    array = np.asarray(values).reshape(-1)
    if array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"layer {layer!r}: {key} must be integers, got {values!r}")
    if ((array < _INT32[0]) | (array > _INT32[1])).any():
        raise ValueError(f"layer {layer!r}: {key} does not fit in int32")
    return tuple(int(v) for v in array)


@dataclass(frozen=True)
class PtqFactors:
    """One PTQ layer's record `value`: activation (per tensor) and weight factors, DMQ factors, types.

    Construction validates and normalises: scales become float32 values (as floats),
    offsets int32. `tensor_balance_factor` None: no DMQ; `wts_type` None: no weight (AvgPool2d).
    """

    layer: str
    scale_d: float
    offset_d: int
    scale_w: Sequence[float]
    offset_w: Sequence[int]
    tensor_balance_factor: Sequence[float] | None = None
    act_type: str = "INT8"
    wts_type: str | None = "INT8"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"layer names must be non-empty strings, got {self.layer!r}")
        set_ = object.__setattr__
        set_(self, "scale_d", _scales("scale_d", [self.scale_d], self.layer)[0])
        set_(self, "offset_d", _offsets("offset_d", [self.offset_d], self.layer)[0])
        set_(self, "scale_w", _scales("scale_w", self.scale_w, self.layer))
        set_(self, "offset_w", _offsets("offset_w", self.offset_w, self.layer))
        if len(self.scale_w) != len(self.offset_w):
            raise ValueError(
                f"layer {self.layer!r}: scale_w and offset_w must have the same length, "
                f"got {len(self.scale_w)} and {len(self.offset_w)}"
            )
        if self.tensor_balance_factor is not None:
            set_(self, "tensor_balance_factor", _scales("tensor_balance_factor", self.tensor_balance_factor, self.layer))
        for key in ("act_type", "wts_type"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"layer {self.layer!r}: {key} must be a str, got {value!r}")

    def fields(self) -> dict[str, FieldValue | None]:
        """Each PTQ field as a tuple (scalars as 1-tuples), None when absent."""
        return {
            "scale_d": (self.scale_d,),
            "offset_d": (self.offset_d,),
            "scale_w": tuple(self.scale_w),
            "offset_w": tuple(self.offset_w),
            "tensor_balance_factor": None if self.tensor_balance_factor is None else tuple(self.tensor_balance_factor),
            "act_type": (self.act_type,),
            "wts_type": None if self.wts_type is None else (self.wts_type,),
        }


def value_fields(value: SingleLayerRecord) -> dict[str, FieldValue | None]:
    """The PTQ fields a record `value` holds (None: absent)."""
    result: dict[str, FieldValue | None] = {}
    for key in PTQ_FIELDS:
        if key in _SCALARS:
            result[key] = (getattr(value, key),) if value.HasField(key) else None
        else:
            items = tuple(getattr(value, key))
            result[key] = items or None
    return result


def write_value(value: SingleLayerRecord, fields: dict[str, FieldValue | None]) -> None:
    """Set (or clear) each PTQ field of `value`; the other fields stay as they are."""
    for key in PTQ_FIELDS:
        new = fields.get(key)
        value.ClearField(key)
        if new is None:
            continue
        if key in _SCALARS:
            setattr(value, key, new[0])
        else:
            getattr(value, key).extend(new)


def compare_value(layer: str, old: dict[str, FieldValue | None] | None, new: dict[str, FieldValue | None]) -> PtqLayerChange:
    """The change of one layer: `old` None when the entry had no `value` (a new layer)."""
    before = old or dict.fromkeys(PTQ_FIELDS)
    changes = tuple(
        FieldChange(key, before.get(key), new.get(key))
        for key in PTQ_FIELDS
        if before.get(key) is not None or new.get(key) is not None
    )
    status: Status
    if old is None or all(v is None for v in old.values()):
        status = "new"
    else:
        status = "changed" if any(change.changed for change in changes) else "unchanged"
    return PtqLayerChange(layer, status, changes)
