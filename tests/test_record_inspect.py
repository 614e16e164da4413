"""Record inspection: summary rows per kind, per-channel detail, diffs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from record_files import FULL, K0, K1, PER_CHANNEL, V0

from kvcal.errors import RecordError
from kvcal.record.inspect import (
    EntrySummary,
    RecordDetail,
    RecordDiff,
    RecordSummary,
    diff_records,
    inspect_record,
    layer_detail,
    summarize_record,
)
from kvcal.record.store import parse_record, read_record


def test_summary_has_one_row_per_entry_and_kind() -> None:
    rows = summarize_record(read_record(FULL))
    assert [(r.layer, r.kind) for r in rows] == [
        ("conv1", "activation"),
        ("conv1", "weight"),
        ("conv1", "balance"),
        (K0, "activation"),
        (V0, "kv_cache"),
        ("fc", "activation"),
        ("fc", "weight"),
    ]
    conv1_w = rows[1]
    assert conv1_w == EntrySummary(
        "conv1", "weight", 2, pytest.approx(0.001), pytest.approx(0.002), 0, 1  # type: ignore[arg-type]
    )
    v0 = rows[4]
    assert (v0.channels, v0.offset_min, v0.offset_max) == (1, -2, -2)
    assert v0.to_dict()["scale_min"] == 0.0318757  # shortest float32 text, not 0.03187569975852966


def test_summary_of_per_channel_entries_and_odd_entries() -> None:
    rows = summarize_record(read_record(PER_CHANNEL))
    assert rows[0].to_dict() == {
        "layer": K0,
        "kind": "kv_cache",
        "channels": 4,
        "scale_min": 0.01,
        "scale_max": 0.04,
        "offset_min": -1,
        "offset_max": 2,
    }
    odd = parse_record(
        'record { key: "empty" }\nrecord { key: "shift" value { shift_bit: 3 } }\n'
        'record { key: "half" value { scale_d: 0.5 } kv_cache_value { } }',
        source="odd",
    )
    rows = summarize_record(odd)
    assert [(r.layer, r.kind, r.channels) for r in rows] == [
        ("empty", "other", 0),
        ("shift", "other", 0),
        ("half", "kv_cache", 0),
        ("half", "activation", 1),
    ]
    assert rows[3].offset_min is None and rows[2].scale_min is None


def test_layer_detail_gives_every_channel() -> None:
    details = layer_detail(read_record(PER_CHANNEL), [K0, V0])
    assert [(d.layer, d.kind, d.channels) for d in details] == [(K0, "kv_cache", 4), (V0, "kv_cache", 1)]
    assert details[0].to_dict()["scale"] == [0.01, 0.02, 0.03, 0.04]
    assert details[0].offset == (-1, 0, 1, 2)
    conv1 = layer_detail(read_record(FULL), ["conv1"])
    assert [d.kind for d in conv1] == ["activation", "weight", "balance"]
    assert conv1[1].offset == (0, 1)


def test_layer_detail_unknown_name_lists_close_names() -> None:
    with pytest.raises(RecordError) as info:
        layer_detail(read_record(PER_CHANNEL), ["model.layers.0.self_attn.q_proj"], source="r.txt")
    message = str(info.value)
    assert "'model.layers.0.self_attn.q_proj'" in message and "record r.txt" in message
    assert K0 in message and V0 in message
    with pytest.raises(RecordError, match=r"it has 3 layers: model\.layers\.0"):
        layer_detail(read_record(PER_CHANNEL), ["zzz"])
    with pytest.raises(RecordError, match="has no layers"):
        layer_detail(parse_record("", source="e"), ["zzz"])


def _diff_fixture_pair() -> tuple[str, str]:
    a = (
        f'record {{ key: "{K0}" kv_cache_value {{ scale: 0.01 scale: 0.02 scale: 0.03 offset: 0 offset: 0 offset: 0 }} }}\n'
        f'record {{ key: "{V0}" kv_cache_value {{ scale: 0.5 offset: 1 }} }}\n'
        'record { key: "gone" kv_cache_value { scale: 1 offset: 0 } }\n'
        'record { key: "conv1" value { scale_d: 0.1 offset_d: 0 scale_w: 0.2 offset_w: 0 } }\n'
        f'record {{ key: "{K1}" kv_cache_value {{ scale: 0.5 offset: 0 }} }}\n'
    )
    b = (
        f'record {{ key: "{V0}" kv_cache_value {{ scale: 0.5 offset: 1 }} }}\n'
        f'record {{ key: "{K0}" kv_cache_value {{ scale: 0.01 scale: 0.025 scale: 0.03 offset: 0 offset: 2 offset: 0 }} }}\n'
        'record { key: "conv1" value { scale_d: 0.1 offset_d: 0 scale_w: 0.2 offset_w: 0 } }\n'
        f'record {{ key: "{K1}" kv_cache_value {{ scale: 0.5 scale: 0.25 offset: 0 offset: 0 }} }}\n'
        'record { key: "fresh" kv_cache_value { scale: 2 offset: 0 } }\n'
        'prune_record { producer { name: "x" } }\n'
    )
    return a, b


def test_diff_records_statuses_and_largest_change() -> None:
    a_text, b_text = _diff_fixture_pair()
    diff = diff_records(parse_record(a_text, source="a"), parse_record(b_text, source="b"), a_name="a.txt", b_name="b.txt")
    rows = {(d.layer, d.kind): d for d in diff.layers}
    assert [(d.layer, d.kind, d.status) for d in diff.layers] == [
        (K0, "kv_cache", "changed"),
        (V0, "kv_cache", "unchanged"),
        ("gone", "kv_cache", "removed"),
        ("conv1", "activation", "unchanged"),
        ("conv1", "weight", "unchanged"),
        (K1, "kv_cache", "changed"),
        ("fresh", "kv_cache", "added"),
    ]
    k0 = rows[(K0, "kv_cache")].delta
    assert k0 is not None
    assert k0.channels_changed == 1 and k0.max_offset_change == 2
    assert k0.max_abs_scale_change == pytest.approx(0.005, rel=1e-5)
    assert k0.max_rel_scale_change == pytest.approx(0.25, rel=1e-5)
    k1 = rows[(K1, "kv_cache")]
    assert (k1.channels_a, k1.channels_b) == (1, 2)
    assert rows[("gone", "kv_cache")].channels_b is None
    assert diff.counts() == {"added": 1, "removed": 1, "changed": 2, "unchanged": 3}
    assert diff.prune_records_equal is False
    payload = json.loads(json.dumps(diff.to_dict(), allow_nan=False))
    assert payload["a"] == "a.txt" and payload["b"] == "b.txt"
    assert payload["layers"][0]["largest_offset_change"] == 2
    assert payload["layers"][5]["channels_changed"] is None


def test_diff_of_a_record_with_itself_is_all_unchanged() -> None:
    record = read_record(FULL)
    diff = diff_records(record, record)
    assert {d.status for d in diff.layers} == {"unchanged"}
    assert diff.prune_records_equal


def test_diff_limited_to_layers_and_unknown_layer() -> None:
    a_text, b_text = _diff_fixture_pair()
    a, b = parse_record(a_text, source="a"), parse_record(b_text, source="b")
    diff = diff_records(a, b, layers=["fresh", "gone"])
    assert [(d.layer, d.status) for d in diff.layers] == [("gone", "removed"), ("fresh", "added")]
    with pytest.raises(RecordError, match="close names: fresh"):
        diff_records(a, b, layers=["frezh"])


def test_duplicate_keys_last_one_counts_in_a_diff() -> None:
    a = parse_record('record { key: "x" kv_cache_value { scale: 1 offset: 0 } }', source="a")
    b = parse_record(
        'record { key: "x" kv_cache_value { scale: 1 offset: 0 } }\n'
        'record { key: "x" kv_cache_value { scale: 2 offset: 0 } }',
        source="b",
    )
    (row,) = diff_records(a, b).layers
    assert row.status == "changed"


def test_inspect_record_dispatches(tmp_path: Path) -> None:
    assert isinstance(inspect_record(PER_CHANNEL), RecordSummary)
    summary = inspect_record(FULL)
    assert isinstance(summary, RecordSummary) and summary.prune_records == 2
    assert summary.to_dict()["record"] == str(FULL)
    detail = inspect_record(PER_CHANNEL, layers=[K1])
    assert isinstance(detail, RecordDetail) and detail.layers[0].scale == (0.5,)
    diff = inspect_record(PER_CHANNEL, diff=FULL)
    assert isinstance(diff, RecordDiff) and diff.b == str(FULL)
    with pytest.raises(RecordError, match="does not exist"):
        inspect_record(PER_CHANNEL, diff=tmp_path / "missing.txt")
