"""What a record merge changed: per-layer factor comparisons and the overwrite report (data only).

Display text for these lives in `kvcal.output`; `to_dict` gives the JSON form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kvcal.floats import f32_json

__all__ = ["Status", "FactorDelta", "LayerChange", "OverwriteReport", "compare_factors"]

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


@dataclass(frozen=True)
class OverwriteReport:
    """The result of one merge: a `LayerChange` per calibrated layer, in `results` order.

    `written` is False for a dry run and when nothing changed; `backup` is where an
    unreadable record was moved aside (or would be, in a dry run).
    """

    record: str
    layers: list[LayerChange] = field(default_factory=list)
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
