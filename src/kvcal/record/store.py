"""The record store (FORMATS.md §4): read a record, merge KV-cache and PTQ factors into it under a lock.

`merge_record` is the one writer (`merge_kv_cache` is its KV-only form). It holds an
exclusive lock on `<record>.lock` for the whole read-merge-write, writes the new text to
a temporary file in the same directory, fsyncs it and renames it over the record, so the
record on disk is always either the old file, byte for byte, or the complete new one.

Decisions where FORMATS.md is silent:

* An entry whose key is calibrated keeps everything it has: a KV-cache merge replaces
  only its `kv_cache_value` (an AMCT `value` is kept); a PTQ merge replaces only the PTQ
  fields of its `value` (see `kvcal.record.ptq_value`), keeping the other `value` fields
  and any `kv_cache_value`. When a key occurs in several entries, the last entry with
  the merged message (`kv_cache_value`, or `value`) is updated (readers that build a dict
  see that one), else the first entry with the key; new keys are appended in `results`
  order (KV-cache layers first, then PTQ layers).
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
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from google.protobuf import text_format

from kvcal.atomic import atomic_write, existing_mode
from kvcal.errors import RecordError
from kvcal.proto.scale_offset_record_pb2 import MapFiledEntry, ScaleOffsetRecord
from kvcal.record.changes import (
    LayerChange,
    OverwriteReport,
    PtqLayerChange,
    Status,
    compare_factors,
)
from kvcal.record.ptq_value import PtqFactors, compare_value, value_fields, write_value
from kvcal.textproto import decode_utf8, parse_text

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
    "read_record",
    "load_or_empty",
    "parse_record",
    "format_record",
    "merge_kv_cache",
    "merge_record",
    "check_writable",
]

PathLike = Union[str, "os.PathLike[str]"]

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
    # utf-8-sig: a BOM left by a Windows editor is not worth refusing a record over.
    what = "invalid record: "
    text = decode_utf8(data, source=source, error=RecordError, what=what) if isinstance(data, bytes) else data
    return parse_text(text, ScaleOffsetRecord(), source=source, error=RecordError, what=what)


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


def _open_lock(target: Path, source: str) -> tuple[Path, int]:
    """The `<target>.lock` file, created if needed, and an open descriptor of it."""
    lock_path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise RecordError(f"cannot create lock file {lock_path} for {source}: {exc.strerror or exc}") from exc
    return lock_path, fd


@contextlib.contextmanager
def _exclusive_lock(target: Path, *, source: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock`, polling so Ctrl-C and a timeout still work."""
    lock_path, fd = _open_lock(target, source)
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


