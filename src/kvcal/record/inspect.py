"""Looking into record files: per-entry summary, every channel of some layers, a diff of two.

An entry can hold several kinds of factors, and each becomes its own row: `kv_cache`
(`kv_cache_value`), `activation` (`value.scale_d`/`offset_d`), `weight`
(`value.scale_w`/`offset_w`) and `balance` (`value.tensor_balance_factor`, DMQ: scales
without offsets); an entry with none of these is one `other` row. Diffs compare the
factors of each (layer, kind) only, not the other AMCT fields; when a key occurs twice,
its last entry of that kind counts (as for a reader building a dict).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from kvcal.errors import RecordError
from kvcal.floats import f32_json
from kvcal.messages import close_matches
from kvcal.proto.scale_offset_record_pb2 import MapFiledEntry, ScaleOffsetRecord
from kvcal.record.changes import FactorDelta, compare_factors
from kvcal.record.store import read_record

__all__ = [
    "Kind",
    "EntrySummary",
    "LayerDetail",
    "LayerDiff",
    "RecordSummary",
    "RecordDetail",
    "RecordDiff",
    "entry_factors",
    "summarize_record",
    "layer_detail",
    "diff_records",
    "inspect_record",
]

Kind = Literal["kv_cache", "activation", "weight", "balance", "other"]
DiffStatus = Literal["added", "removed", "changed", "unchanged"]
PathLike = Union[str, "os.PathLike[str]"]


def entry_factors(entry: MapFiledEntry) -> list[tuple[Kind, tuple[float, ...], tuple[int, ...]]]:
    """The (kind, scales, offsets) an entry holds, one per kind, in the order above."""
    rows: list[tuple[Kind, tuple[float, ...], tuple[int, ...]]] = []
    if entry.HasField("kv_cache_value"):
        kv = entry.kv_cache_value
        rows.append(("kv_cache", tuple(kv.scale), tuple(kv.offset)))
    if entry.HasField("value"):
        v = entry.value
        if v.HasField("scale_d") or v.HasField("offset_d"):
            rows.append(
                (
                    "activation",
                    (v.scale_d,) if v.HasField("scale_d") else (),
                    (v.offset_d,) if v.HasField("offset_d") else (),
                )
            )
        if len(v.scale_w) or len(v.offset_w):
            rows.append(("weight", tuple(v.scale_w), tuple(v.offset_w)))
        if len(v.tensor_balance_factor):
            rows.append(("balance", tuple(v.tensor_balance_factor), ()))
    if not rows:
        rows.append(("other", (), ()))
    return rows


def _opt(values: Sequence[float] | Sequence[int], pick: Any) -> Any:
    return pick(values) if len(values) else None


def _f32_or_none(value: float | None) -> float | str | None:
    return None if value is None else f32_json(value)


@dataclass(frozen=True)
class EntrySummary:
    """One row of the record table: a layer's factors of one kind, as ranges."""

    layer: str
    kind: Kind
    channels: int
    scale_min: float | None
    scale_max: float | None
    offset_min: int | None
    offset_max: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "channels": self.channels,
            "scale_min": _f32_or_none(self.scale_min),
            "scale_max": _f32_or_none(self.scale_max),
            "offset_min": self.offset_min,
            "offset_max": self.offset_max,
        }


@dataclass(frozen=True)
class LayerDetail:
    """Every channel's scale and offset of one layer's factors of one kind."""

    layer: str
    kind: Kind
    scale: tuple[float, ...]
    offset: tuple[int, ...]

    @property
    def channels(self) -> int:
        return max(len(self.scale), len(self.offset))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "channels": self.channels,
            "scale": [f32_json(v) for v in self.scale],
            "offset": list(self.offset),
        }


@dataclass(frozen=True)
class LayerDiff:
    """How one (layer, kind) differs between record `a` and record `b`."""

    layer: str
    kind: Kind
    status: DiffStatus
    channels_a: int | None
    channels_b: int | None
    delta: FactorDelta | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.delta
        return {
            "layer": self.layer,
            "kind": self.kind,
            "status": self.status,
            "channels_a": self.channels_a,
            "channels_b": self.channels_b,
            "scale_changed": None if d is None else d.scale_changed,
            "offset_changed": None if d is None else d.offset_changed,
            "channels_changed": None if d is None else d.channels_changed,
            "largest_scale_change": None if d is None else d.max_abs_scale_change,
            "largest_relative_scale_change": None if d is None else d.max_rel_scale_change,
            "largest_offset_change": None if d is None else d.max_offset_change,
        }


def _count(statuses: Iterable[str], names: Sequence[str]) -> dict[str, int]:
    result = dict.fromkeys(names, 0)
    for status in statuses:
        result[status] += 1
    return result


@dataclass(frozen=True)
class RecordSummary:
    """The summary table of one record file."""

    record: str
    entries: list[EntrySummary] = field(default_factory=list)
    prune_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "entries": [e.to_dict() for e in self.entries],
            "prune_records": self.prune_records,
        }


@dataclass(frozen=True)
class RecordDetail:
    """Every channel of the layers asked for."""

    record: str
    layers: list[LayerDetail] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record, "layers": [d.to_dict() for d in self.layers]}


