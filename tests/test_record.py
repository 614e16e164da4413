"""The record store: parsing, locked atomic merge, preservation, the overwrite report."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from record_files import CORRUPT, FULL, K0, K1, PER_CHANNEL, V0

from kvcal.errors import RecordError
from kvcal.output import change_offset_text, change_scale_text, describe_change
from kvcal.quant import QParams
from kvcal.record.changes import LayerChange, OverwriteReport, compare_factors
from kvcal.record.store import (
    ScaleOffsetRecord,
    format_record,
    load_or_empty,
    merge_kv_cache,
    parse_record,
    read_record,
)


def qp(scale: list[float], offset: list[int]) -> QParams:
    return QParams(torch.tensor(scale, dtype=torch.float32), torch.tensor(offset, dtype=torch.int32))


def kv(record: ScaleOffsetRecord, key: str) -> tuple[list[float], list[int]]:
    (entry,) = [e for e in record.record if e.key == key and e.HasField("kv_cache_value")]
    return list(entry.kv_cache_value.scale), list(entry.kv_cache_value.offset)


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def copy_fixture(src: Path, tmp_path: Path, name: str = "record.txt") -> Path:
    target = tmp_path / name
    shutil.copyfile(src, target)
    return target


# ---------------------------------------------------------------- reading


def test_read_record_parses_every_field_of_the_fixture() -> None:
    record = read_record(FULL)
    assert [e.key for e in record.record] == ["conv1", K0, V0, "fc"]
    conv1 = record.record[0].value
    assert list(conv1.shift_bit) == [3, 4]
    assert conv1.skip_fusion is True and conv1.dst_type == "INT4"
    assert list(conv1.offset_r) == [1, -1]
    assert record.prune_record[0].consumer[0].attr[1].strings[1] == b"\xff\x00b"
    assert record.prune_record[0].producer[0].attr[1].i == -9000000000


def test_read_record_missing_file_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"record file .*nope\.txt does not exist"):
        read_record(tmp_path / "nope.txt")


def test_read_record_names_file_line_and_column() -> None:
    with pytest.raises(RecordError) as info:
        read_record(CORRUPT)
    message = str(info.value)
    assert f"{CORRUPT}:5:13:" in message
    assert "oops" in message


def test_parse_record_rejects_non_utf8_with_its_line() -> None:
    with pytest.raises(RecordError, match=r"^x\.txt:2:9: .*not UTF-8.*0xff"):
        parse_record(b'record {\n  key: "\xff"\n}\n', source="x.txt")


def test_parse_record_accepts_a_bom_and_rejects_duplicate_optional_fields() -> None:
    record = parse_record(b'\xef\xbb\xbfrecord { key: "a" }', source="bom.txt")
    assert record.record[0].key == "a"
    with pytest.raises(RecordError, match=r"^d\.txt:1:\d+: .*multiple \"key\""):
        parse_record('record { key: "a" key: "b" }', source="d.txt")


def test_the_same_bytes_again_give_an_equal_record_of_the_callers_own() -> None:
    data = FULL.read_bytes()
    first = parse_record(data, source="a.txt")
    first.record[0].key = "changed by the caller"
    again = parse_record(data, source="b.txt")
    assert again.record[0].key == "conv1"  # the first caller's edit did not leak
    assert again == read_record(FULL)
    other = parse_record(data.replace(b'"conv1"', b'"conv2"'), source="c.txt")
    assert other.record[0].key == "conv2"
    # An error is still an error after a good parse of other bytes.
    with pytest.raises(RecordError, match=r"^x\.txt:1:"):
        parse_record(b"record { nope: 1 }", source="x.txt")


def test_load_or_empty_treats_a_missing_file_as_empty(tmp_path: Path) -> None:
    assert load_or_empty(tmp_path / "none.txt") == ScaleOffsetRecord()
    assert load_or_empty(FULL) == read_record(FULL)


def test_reserialisation_of_the_fixture_is_stable() -> None:
    text = format_record(read_record(FULL))
    again = format_record(parse_record(text, source="mem"))
    assert again == text
    assert parse_record(text, source="mem") == read_record(FULL)


# ---------------------------------------------------------------- merging


def test_merge_into_a_missing_record_writes_message_to_string(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    report = merge_kv_cache(target, {K0: qp([0.0318757], [-2]), V0: qp([0.5, 0.25], [1, -1])})
    assert report.written and not report.dry_run and report.backup is None
    assert [c.status for c in report.layers] == ["new", "new"]
    record = read_record(target)
    assert [e.key for e in record.record] == [K0, V0]
    assert target.read_text(encoding="utf-8") == format_record(record)
    assert 'key: "model.layers.0.self_attn.k_proj"\n  kv_cache_value {\n    scale: 0.0318757\n    offset: -2\n' in (
        target.read_text(encoding="utf-8")
    )
    assert names_in(tmp_path) == ["record.txt", "record.txt.lock"]


def test_merge_keeps_every_foreign_entry_and_field_exactly(tmp_path: Path) -> None:
    target = copy_fixture(FULL, tmp_path)
    original = read_record(FULL)

    report = merge_kv_cache(target, {V0: qp([0.04], [-3]), K0: qp([0.5, 0.25], [0, 1]), "new.layer": qp([1.0], [0])})

    expected = ScaleOffsetRecord()
    expected.CopyFrom(original)
    k0_entry = expected.record[1]  # the value-only entry keeps its `value` and gains kv_cache_value
    k0_entry.kv_cache_value.scale.extend([0.5, 0.25])
    k0_entry.kv_cache_value.offset.extend([0, 1])
    v0_entry = expected.record[2]
    v0_entry.ClearField("kv_cache_value")
    v0_entry.kv_cache_value.scale.append(0.04)
    v0_entry.kv_cache_value.offset.append(-3)
    added = expected.record.add()
    added.key = "new.layer"
    added.kv_cache_value.scale.append(1.0)
    added.kv_cache_value.offset.append(0)

    written = read_record(target)
    assert written == expected
    # Explicitly set defaults stay set (proto2 presence), not just equal in value.
    assert written.record[3].value.HasField("skip_fusion")
    assert written.record[3].value.HasField("dst_type")
    assert not written.record[2].HasField("value")
    assert written.prune_record == original.prune_record
    text = target.read_text(encoding="utf-8")
    assert text == format_record(written)
    assert format_record(parse_record(text, source="again")) == text
    assert [c.status for c in report.layers] == ["changed", "new", "new"]


def test_second_merge_of_the_same_factors_leaves_the_file_alone(tmp_path: Path) -> None:
    # Hand-formatted, with a comment: a rewrite would change these bytes.
    target = tmp_path / "record.txt"
    target.write_text(
        f'# kept as is\nrecord {{ key: "{K0}" kv_cache_value {{ scale: 0.5 offset: 1 }} }}\n', encoding="utf-8"
    )
    before = target.read_bytes()
    report = merge_kv_cache(target, {K0: qp([0.5], [1])})
    assert [c.status for c in report.layers] == ["unchanged"]
    assert report.written is False
    assert target.read_bytes() == before


def test_duplicate_keys_update_the_last_entry_with_kv_cache_value(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    target.write_text(
        'record { key: "a" value { scale_d: 1 } }\n'
        'record { key: "a" kv_cache_value { scale: 1 offset: 0 } }\n'
        'record { key: "a" kv_cache_value { scale: 2 offset: 0 } }\n'
        'record { key: "b" value { scale_d: 1 } }\n'
        'record { key: "b" value { scale_d: 2 } }\n',
        encoding="utf-8",
    )
    report = merge_kv_cache(target, {"a": qp([3.0], [1]), "b": qp([4.0], [2])})
    record = read_record(target)
    assert list(record.record[1].kv_cache_value.scale) == [1.0]
    assert list(record.record[2].kv_cache_value.scale) == [3.0]
    assert report.layers[0].old_scale == (2.0,)
    assert record.record[3].HasField("kv_cache_value") and not record.record[4].HasField("kv_cache_value")
    assert len(record.record) == 5


def test_new_layers_are_appended_in_results_order(tmp_path: Path) -> None:
    target = copy_fixture(PER_CHANNEL, tmp_path)
    merge_kv_cache(target, {"z": qp([1.0], [0]), K1: qp([0.5], [0]), "a": qp([1.0], [0])})
    assert [e.key for e in read_record(target).record] == [K0, V0, K1, "z", "a"]


def test_scales_are_written_as_float32_and_offsets_as_int32(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    q = QParams(torch.tensor([0.1, 1 / 3], dtype=torch.float64), torch.tensor([-128, 127], dtype=torch.int64))
    report = merge_kv_cache(target, {K0: q})
    text = target.read_text(encoding="utf-8")
    assert "scale: 0.1\n" in text and "scale: 0.33333334\n" in text
    scale, offset = kv(read_record(target), K0)
    assert scale == [float(np.float32(0.1)), float(np.float32(1 / 3))]
    assert offset == [-128, 127]
    assert report.layers[0].new_scale == (float(np.float32(0.1)), float(np.float32(1 / 3)))
    # Same factors given as float64 again: compared as float32, so unchanged.
    assert merge_kv_cache(target, {K0: q}).layers[0].status == "unchanged"


def test_bfloat16_scale_and_0d_tensors_are_accepted(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    q = QParams(torch.tensor(0.5, dtype=torch.bfloat16), torch.tensor(3))
    merge_kv_cache(target, {K0: q})
    assert kv(read_record(target), K0) == ([0.5], [3])


@pytest.mark.parametrize(
    ("qparams", "pattern"),
    [
        (qp([0.5, 0.5], [0]), r"same, non-zero number of channels, got 2 and 1"),
        (qp([], []), r"got 0 and 0"),
        (qp([0.5, float("nan")], [0, 0]), r"finite and positive, got nan at channel 1"),
        (qp([0.0], [0]), r"finite and positive, got 0\.0"),
        (qp([-1.0], [0]), r"finite and positive, got -1\.0"),
        (QParams(torch.tensor([1e39], dtype=torch.float64), torch.tensor([0])), r"got inf"),
        (QParams(torch.tensor([0.5]), torch.tensor([0.5])), r"offset must be an integer tensor"),
        (QParams(torch.tensor([0.5]), torch.tensor([2**31])), r"offset 2147483648 does not fit in int32"),
    ],
)
def test_malformed_results_are_refused_before_anything_is_touched(
    tmp_path: Path, qparams: QParams, pattern: str
) -> None:
    target = copy_fixture(PER_CHANNEL, tmp_path)
    before = target.read_bytes()
    with pytest.raises(ValueError, match=pattern):
        merge_kv_cache(target, {K1: qp([0.25], [0]), K0: qparams})
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["record.txt"]


def test_empty_layer_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"non-empty strings, got ''"):
        merge_kv_cache(tmp_path / "r.txt", {"": qp([1.0], [0])})
    assert names_in(tmp_path) == []


def test_missing_directory_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"directory .*no_such_dir does not exist"):
        merge_kv_cache(tmp_path / "no_such_dir" / "r.txt", {K0: qp([1.0], [0])})


def test_file_mode_of_an_existing_record_is_kept(tmp_path: Path) -> None:
    target = copy_fixture(PER_CHANNEL, tmp_path)
    os.chmod(target, 0o640)
    merge_kv_cache(target, {K1: qp([0.75], [0])})
    assert (target.stat().st_mode & 0o777) == 0o640


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_a_symlinked_record_stays_a_symlink(tmp_path: Path) -> None:
    real = copy_fixture(PER_CHANNEL, tmp_path, "real.txt")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    merge_kv_cache(link, {K1: qp([0.75], [0])})
    assert link.is_symlink()
    assert kv(read_record(real), K1) == ([0.75], [0])


# ---------------------------------------------------------------- failures leave the old record


def _failing(exc: BaseException):  # noqa: ANN202 - a test double
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
@pytest.mark.parametrize("exc_type", [OSError, RuntimeError, KeyboardInterrupt])
def test_an_exception_while_writing_leaves_the_record_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, exc_type: type[BaseException]
) -> None:
    target = copy_fixture(FULL, tmp_path)
    before = target.read_bytes()
    exc = OSError(errno.EIO, "injected") if exc_type is OSError else exc_type("injected")
    if where == "write":
        real_write = os.write

        def half_write(fd: int, data: bytes) -> int:
            real_write(fd, bytes(data[:10]))  # a partial temp file exists when the failure hits
            raise exc

        monkeypatch.setattr(os, "write", half_write)
    else:
        monkeypatch.setattr(os, where, _failing(exc))
    expected = RecordError if exc_type is OSError else exc_type
    with pytest.raises(expected, match="injected"):
        merge_kv_cache(target, {V0: qp([0.04], [-3]), "new.layer": qp([1.0], [0])})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["record.txt", "record.txt.lock"]
    # The lock was released: the next merge goes through at once.
    merge_kv_cache(target, {V0: qp([0.04], [-3])}, lock_timeout=1.0)
    assert kv(read_record(target), V0) == ([pytest.approx(0.04)], [-3])


def test_a_failure_creating_a_new_record_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "replace", _failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        merge_kv_cache(tmp_path / "record.txt", {K0: qp([1.0], [0])})
    assert names_in(tmp_path) == ["record.txt.lock"]


# ---------------------------------------------------------------- corrupt records


def test_a_corrupt_record_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    target = copy_fixture(CORRUPT, tmp_path)
    before = target.read_bytes()
    with pytest.raises(RecordError) as info:
        merge_kv_cache(target, {K0: qp([1.0], [0])})
    message = str(info.value)
    assert f"{target}:5:13:" in message
    assert "left unchanged" in message
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["record.txt", "record.txt.lock"]


def test_force_moves_a_corrupt_record_to_bak_and_writes_a_fresh_one(tmp_path: Path) -> None:
    target = copy_fixture(CORRUPT, tmp_path)
    before = target.read_bytes()
    report = merge_kv_cache(target, {K0: qp([1.0], [0])}, force=True)
    bak = tmp_path / "record.txt.bak"
    assert report.backup == str(bak)
    assert report.written
    assert bak.read_bytes() == before
    assert [e.key for e in read_record(target).record] == [K0]
    assert [c.status for c in report.layers] == ["new"]
    assert report.to_dict()["backup"] == str(bak)

    # A second corrupt record never overwrites the first backup.
    target.write_bytes(b"garbage {")
    report = merge_kv_cache(target, {K0: qp([1.0], [0])}, force=True)
    assert report.backup == str(tmp_path / "record.txt.bak.1")
    assert bak.read_bytes() == before
    assert (tmp_path / "record.txt.bak.1").read_bytes() == b"garbage {"


def test_force_on_a_readable_record_merges_as_usual(tmp_path: Path) -> None:
    target = copy_fixture(FULL, tmp_path)
    report = merge_kv_cache(target, {"x": qp([1.0], [0])}, force=True)
    assert report.backup is None
    assert len(read_record(target).record) == 5


# ---------------------------------------------------------------- dry run


def test_dry_run_writes_nothing_not_even_a_lock_file(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    report = merge_kv_cache(target, {K0: qp([1.0], [0])}, dry_run=True)
    assert report.dry_run and not report.written
    assert [c.status for c in report.layers] == ["new"]
    assert names_in(tmp_path) == []


def test_dry_run_reports_what_a_real_run_then_does(tmp_path: Path) -> None:
    target = copy_fixture(PER_CHANNEL, tmp_path)
    before = target.read_bytes()
    results = {K0: qp([0.01, 0.02, 0.035, 0.04], [-1, 0, 1, 2]), V0: qp([0.0318757], [-2]), "n": qp([1.0], [0])}
    dry = merge_kv_cache(target, results, dry_run=True)
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["record.txt"]
    real = merge_kv_cache(target, results)
    assert [c.to_dict() for c in dry.layers] == [c.to_dict() for c in real.layers]
    assert [c.status for c in real.layers] == ["changed", "unchanged", "new"]


def test_dry_run_with_a_corrupt_record(tmp_path: Path) -> None:
    target = copy_fixture(CORRUPT, tmp_path)
    before = target.read_bytes()
    with pytest.raises(RecordError, match=r":5:13:"):
        merge_kv_cache(target, {K0: qp([1.0], [0])}, dry_run=True)
    report = merge_kv_cache(target, {K0: qp([1.0], [0])}, dry_run=True, force=True)
    assert report.backup == str(tmp_path / "record.txt.bak") and not report.written
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["record.txt"]


# ---------------------------------------------------------------- the overwrite report


def test_report_per_tensor_scale_and_offset_changed(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    merge_kv_cache(target, {K0: qp([0.0318757], [-2]), V0: qp([0.5], [3]), K1: qp([0.25], [1])})
    report = merge_kv_cache(target, {K0: qp([0.0320012], [-3]), V0: qp([0.5], [4]), K1: qp([0.3], [1])})
    k0, v0, k1 = report.layers
    assert describe_change(k0) == f"{K0}: scale 0.0318757 → 0.0320012, offset -2 → -3"
    assert (k0.scale_changed, k0.offset_changed) == (True, True)
    assert describe_change(v0) == f"{V0}: scale 0.5 unchanged, offset 3 → 4"
    assert (v0.scale_changed, v0.offset_changed) == (False, True)
    assert describe_change(k1) == f"{K1}: scale 0.25 → 0.3, offset 1 unchanged"
    assert change_scale_text(k1) == "0.25 → 0.3" and change_offset_text(k1) == "1"
    d = k0.to_dict()
    assert d["status"] == "changed"
    assert d["old_scale"] == [0.0318757] and d["new_scale"] == [0.0320012]
    assert d["old_offset"] == [-2] and d["new_offset"] == [-3]
    assert d["channels_changed"] == 1 and d["largest_offset_change"] == 1
    assert d["largest_scale_change"] == pytest.approx(0.0320012 - 0.0318757, rel=1e-4)
    assert d["largest_relative_scale_change"] == pytest.approx((0.0320012 - 0.0318757) / 0.0318757, rel=1e-4)


def test_report_per_channel_counts_and_largest_changes(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    rng = np.random.default_rng(0)
    scale = (rng.random(64) + 0.01).astype(np.float32)
    offset = rng.integers(-10, 10, 64).astype(np.int32)
    merge_kv_cache(target, {K0: QParams(torch.from_numpy(scale), torch.from_numpy(offset))})
    new_scale, new_offset = scale.copy(), offset.copy()
    new_scale[:12] += np.float32(1.2e-4)
    new_offset[[3, 40]] += np.array([1, -2], dtype=np.int32)  # channel 3 changes both
    report = merge_kv_cache(target, {K0: QParams(torch.from_numpy(new_scale), torch.from_numpy(new_offset))})
    (change,) = report.layers
    delta = change.delta
    assert delta is not None
    assert (delta.channels_changed, delta.scale_channels_changed, delta.offset_channels_changed) == (13, 12, 2)
    expected_abs = float(np.max(np.abs(new_scale[:12].astype(np.float64) - scale[:12])))
    assert delta.max_abs_scale_change == pytest.approx(expected_abs, rel=1e-12)
    assert delta.max_offset_change == 2
    text = describe_change(change)
    assert text.startswith(f"{K0}: 13/64 channels changed, largest scale change 0.00012 (")
    assert text.endswith(", largest offset change 2")
    assert change_scale_text(change).startswith("12/64 ch changed, largest 0.00012")
    assert change_offset_text(change) == "2/64 ch changed, largest 2"

    only_scale = new_scale.copy()
    only_scale[0] *= 2
    report = merge_kv_cache(target, {K0: QParams(torch.from_numpy(only_scale), torch.from_numpy(new_offset))})
    assert describe_change(report.layers[0]).endswith("1/64 channels changed, largest scale change " + (
        f"{float(only_scale[0]) - float(new_scale[0]):.3g} (100.00%), offsets unchanged"
    ))
    assert change_offset_text(report.layers[0]) == "64 ch, unchanged"


def test_report_channel_count_change(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    merge_kv_cache(target, {K0: qp([0.0318757], [-2])})
    report = merge_kv_cache(target, {K0: qp([0.25, 0.5, 0.75, 1.0], [0, 1, 2, 3])})
    (change,) = report.layers
    assert change.status == "changed"
    assert describe_change(change) == f"{K0}: channels 1 → 4, scale 0.0318757 → 0.25 … 1.0, offset -2 → 0 … 3"
    assert change_scale_text(change) == "1 ch: 0.0318757 → 4 ch: 0.25 … 1.0"
    d = change.to_dict()
    assert (d["old_channels"], d["channels"]) == (1, 4)
    assert d["channels_changed"] is None and d["largest_scale_change"] is None
    assert d["scale_changed"] is True and d["offset_changed"] is True
    assert kv(read_record(target), K0) == ([0.25, 0.5, 0.75, 1.0], [0, 1, 2, 3])


def test_report_new_and_unchanged_lines_and_json(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    first = merge_kv_cache(target, {K0: qp([0.5], [1]), V0: qp([0.25, 0.5], [0, 1])})
    assert describe_change(first.layers[0]) == f"{K0}: new, scale 0.5, offset 1"
    assert describe_change(first.layers[1]) == f"{V0}: new, 2 channels, scale 0.25 … 0.5, offset 0 … 1"
    second = merge_kv_cache(target, {K0: qp([0.5], [1])})
    assert describe_change(second.layers[0]) == f"{K0}: unchanged"
    assert second.counts() == {"new": 0, "changed": 0, "unchanged": 1}
    payload = json.loads(json.dumps(second.to_dict(), allow_nan=False))
    assert payload == {
        "record": str(target),
        "written": False,
        "dry_run": False,
        "backup": None,
        "counts": {"new": 0, "changed": 0, "unchanged": 1},
        "layers": [
            {
                "layer": K0,
                "status": "unchanged",
                "channels": 1,
                "old_channels": 1,
                "scale_changed": False,
                "offset_changed": False,
                "old_scale": [0.5],
                "old_offset": [1],
                "new_scale": [0.5],
                "new_offset": [1],
                "channels_changed": 0,
                "largest_scale_change": 0.0,
                "largest_relative_scale_change": 0.0,
                "largest_offset_change": 0,
            }
        ],
    }
    new = first.to_dict()["layers"][0]
    assert new["status"] == "new" and new["old_scale"] is None and new["scale_changed"] is None


def test_report_to_dict_is_strict_json_even_with_odd_old_values(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    target.write_text('record { key: "a" kv_cache_value { scale: nan scale: 0 offset: 0 offset: 0 } }', "utf-8")
    report = merge_kv_cache(target, {"a": qp([1.0, 1.0], [0, 0])})
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    layer = payload["layers"][0]
    assert layer["old_scale"] == ["nan", 0.0]
    assert layer["status"] == "changed" and layer["channels_changed"] == 2
    assert layer["largest_scale_change"] is None  # nan is no number to report
    assert isinstance(report, OverwriteReport) and isinstance(report.layers[0], LayerChange)


def test_compare_factors_mismatched_offset_length() -> None:
    delta = compare_factors([0.5, 0.5], [0], [0.5, 0.5], [0, 0])
    assert delta.changed and delta.offset_changed and not delta.scale_changed
    assert delta.channels_changed is None


# ---------------------------------------------------------------- locking and concurrency


def test_merge_waits_for_the_lock_and_times_out(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    target = tmp_path / "record.txt"
    with open(f"{target}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(RecordError, match=r"could not lock .*record\.txt\.lock within 0\.2 s"):
            merge_kv_cache(target, {K0: qp([1.0], [0])}, lock_timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 5
        assert not target.exists()

        release = threading.Timer(0.3, lambda: fcntl.flock(held, fcntl.LOCK_UN))
        release.start()
        start = time.monotonic()
        merge_kv_cache(target, {K0: qp([1.0], [0])}, lock_timeout=10)
        assert time.monotonic() - start >= 0.25
        release.join()
    assert kv(read_record(target), K0) == ([1.0], [0])


def test_threads_of_one_process_are_serialised_too(tmp_path: Path) -> None:
    # flock belongs to an open file description, so each merge's own open() excludes the others.
    target = tmp_path / "record.txt"
    errors: list[BaseException] = []

    def write(tag: str) -> None:
        try:
            for r in range(15):
                merge_kv_cache(target, {f"{tag}.{r}": qp([float(r + 1)], [r])})
        except BaseException as exc:  # reported below; a thread cannot raise into the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("t0", "t1", "t2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    keys = {e.key for e in read_record(target).record}
    assert keys == {f"{tag}.{r}" for tag in ("t0", "t1", "t2") for r in range(15)}


_WRITER = r"""
import sys, time
from pathlib import Path
import torch
from kvcal.quant import QParams
from kvcal.record.store import merge_kv_cache