def check_writable(path: PathLike) -> None:
    """Fail now, not after the forward passes, on a record that could not be written.

    The directory must exist and be writable, the record must not be a directory, and its
    `.lock` file must be creatable and lockable (another writer holding it is fine: the
    merge waits for it).

    Raises:
        RecordError: naming the record and the reason.
    """
    target, source = _target(path)
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise RecordError(f"cannot write record {source}: directory {target.parent} is not writable")
    lock_path, fd = _open_lock(target, source)
    try:
        if _try_lock(fd):
            _unlock(fd)
    except OSError as exc:
        raise RecordError(
            f"cannot lock {lock_path} (the file system may not support locks): {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(fd)


def _free_backup(target: Path) -> Path:
    candidate = target.with_name(target.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.bak.{n}")
        n += 1
    return candidate


def _targets(record: ScaleOffsetRecord, message: str) -> dict[str, MapFiledEntry]:
    """Key → the entry a merge of `message` (`kv_cache_value` or `value`) updates (see the module docstring)."""
    first: dict[str, MapFiledEntry] = {}
    with_message: dict[str, MapFiledEntry] = {}
    for entry in record.record:
        first.setdefault(entry.key, entry)
        if entry.HasField(message):
            with_message[entry.key] = entry
    return {**first, **with_message}


def _entry(record: ScaleOffsetRecord, targets: dict[str, MapFiledEntry], layer: str) -> MapFiledEntry:
    """The entry to update for `layer`, appended when the record has none."""
    entry = targets.get(layer)
    if entry is None:
        entry = record.record.add()
        entry.key = layer
        targets[layer] = entry
    return entry


def _apply_ptq(record: ScaleOffsetRecord, factors: Mapping[str, PtqFactors]) -> list[PtqLayerChange]:
    """Merge PTQ `value` fields into `record` in place and say what changed."""
    targets = _targets(record, "value")
    changes = []
    for layer, result in factors.items():
        entry = _entry(record, targets, layer)
        new = result.fields()
        change = compare_value(layer, value_fields(entry.value) if entry.HasField("value") else None, new)
        if change.status != "unchanged":
            write_value(entry.value, new)
        changes.append(change)
    return changes


def _apply(
    record: ScaleOffsetRecord,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ptq: Mapping[str, PtqFactors] | None = None,
) -> list[LayerChange | PtqLayerChange]:
    """Merge KV-cache `factors` and PTQ values into `record` in place and say what changed."""
    targets = _targets(record, "kv_cache_value")
    changes: list[LayerChange | PtqLayerChange] = []
    for layer, (scale, offset) in factors.items():
        new_scale = tuple(float(v) for v in scale)
        new_offset = tuple(int(v) for v in offset)
        entry = _entry(record, targets, layer)
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
    if ptq:
        changes.extend(_apply_ptq(record, ptq))
    return changes


Companions = Callable[[OverwriteReport], Mapping[Path, bytes]]
"""Files written in the record's transaction (a report), made from the merge's report."""


def _write_companions(files: Mapping[Path, bytes]) -> list[tuple[Path, bytes | None]]:
    """Write each file atomically; returns what each held before (None: absent) for `_restore`."""
    previous: list[tuple[Path, bytes | None]] = []
    for path, data in files.items():
        try:
            try:
                old: bytes | None = path.read_bytes()
            except FileNotFoundError:
                old = None
            previous.append((path, old))
            atomic_write(path, data, mode=existing_mode(path))
        except OSError as exc:
            _restore(previous)
            raise RecordError(f"cannot write {path}: {exc.strerror or exc}; the record was left unchanged") from exc
    return previous


def _restore(previous: list[tuple[Path, bytes | None]]) -> None:
    """Put companion files back as they were (best effort: the error being raised matters more)."""
    for path, old in reversed(previous):
        with contextlib.suppress(OSError):
            if old is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, old, mode=existing_mode(path))


def _load_for_merge(target: Path, source: str, *, force: bool) -> tuple[bytes | None, ScaleOffsetRecord, Path | None]:
    """(the record's bytes or None, the parsed record, where a forced backup goes or None)."""
    data = _read_bytes(target, source=source)
    if data is None:
        return None, ScaleOffsetRecord(), None
    try:
        return data, parse_record(data, source=source), None
    except RecordError as exc:
        if not force:
            raise RecordError(
                f"{exc}; the record was left unchanged (with --force / force=True it is moved "
                f"aside to {target.name}.bak and a fresh record is written)"
            ) from None
        return data, ScaleOffsetRecord(), _free_backup(target)


def _merge(
    target: Path,
    source: str,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ptq: Mapping[str, PtqFactors],
    *,
    force: bool,
    write: bool,
    companions: Companions | None,
) -> OverwriteReport:
    data, record, backup = _load_for_merge(target, source, force=force)
    changes = _apply(record, factors, ptq)
    must_write = backup is not None or any(change.status != "unchanged" for change in changes)
    report = OverwriteReport(
        record=source,
        layers=changes,
        backup=None if backup is None else str(backup),
        written=write and must_write,
        dry_run=not write,
    )
    previous = _write_companions(companions(report)) if companions is not None else []
    if not (write and must_write):
        return report
    mode = existing_mode(target) if data is not None else None
    try:
        if backup is not None:
            # A copy written like the record, not a rename: the record path never goes
            # missing, and a failure below still leaves the unreadable original in place.
            atomic_write(backup, data or b"", mode=mode)
        atomic_write(target, format_record(record).encode("utf-8"), mode=mode)
    except BaseException as exc:
        _restore(previous)
        if isinstance(exc, OSError):
            raise RecordError(f"cannot write record {source}: {exc}") from exc
        raise
    return report


def merge_kv_cache(
    path: PathLike,
    results: Mapping[str, QParams],
    *,
    dry_run: bool = False,
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
    companions: Companions | None = None,
) -> OverwriteReport:
    """Merge each layer's KV-cache factors into the record at `path`, atomically and locked.

    Args:
        path: the record file; created when missing (its directory must exist).
        results: layer name → QParams (scale float [C], offset int [C], any device).
        dry_run: compute and return the report, write nothing (no lock file either).
        force: move an unreadable record aside to `<record>.bak` instead of failing.
        lock_timeout: seconds to wait for another writer before a RecordError.
        companions: files to write in the same transaction (also in a dry run), made from
            the report; written before the record and put back as they were when the
            record cannot be written.

    Raises:
        RecordError: unreadable record (names file and line), lock or write failure.
        ValueError: malformed results (checked before the record is touched).
    """
    return merge_record(
        path, kv=results, dry_run=dry_run, force=force, lock_timeout=lock_timeout, companions=companions
    )


def merge_record(
    path: PathLike,
    *,
    kv: Mapping[str, QParams] | None = None,
    ptq: Mapping[str, PtqFactors] | None = None,
    dry_run: bool = False,
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
    companions: Companions | None = None,
) -> OverwriteReport:
    """Merge KV-cache factors (`kv_cache_value`) and PTQ values (`value` fields) into the record at `path`.

    One atomic, locked read-merge-write; the arguments are those of `merge_kv_cache`, with
    `ptq` mapping a layer name to its `PtqFactors` (validated when they were built). The
    report has a `LayerChange` per KV layer, then a `PtqLayerChange` per PTQ layer.

    Raises:
        RecordError: unreadable record (names file and line), lock or write failure.
        ValueError: malformed results (checked before the record is touched).
    """
    factors = {layer: _checked_factors(layer, qparams) for layer, qparams in (kv or {}).items()}
    values = dict(ptq or {})
    bad = next((name for name, result in values.items() if not isinstance(result, PtqFactors)), None)
    if bad is not None:
        raise ValueError(f"layer {bad!r}: PTQ results must be PtqFactors, got {type(values[bad]).__name__}")
    target, source = _target(path)
    if dry_run:
        return _merge(target, source, factors, values, force=force, write=False, companions=companions)
    with _exclusive_lock(target, source=source, timeout=lock_timeout):
        return _merge(target, source, factors, values, force=force, write=True, companions=companions)