@dataclass(frozen=True)
class RecordDiff:
    """Record `a` against record `b`, one row per (layer, kind): a's order, then b's additions."""

    a: str
    b: str
    layers: list[LayerDiff] = field(default_factory=list)
    prune_records_equal: bool = True

    def counts(self) -> dict[str, int]:
        return _count((d.status for d in self.layers), ("added", "removed", "changed", "unchanged"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "counts": self.counts(),
            "layers": [d.to_dict() for d in self.layers],
            "prune_records_equal": self.prune_records_equal,
        }


def summarize_record(record: ScaleOffsetRecord) -> list[EntrySummary]:
    """One row per entry and kind, in file order."""
    rows = []
    for entry in record.record:
        for kind, scale, offset in entry_factors(entry):
            rows.append(
                EntrySummary(
                    layer=entry.key,
                    kind=kind,
                    channels=max(len(scale), len(offset)),
                    scale_min=_opt(scale, min),
                    scale_max=_opt(scale, max),
                    offset_min=_opt(offset, min),
                    offset_max=_opt(offset, max),
                )
            )
    return rows


def _unknown_layers_error(unknown: Sequence[str], known: Sequence[str], source: str | None) -> RecordError:
    where = f"record {source}" if source else "the record"
    parts = []
    for name in unknown:
        close = close_matches(name, known)
        hint = f" (close names: {', '.join(close)})" if close else ""
        parts.append(f"{name!r}{hint}")
    if not known:
        tail = f"; {where} has no layers"
    elif not any(close_matches(name, known, n=1) for name in unknown):
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        tail = f"; it has {len(known)} layers: {shown}"
    else:
        tail = ""
    noun = "layer" if len(unknown) == 1 else "layers"
    return RecordError(f"{noun} not in {where}: {'; '.join(parts)}{tail}")


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def layer_detail(record: ScaleOffsetRecord, names: Iterable[str], *, source: str | None = None) -> list[LayerDetail]:
    """Every channel of the named layers, in the order asked; an unknown name is a RecordError."""
    wanted = _unique(names)
    known = _unique(entry.key for entry in record.record)
    unknown = [name for name in wanted if name not in set(known)]
    if unknown:
        raise _unknown_layers_error(unknown, known, source)
    details = []
    for name in wanted:
        for entry in record.record:
            if entry.key == name:
                details.extend(LayerDetail(name, kind, scale, offset) for kind, scale, offset in entry_factors(entry))
    return details


def _effective(record: ScaleOffsetRecord) -> dict[tuple[str, Kind], tuple[tuple[float, ...], tuple[int, ...]]]:
    result: dict[tuple[str, Kind], tuple[tuple[float, ...], tuple[int, ...]]] = {}
    for entry in record.record:
        for kind, scale, offset in entry_factors(entry):
            # Re-inserting keeps the first position but takes the last values.
            result[(entry.key, kind)] = (scale, offset)
    return result


def diff_records(
    a: ScaleOffsetRecord,
    b: ScaleOffsetRecord,
    *,
    a_name: str = "a",
    b_name: str = "b",
    layers: Iterable[str] | None = None,
) -> RecordDiff:
    """Compare `a` (old) with `b` (new) per (layer, kind); `layers` limits the rows to those names."""
    fa, fb = _effective(a), _effective(b)
    keys = list(fa) + [key for key in fb if key not in fa]
    if layers is not None:
        wanted = _unique(layers)
        known = _unique(layer for layer, _ in keys)
        unknown = [name for name in wanted if name not in set(known)]
        if unknown:
            raise _unknown_layers_error(unknown, known, f"{a_name} or {b_name}")
        keys = [key for key in keys if key[0] in set(wanted)]
    rows = []
    for key in keys:
        layer, kind = key
        old, new = fa.get(key), fb.get(key)
        if old is None and new is not None:
            rows.append(LayerDiff(layer, kind, "added", None, max(map(len, new))))
        elif new is None and old is not None:
            rows.append(LayerDiff(layer, kind, "removed", max(map(len, old)), None))
        elif old is not None and new is not None:
            delta = compare_factors(old[0], old[1], new[0], new[1])
            status: DiffStatus = "changed" if delta.changed else "unchanged"
            rows.append(LayerDiff(layer, kind, status, delta.channels_old, delta.channels_new, delta))
    prune_equal = list(a.prune_record) == list(b.prune_record)
    return RecordDiff(a=a_name, b=b_name, layers=rows, prune_records_equal=prune_equal)


def inspect_record(
    path: PathLike, *, layers: Sequence[str] = (), diff: PathLike | None = None
) -> RecordSummary | RecordDetail | RecordDiff:
    """What `kvcal inspect-record` shows: a summary, the detail of `layers`, or a diff with `diff`.

    With `diff`, `layers` limits the diff to those layers.
    """
    source = os.fspath(path)
    record = read_record(source)
    if diff is not None:
        other_source = os.fspath(diff)
        other = read_record(other_source)
        return diff_records(record, other, a_name=source, b_name=other_source, layers=layers or None)
    if layers:
        return RecordDetail(record=source, layers=layer_detail(record, layers, source=source))
    return RecordSummary(record=source, entries=summarize_record(record), prune_records=len(record.prune_record))
