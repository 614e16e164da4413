"""The record file (FORMATS.md §4): read it, merge KV-cache factors into it, report overwrites.

`merge_kv_cache` is the one writer. It holds an exclusive lock on `<record>.lock` for the
whole read-merge-write, writes the new text to a temporary file in the same directory,
fsyncs it and renames it over the record, so the record on disk is always either the
old file, byte for byte, or the complete new one.

Decisions where FORMATS.md is silent:

* An entry whose key is calibrated keeps everything it has (an AMCT `value` included)
  and only its `kv_cache_value` is replaced. When a key occurs in several entries, the
  last entry with a `kv_cache_value` is updated (readers that build a dict see that one),
  else the first entry with the key; new keys are appended in `results` order.
* Nothing changed (every layer unchanged): the record is not rewritten, so its bytes,
  formatting and comments stay as they are.
* `dry_run` takes no lock and creates no file; it reads the record as it is (the record
  is only ever replaced by rename, so a lock-free read sees a whole file).
* `force` with an unreadable record copies it to `<record>.bak` (`.bak.1`, `.bak.2`, ...
  when that exists: a backup is never overwritten) before a fresh record is written over
  it; a readable record is merged as usual.
* A record path that is a symlink is resolved, so the link keeps pointing at the record.
* Locking uses `fcntl.flock` on POSIX and `msvcrt.locking` on Windows; where neither
  exists, or the file system refuses locks, merging is an error rather than a silent
  unlocked write. The `.lock` file is left in place: deleting it would race.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
from google.protobuf import text_format

from kvcal.atomic import atomic_write, existing_mode
from kvcal.errors import RecordError
from kvcal.proto.scale_offset_record_pb2 import MapFiledEntry, ScaleOffsetRecord

if TYPE_CHECKING:
    from kvcal.quant import QParams

fcntl: ModuleType | None
msvcrt: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = [
    "LOCK_TIMEOUT_S",
    "ScaleOffsetRecord",
    "FactorDelta",
    "LayerChange",
    "OverwriteReport",
    "read_record",
    "load_or_empty",
    "parse_record",
    "format_record",
    "merge_kv_cache",
    "compare_factors",
    "f32_text",
    "f32_json",
]

PathLike = Union[str, "os.PathLike[str]"]
Status = Literal["new", "changed", "unchanged"]

LOCK_TIMEOUT_S = 60.0
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ---------------------------------------------------------------- reading and writing text


# The bytes and result of the last successful parse. `kvcal calibrate` reads a record
# before the forward passes (to fail early) and again under the lock for the merge; when
# the bytes are the same, the second read costs a copy instead of a parse.
_last_parse: tuple[bytes, ScaleOffsetRecord] | None = None


def parse_record(data: bytes | str, *, source: str) -> ScaleOffsetRecord:
    """Parse protobuf text into a record; errors name `source` and the line:column.

    The result is the caller's own message (a copy when the same bytes were parsed last).
    """
    global _last_parse
    last = _last_parse
    if isinstance(data, bytes) and last is not None and last[0] == data:
        record = ScaleOffsetRecord()
        record.CopyFrom(last[1])
        return record
    record = _parse_text(data, source=source)
    if isinstance(data, bytes):
        kept = ScaleOffsetRecord()
        kept.CopyFrom(record)
        _last_parse = (data, kept)
    return record


def _parse_text(data: bytes | str, *, source: str) -> ScaleOffsetRecord:
    if isinstance(data, bytes):
        try:
            # utf-8-sig: a BOM left by a Windows editor is not worth refusing a record over.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise RecordError(
                f"{source}:{line}:{col}: invalid record: not UTF-8 text (byte 0x{data[exc.start]:02x})"
            ) from None
    else:
        text = data
    record = ScaleOffsetRecord()
    try:
        text_format.Parse(text, record)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        prefix = f"{line}:{col} : "
        if detail.startswith(prefix):
            detail = detail[len(prefix) :]
        where = f"{source}:{line}:{col}" if line is not None else source
        raise RecordError(f"{where}: invalid record: {detail}") from None
    return record


def format_record(record: ScaleOffsetRecord) -> str:
    """The text kvcal writes: `MessageToString(record, as_utf8=True)`."""
    return text_format.MessageToString(record, as_utf8=True)


def _read_bytes(path: Path, *, source: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise RecordError(f"record file {source} is a directory") from None
    except OSError as exc:
        raise RecordError(f"cannot read record file {source}: {exc.strerror or exc}") from exc


def read_record(path: PathLike) -> ScaleOffsetRecord:
    """Read a record file; a missing or unparsable file is a RecordError naming it (and the line)."""
    source = os.fspath(path)
    data = _read_bytes(Path(source), source=source)
    if data is None:
        raise RecordError(f"record file {source} does not exist")
    return parse_record(data, source=source)


def load_or_empty(path: PathLike) -> ScaleOffsetRecord:
    """Like `read_record`, but a file that does not exist yet is an empty record."""
    source = os.fspath(path)
    data = _read_bytes(Path(source), source=source)
    return ScaleOffsetRecord() if data is None else parse_record(data, source=source)


# ---------------------------------------------------------------- float32 text and JSON


def f32_text(value: float) -> str:
    """Shortest decimal that reads back as the same float32 (`0.0318757`, `1e-10`)."""
    return str(np.float32(value))


def f32_json(value: float) -> float | str:
    """A float32 as a JSON number in its shortest form; NaN/inf (foreign records) as strings."""
    v = np.float32(value)
    if not np.isfinite(v):
        return str(float(v))
    return float(str(v))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------- comparing factors


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


# ---------------------------------------------------------------- the overwrite report


def _values_text(values: Sequence[float] | Sequence[int], *, floats: bool) -> str:
    """One value as itself, several as `min … max`, none as `-`."""
    if not values:
        return "-"
    fmt = f32_text if floats else str
    lo, hi = min(values), max(values)
    if lo == hi:
        return fmt(lo)  # type: ignore[arg-type]
    return f"{fmt(lo)} … {fmt(hi)}"  # type: ignore[arg-type]


def _pct(rel: float | None) -> str:
    return f" ({rel:.2%})" if rel is not None else ""


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

    def scale_text(self) -> str:
        """The scale column: `old → new`, a per-channel summary, or the value."""
        return self._column(self.old_scale, self.new_scale, floats=True)

    def offset_text(self) -> str:
        """The offset column: `old → new`, a per-channel summary, or the value."""
        return self._column(self.old_offset, self.new_offset, floats=False)

    def _column(
        self, old: Sequence[float] | Sequence[int] | None, new: Sequence[float] | Sequence[int], *, floats: bool
    ) -> str:
        new_text = _values_text(new, floats=floats)
        d = self.delta
        if old is None or d is None:
            return new_text if len(new) == 1 else f"{len(new)} ch: {new_text}"
        old_text = _values_text(old, floats=floats)
        if d.channel_count_changed:
            return f"{len(old)} ch: {old_text} → {len(new)} ch: {new_text}"
        changed = d.scale_changed if floats else d.offset_changed
        if len(new) == 1:
            return f"{old_text} → {new_text}" if changed else new_text
        if not changed:
            return f"{len(new)} ch, unchanged"
        if floats:
            return (
                f"{d.scale_channels_changed}/{len(new)} ch changed, "
                f"largest {d.max_abs_scale_change:.3g}{_pct(d.max_rel_scale_change)}"
            )
        return f"{d.offset_channels_changed}/{len(new)} ch changed, largest {d.max_offset_change}"

    def describe(self) -> str:
        """One plain-text line: `layer: scale a → b, offset c → d`, `layer: unchanged`, ..."""
        d = self.delta
        if self.status == "new" or d is None:
            if self.channels == 1:
                return f"{self.layer}: new, scale {f32_text(self.new_scale[0])}, offset {self.new_offset[0]}"
            return (
                f"{self.layer}: new, {self.channels} channels, "
                f"scale {_values_text(self.new_scale, floats=True)}, "
                f"offset {_values_text(self.new_offset, floats=False)}"
            )
        if self.status == "unchanged":
            return f"{self.layer}: unchanged"
        if d.channel_count_changed:
            old_scale = _values_text(self.old_scale or (), floats=True)
            old_offset = _values_text(self.old_offset or (), floats=False)
            return (
                f"{self.layer}: channels {d.channels_old} → {d.channels_new}, "
                f"scale {old_scale} → {_values_text(self.new_scale, floats=True)}, "
                f"offset {old_offset} → {_values_text(self.new_offset, floats=False)}"
            )
        if d.channels_new == 1:
            scale = f"scale {self.scale_text()}" + ("" if d.scale_changed else " unchanged")
            offset = f"offset {self.offset_text()}" + ("" if d.offset_changed else " unchanged")
            return f"{self.layer}: {scale}, {offset}"
        scale = (
            f"largest scale change {d.max_abs_scale_change:.3g}{_pct(d.max_rel_scale_change)}"
            if d.scale_changed
            else "scales unchanged"
        )
        offset = f"largest offset change {d.max_offset_change}" if d.offset_changed else "offsets unchanged"
        return f"{self.layer}: {d.channels_changed}/{d.channels_new} channels changed, {scale}, {offset}"

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


# ---------------------------------------------------------------- validating results


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor on any device; torch is not imported here
        value = value.detach().to("cpu")
        if value.is_complex():
            raise ValueError(f"expected a real tensor, got dtype {value.dtype}")
        if value.is_floating_point():
            return value.float().reshape(-1).numpy()
        return value.long().reshape(-1).numpy()
    return np.asarray(value).reshape(-1)


def _checked_factors(layer: Any, qparams: QParams) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale [C], int64 offset [C]) of one layer, validated before anything is written."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer names must be non-empty strings, got {layer!r}")
    scale = _as_array(qparams.scale)
    offset = _as_array(qparams.offset)
    if not (np.issubdtype(scale.dtype, np.floating) or np.issubdtype(scale.dtype, np.integer)):
        raise ValueError(f"layer {layer!r}: scale must be a float tensor, got dtype {scale.dtype}")
    if not np.issubdtype(offset.dtype, np.integer):
        raise ValueError(f"layer {layer!r}: offset must be an integer tensor, got dtype {offset.dtype}")
    scale = scale.astype(np.float32)
    offset = offset.astype(np.int64)
    if scale.size == 0 or scale.size != offset.size:
        raise ValueError(
            f"layer {layer!r}: scale and offset must have the same, non-zero number of channels, "
            f"got {scale.size} and {offset.size}"
        )
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        raise ValueError(
            f"layer {layer!r}: scales must be finite and positive, got {float(scale[bad][0])!r} "
            f"at channel {int(np.flatnonzero(bad)[0])}"
        )
    out_of_range = (offset < _INT32_MIN) | (offset > _INT32_MAX)
    if out_of_range.any():
        raise ValueError(f"layer {layer!r}: offset {int(offset[out_of_range][0])} does not fit in int32")
    return scale, offset


# ---------------------------------------------------------------- locking


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without blocking; False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True
    raise RecordError(  # pragma: no cover - no such platform in CI
        f"no file locking on this platform ({sys.platform}); refusing to write a record without a lock"
    )


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


@contextlib.contextmanager
def _exclusive_lock(target: Path, *, source: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock`, polling so Ctrl-C and a timeout still work."""
    lock_path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise RecordError(f"cannot create lock file {lock_path} for {source}: {exc.strerror or exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                if _try_lock(fd):
                    break
            except OSError as exc:
                raise RecordError(
                    f"cannot lock {lock_path} (the file system may not support locks): {exc.strerror or exc}"
                ) from exc
            if time.monotonic() >= deadline:
                raise RecordError(
                    f"could not lock {lock_path} within {timeout:g} s: another process is writing {source}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- merging


def _target(path: PathLike) -> tuple[Path, str]:
    """The file to replace (a symlink resolved, so the link survives) and the name to show."""
    source = os.fspath(path)
    target = Path(source)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    parent = target.parent
    if not parent.is_dir():
        raise RecordError(f"cannot write record {source}: directory {parent} does not exist")
    if target.is_dir():
        raise RecordError(f"record file {source} is a directory")
    return target, source


def _free_backup(target: Path) -> Path:
    candidate = target.with_name(target.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.bak.{n}")
        n += 1
    return candidate


def _kv_targets(record: ScaleOffsetRecord) -> dict[str, MapFiledEntry]:
    """Key → the entry a merge updates (see the module docstring)."""
    first: dict[str, MapFiledEntry] = {}
    with_kv: dict[str, MapFiledEntry] = {}
    for entry in record.record:
        first.setdefault(entry.key, entry)
        if entry.HasField("kv_cache_value"):
            with_kv[entry.key] = entry
    return {**first, **with_kv}


def _apply(record: ScaleOffsetRecord, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[LayerChange]:
    """Merge `factors` into `record` in place and say what changed."""
    targets = _kv_targets(record)
    changes: list[LayerChange] = []
    for layer, (scale, offset) in factors.items():
        new_scale = tuple(float(v) for v in scale)
        new_offset = tuple(int(v) for v in offset)
        entry = targets.get(layer)
        if entry is None:
            entry = record.record.add()
            entry.key = layer
            targets[layer] = entry
        if entry.HasField("kv_cache_value"):
            old_scale = tuple(float(v) for v in entry.kv_cache_value.scale)
            old_offset = tuple(int(v) for v in entry.kv_cache_value.offset)
            delta = compare_factors(old_scale, old_offset, scale, offset)
            status: Status = "changed" if delta.changed else "unchanged"
            changes.append(LayerChange(layer, status, new_scale, new_offset, old_scale, old_offset, delta))
        else:
            status = "new"
            changes.append(LayerChange(layer, status, new_scale, new_offset))
        if status != "unchanged":
            entry.ClearField("kv_cache_value")
            entry.kv_cache_value.scale.extend(new_scale)
            entry.kv_cache_value.offset.extend(new_offset)
    return changes


def _merge(
    target: Path, source: str, factors: Mapping[str, tuple[np.ndarray, np.ndarray]], *, force: bool, write: bool
) -> OverwriteReport:
    data = _read_bytes(target, source=source)
    backup: Path | None = None
    if data is None:
        record = ScaleOffsetRecord()
    else:
        try:
            record = parse_record(data, source=source)
        except RecordError as exc:
            if not force:
                raise RecordError(
                    f"{exc}; the record was left unchanged (with --force / force=True it is moved "
                    f"aside to {target.name}.bak and a fresh record is written)"
                ) from None
            backup = _free_backup(target)
            record = ScaleOffsetRecord()
    changes = _apply(record, factors)
    must_write = backup is not None or any(change.status != "unchanged" for change in changes)
    if write and must_write:
        mode = existing_mode(target) if data is not None else None
        try:
            if backup is not None:
                # A copy written like the record, not a rename: the record path never goes
                # missing, and a failure below still leaves the unreadable original in place.
                atomic_write(backup, data or b"", mode=mode)
            atomic_write(target, format_record(record).encode("utf-8"), mode=mode)
        except OSError as exc:
            raise RecordError(f"cannot write record {source}: {exc}") from exc
    return OverwriteReport(
        record=source,
        layers=changes,
        backup=None if backup is None else str(backup),
        written=write and must_write,
        dry_run=not write,
    )


def merge_kv_cache(
    path: PathLike,
    results: Mapping[str, QParams],
    *,
    dry_run: bool = False,
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> OverwriteReport:
    """Merge each layer's KV-cache factors into the record at `path`, atomically and locked.

    Args:
        path: the record file; created when missing (its directory must exist).
        results: layer name → QParams (scale float [C], offset int [C], any device).
        dry_run: compute and return the report, write nothing (no lock file either).
        force: move an unreadable record aside to `<record>.bak` instead of failing.
        lock_timeout: seconds to wait for another writer before a RecordError.

    Raises:
        RecordError: unreadable record (names file and line), lock or write failure.
        ValueError: malformed results (checked before the record is touched).
    """
    factors = {layer: _checked_factors(layer, qparams) for layer, qparams in results.items()}
    target, source = _target(path)
    if dry_run:
        return _merge(target, source, factors, force=force, write=False)
    with _exclusive_lock(target, source=source, timeout=lock_timeout):
        return _merge(target, source, factors, force=force, write=True)