record, tag, ready, go = sys.argv[1:5]
Path(ready).touch()
deadline = time.monotonic() + 120
while not Path(go).exists():  # start both writers together, after their slow imports
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.001)
for r in range(20):
    q = QParams(torch.full((64,), 0.01 * (r + 1)), torch.full((64,), r, dtype=torch.int32))
    merge_kv_cache(record, {f"{tag}.layer{r}": q})
"""


def test_two_processes_writing_one_record_lose_nothing(tmp_path: Path) -> None:
    target = tmp_path / "record.txt"
    shutil.copyfile(FULL, target)
    go = tmp_path / "go"
    procs = []
    for tag in ("p0", "p1"):
        ready = tmp_path / f"{tag}.ready"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, "-c", _WRITER, str(target), tag, str(ready), str(go)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ),
            )
        )
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready, _ in procs):
        assert time.monotonic() < deadline, "writers did not start"
        assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
        time.sleep(0.01)
    go.touch()
    for _, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    record = read_record(target)
    keys = [e.key for e in record.record]
    missing = [f"{tag}.layer{r}" for tag in ("p0", "p1") for r in range(20) if f"{tag}.layer{r}" not in keys]
    assert missing == [], "layers lost by concurrent writers"
    for tag in ("p0", "p1"):
        for r in range(20):
            scale, offset = kv(record, f"{tag}.layer{r}")
            assert scale == [float(np.float32(0.01 * (r + 1)))] * 64
            assert offset == [r] * 64
    assert len(keys) == 4 + 40
    assert keys[:4] == ["conv1", K0, V0, "fc"]
    assert record.prune_record == read_record(FULL).prune_record
    assert names_in(tmp_path) == ["go", "p0.ready", "p1.ready", "record.txt", "record.txt.lock"]


# ---------------------------------------------------------------- a model of merging


_names = st.sampled_from(["a", "b", "c.d", "层"])
_factors = st.integers(1, 4).flatmap(
    lambda c: st.tuples(
        st.lists(st.floats(2.0**-100, 2.0**100, allow_nan=False, allow_infinity=False, width=32), min_size=c, max_size=c),
        st.lists(st.integers(-128, 127), min_size=c, max_size=c),
    )
)


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.dictionaries(_names, _factors, min_size=1, max_size=3), min_size=1, max_size=4))
def test_merging_behaves_like_updating_an_ordered_dict(
    steps: list[dict[str, tuple[list[float], list[int]]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "record.txt"
        shutil.copyfile(FULL, target)
        foreign = read_record(FULL)
        model: dict[str, tuple[list[float], list[int]]] = {V0: ([float(np.float32(0.0318757))], [-2])}
        for step in steps:
            report = merge_kv_cache(target, {k: qp(s, o) for k, (s, o) in step.items()})
            for change in report.layers:
                before = model.get(change.layer)
                now = step[change.layer]
                if before is None:
                    assert change.status == "new"
                else:
                    assert change.status == ("unchanged" if before == now else "changed")
                model[change.layer] = now
            record = read_record(target)
            kv_keys = [e.key for e in record.record if e.HasField("kv_cache_value")]
            assert set(kv_keys) == set(model)
            for key, value in model.items():
                assert kv(record, key) == value
            assert [e.key for e in record.record][:4] == ["conv1", K0, V0, "fc"]
            for i in (0, 3):
                assert record.record[i] == foreign.record[i]
            assert record.record[1].value == foreign.record[1].value
            assert record.prune_record == foreign.prune_record


# ---------------------------------------------------------------- rendering


def test_render_overwrite_report_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvcal.output import render_overwrite_report

    target = tmp_path / "record.txt"
    merge_kv_cache(target, {K0: qp([0.0318757], [-2]), V0: qp([0.5, 0.5], [0, 0]), K1: qp([1.0], [0])})
    report = merge_kv_cache(
        target, {K0: qp([0.0320012], [-3]), V0: qp([0.5, 0.75], [0, 0]), K1: qp([1.0], [0]), "n": qp([2.0], [1])}
    )
    render_overwrite_report(report)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"Record {target}"

    def row(layer: str) -> list[str]:
        line = next(line for line in lines if f" {layer} " in line)
        return [cell.strip() for cell in line.split("│")[1:-1]]

    assert row(K0) == [K0, "changed", "0.0318757 → 0.0320012", "-2 → -3"]
    assert row(V0) == [V0, "changed", "1/2 ch changed, largest 0.25 (50.00%)", "2 ch, unchanged"]
    assert row(K1) == [K1, "unchanged", "1.0", "0"]
    assert row("n") == ["n", "new", "2.0", "1"]
    assert "1 new, 2 changed, 1 unchanged; written" in lines


def test_render_overwrite_report_dry_run_with_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvcal.output import render_overwrite_report

    target = copy_fixture(CORRUPT, tmp_path)
    render_overwrite_report(merge_kv_cache(target, {K0: qp([1.0], [0])}, dry_run=True, force=True))
    err = capsys.readouterr().err
    assert "1 new, 0 changed, 0 unchanged; dry run: nothing written" in err
    assert f"the unreadable record would be moved aside to {tmp_path / 'record.txt.bak'}" in err
