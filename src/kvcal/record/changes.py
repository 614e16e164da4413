"""What a record merge changed: per-layer factor comparisons and the overwrite report (data only).

A KV-cache layer's change is a `LayerChange` (its `kv_cache_value`); a PTQ layer's is a
`PtqLayerChange`, one `FieldChange` per field of its `value` that either side has
(`scale_d`, `offset_d`, `scale_w`, `offset_w`, `tensor_balance_factor`, `act_type`,
`wts_type`). Display text for these lives in `kvcal.output`; `to_dict` gives the JSON form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kvcal.floats import f32_json

__all__ = [
    "Status",
    "FactorDelta",
    "FieldChange",
    "LayerChange",
    "OverwriteReport",
    "PtqLayerChange",
    "compare_factors",
]

Status = Literal["new", "changed", "unchanged"]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class FactorDelta:
    """How two sets of factors differ, compared as float32 scales and integer offsets.

    The per-channel fields are None when the channel counts differ (there is no channel to
    compare with), e.g. a layer that went from per-tensor to per-channel.
    """

    channels_old: int
    channels_new: int
    scale_changed: bool
    offset_changed: bool
    channels_changed: int | None
    scale_channels_changed: int | None
    offset_channels_changed: int | None
    max_abs_scale_change: float | None
    max_rel_scale_change: float | None
    max_offset_change: int | None

    @property
    def changed(self) -> bool:
        return self.scale_changed or self.offset_changed

    @property
    def channel_count_changed(self) -> bool:
        return self.channels_old != self.channels_new


def _channels(scale: np.ndarray, offset: np.ndarray) -> int:
    return int(max(scale.size, offset.size))


def compare_factors(
    old_scale: Sequence[float] | np.ndarray,
    old_offset: Sequence[int] | np.ndarray,
    new_scale: Sequence[float] | np.ndarray,
    new_offset: Sequence[int] | np.ndarray,
) -> FactorDelta:
    """Compare two factor sets channel by channel (scales as float32)."""
    os_ = np.asarray(old_scale, dtype=np.float32).reshape(-1)
    oo = np.asarray(old_offset, dtype=np.int64).reshape(-1)
    ns = np.asarray(new_scale, dtype=np.float32).reshape(-1)
    no = np.asarray(new_offset, dtype=np.int64).reshape(-1)
    scale_changed = not np.array_equal(os_, ns)
    offset_changed = not np.array_equal(oo, no)
    c_old, c_new = _channels(os_, oo), _channels(ns, no)
    if oo.size == no.size == 0 and os_.size == ns.size:
        oo = no = np.zeros(os_.size, dtype=np.int64)  # factors without offsets (tensor_balance_factor)
    if not (os_.size == ns.size == oo.size == no.size):
        return FactorDelta(c_old, c_new, scale_changed, offset_changed, None, None, None, None, None, None)
    # float64 for the differences: the float32 inputs are exact in it.
    s_old, s_new = os_.astype(np.float64), ns.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        abs_change = np.abs(s_new - s_old)
        rel_change = np.where(abs_change == 0.0, 0.0, abs_change / np.abs(s_old))
    s_diff = s_old != s_new  # NaN != NaN: a NaN in an old record counts as changed
    o_diff = oo != no
    offset_change = np.abs(no - oo)
    return FactorDelta(
        channels_old=c_old,
        channels_new=c_new,
        scale_changed=scale_changed,
        offset_changed=offset_changed,
        channels_changed=int(np.count_nonzero(s_diff | o_diff)),
        scale_channels_changed=int(np.count_nonzero(s_diff)),
        offset_channels_changed=int(np.count_nonzero(o_diff)),
        max_abs_scale_change=_finite_or_none(float(abs_change.max())) if abs_change.size else 0.0,
        max_rel_scale_change=_finite_or_none(float(rel_change.max())) if rel_change.size else 0.0,
        max_offset_change=int(offset_change.max()) if offset_change.size else 0,
    )


@dataclass(frozen=True)
class LayerChange:
    """What merging one layer did to its `kv_cache_value`.

    `old_*` and `delta` are None for a new layer. Scales are float32 values held as floats.
    """

    layer: str
    status: Status
    new_scale: tuple[float, ...]
    new_offset: tuple[int, ...]
    old_scale: tuple[float, ...] | None = None
    old_offset: tuple[int, ...] | None = None
    delta: FactorDelta | None = None

    kind = "kv_cache"

    @property
    def channels(self) -> int:
        return len(self.new_scale)

    @property
    def scale_changed(self) -> bool | None:
        return None if self.delta is None else self.delta.scale_changed

    @property
    def offset_changed(self) -> bool | None:
        return None if self.delta is None else self.delta.offset_changed

    def to_dict(self) -> dict[str, Any]:
        d = self.delta
        return {
            "layer": self.layer,
            "status": self.status,
            "channels": self.channels,
            "old_channels": None if d is None else d.channels_old,
            "scale_changed": self.scale_changed,
            "offset_changed": self.offset_changed,
            "old_scale": None if self.old_scale is None else [f32_json(v) for v in self.old_scale],
            "old_offset": None if self.old_offset is None else list(self.old_offset),
            "new_scale": [f32_json(v) for v in self.new_scale],
            "new_offset": list(self.new_offset),
            "channels_changed": None if d is None else d.channels_changed,
            "largest_scale_change": None if d is None else d.max_abs_scale_change,
            "largest_relative_scale_change": None if d is None else d.max_rel_scale_change,
            "largest_offset_change": None if d is None else d.max_offset_change,
        }


FieldValue = tuple[float | int | str, ...]


@dataclass(frozen=True)
class FieldChange:
    """One field of a PTQ `value` entry before and after a merge; None: the field is absent.

    Scalars are 1-tuples; float fields hold float32 values as floats. For a numeric
    field present on both sides with the same length, `channels_changed` and the
    largest absolute and relative change are given, else None.
    """

    field: str
    old: FieldValue | None
    new: FieldValue | None

    @property
    def changed(self) -> bool:
        if self.old is None or self.new is None:
            return self.old is not self.new
        if self.numeric:
            return not np.array_equal(self._array(self.old), self._array(self.new))
        return self.old != self.new

    @property
    def numeric(self) -> bool:
        values = (self.old or ()) + (self.new or ())
        return not any(isinstance(v, str) for v in values)

    @staticmethod
    def _array(values: FieldValue) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def _comparable(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.old is None or self.new is None or len(self.old) != len(self.new) or not self.numeric:
            return None
        return self._array(self.old), self._array(self.new)

    @property
    def channels_changed(self) -> int | None:
        pair = self._comparable()
        return None if pair is None else int(np.count_nonzero(pair[0] != pair[1]))

    @property
    def largest_change(self) -> float | None:
        pair = self._comparable()
        if pair is None or not pair[0].size:
            return None
        return _finite_or_none(float(np.abs(pair[1] - pair[0]).max()))

    @property
    def largest_relative_change(self) -> float | None:
        pair = self._comparable()
        if pair is None or not pair[0].size:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.abs(pair[1] - pair[0])
            rel = np.where(change == 0.0, 0.0, change / np.abs(pair[0]))
        return _finite_or_none(float(rel.max()))

    def to_dict(self) -> dict[str, Any]:
        def values(v: FieldValue | None) -> list[Any] | None:
            if v is None:
                return None
            return [f32_json(x) if isinstance(x, float) else x for x in v]

        return {
            "field": self.field,
            "changed": self.changed,
            "old": values(self.old),
            "new": values(self.new),
            "channels_changed": self.channels_changed,
            "largest_change": self.largest_change,
            "largest_relative_change": self.largest_relative_change,
        }


@dataclass(frozen=True)
class PtqLayerChange:
    """What merging one PTQ layer did to the PTQ fields of its `value`, in record field order."""

    layer: str
    status: Status
    fields: tuple[FieldChange, ...]

    kind = "ptq"

    def field(self, name: str) -> FieldChange | None:
        """The change of field `name`, or None when neither side has it."""
        return next((change for change in self.fields if change.field == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "status": self.status,
            "fields": [change.to_dict() for change in self.fields],
        }


@dataclass(frozen=True)
class OverwriteReport:
    """The result of one merge: a `LayerChange` (KV cache) or `PtqLayerChange` per calibrated layer, in `results` order.

    `written` is False for a dry run and when nothing changed; `backup` is where an
    unreadable record was moved aside (or would be, in a dry run).
    """

    record: str
    layers: list[LayerChange | PtqLayerChange] = field(default_factory=list)
    backup: str | None = None
    written: bool = False
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        """How many layers are new, changed and unchanged."""
        result = {"new": 0, "changed": 0, "unchanged": 0}
        for change in self.layers:
            result[change.status] += 1
        return result

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (strict JSON: no NaN or infinity)."""
        return {
            "record": self.record,
            "written": self.written,
            "dry_run": self.dry_run,
            "backup": self.backup,
            "counts": self.counts(),
            "layers": [change.to_dict() for change in self.layers],
        }
