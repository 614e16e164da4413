"""PTQ `value` entries in the record store: merge, keep, clear, report (the store rules of FORMATS.md §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcal.output import describe_change, field_change_text, render_overwrite_report
from kvcal.quant import QParams
from kvcal.record.changes import FieldChange, PtqLayerChange
from kvcal.record.ptq_value import PtqFactors
from kvcal.record.store import merge_kv_cache, merge_record, read_record


def conv(scale_d: float = 0.5, balance: tuple[float, ...] | None = (2.0, 3.0)) -> PtqFactors:
    return PtqFactors("conv", scale_d, -3, (0.25, 0.125), (0, 0), balance, wts_type="INT6")


POOL = PtqFactors("pool", 0.0625, 0, (1.0,), (0,), wts_type=None)

EXPECTED = """record {
  key: "conv"
  value {
    scale_d: 0.5
    offset_d: -3
    scale_w: 0.25
    scale_w: 0.125
    offset_w: 0
    offset_w: 0
    tensor_balance_factor: 2.0
    tensor_balance_factor: 3.0
    act_type: "INT8"
    wts_type: "INT6"
  }
}
record {
  key: "pool"
  value {
    scale_d: 0.0625
    offset_d: 0
    scale_w: 1.0
    offset_w: 0
    act_type: "INT8"
  }
}
"""


def test_a_new_record_has_the_fields_in_protobuf_order(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    report = merge_record(record, ptq={"conv": conv(), "pool": POOL})
    assert record.read_text() == EXPECTED
    assert [(c.layer, c.status) for c in report.layers] == [("conv", "new"), ("pool", "new")]
    assert report.written


def test_the_same_values_again_are_unchanged_and_not_written(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    merge_record(record, ptq={"conv": conv(), "pool": POOL})
    record.write_text(EXPECTED + "# a comment kept because nothing is rewritten\n")
    report = merge_record(record, ptq={"conv": conv(), "pool": POOL})
    assert [c.status for c in report.layers] == ["unchanged", "unchanged"]
    assert not report.written and record.read_text().endswith("rewritten\n")
    assert describe_change(report.layers[0]) == "conv: unchanged"


def test_other_fields_and_kv_cache_values_are_kept_and_stale_factors_cleared(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    record.write_text(
        'record { key: "conv" value { shift_bit: 4 skip_fusion: true tensor_balance_factor: 9.0 '
        'wts_type: "INT4" } kv_cache_value { scale: 0.5 offset: 1 } }\n'
        'record { key: "other" value { scale_d: 0.25 } }\n'
    )
    report = merge_record(record, ptq={"conv": conv(balance=None)})
    entry = read_record(record).record[0]
    assert list(entry.value.shift_bit) == [4] and entry.value.skip_fusion
    assert list(entry.kv_cache_value.scale) == [0.5] and list(entry.kv_cache_value.offset) == [1]
    assert len(entry.value.tensor_balance_factor) == 0 and entry.value.wts_type == "INT6"
    assert read_record(record).record[1].value.scale_d == 0.25
    change = report.layers[0]
    assert isinstance(change, PtqLayerChange) and change.status == "changed"
    balance = change.field("tensor_balance_factor")
    assert balance is not None and (balance.old, balance.new, balance.changed) == ((9.0,), None, True)
    wts = change.field("wts_type")
    assert wts is not None and field_change_text(wts) == "INT4 → INT6"
    assert field_change_text(balance) == "9.0 → none"


def test_a_kv_merge_keeps_ptq_values_and_both_can_go_in_one_merge(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    merge_record(record, ptq={"conv": conv()})
    merge_kv_cache(record, {"conv": QParams(torch.tensor([0.5]), torch.tensor([1], dtype=torch.int32))})
    entry = read_record(record).record[0]
    assert entry.value.scale_d == 0.5 and list(entry.kv_cache_value.scale) == [0.5]
    kv = QParams(torch.tensor([0.25]), torch.tensor([0], dtype=torch.int32))
    report = merge_record(record, kv={"k": kv}, ptq={"conv": conv(scale_d=0.75)})
    assert [(c.kind, c.layer, c.status) for c in report.layers] == [("kv_cache", "k", "new"), ("ptq", "conv", "changed")]
    assert [e.key for e in read_record(record).record] == ["conv", "k"]


def test_duplicate_keys_update_the_last_entry_with_a_value(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    record.write_text(
        'record { key: "conv" kv_cache_value { scale: 1.0 offset: 0 } }\n'
        'record { key: "conv" value { scale_d: 0.1 } }\n'
        'record { key: "conv" value { scale_d: 0.2 } }\n'
    )
    merge_record(record, ptq={"conv": conv()})
    entries = read_record(record).record
    assert [e.value.scale_d for e in entries[1:]] == [pytest.approx(0.1), 0.5]


def test_vector_changes_report_counts_and_the_largest_change(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    merge_record(record, ptq={"conv": conv()})
    changed = PtqFactors("conv", 0.5, -2, (0.25, 0.25), (0, 0), (2.0, 3.0), wts_type="INT6")
    report = merge_record(record, ptq={"conv": changed})
    change = report.layers[0]
    assert isinstance(change, PtqLayerChange)
    scale_w = change.field("scale_w")
    assert scale_w is not None and (scale_w.channels_changed, scale_w.largest_change) == (1, 0.125)
    assert scale_w.largest_relative_change == 1.0
    assert field_change_text(scale_w) == "1/2 ch changed, largest 0.125 (100.00%)"
    assert describe_change(change) == "conv: offset_d -3 → -2, scale_w 1/2 ch changed, largest 0.125 (100.00%)"
    as_dict = change.to_dict()
    assert as_dict["kind"] == "ptq" and as_dict["status"] == "changed"
    offset = next(f for f in as_dict["fields"] if f["field"] == "offset_d")
    assert offset == {"field": "offset_d", "changed": True, "old": [-3], "new": [-2], "channels_changed": 1,
                      "largest_change": 1.0, "largest_relative_change": pytest.approx(1 / 3)}


def test_the_overwrite_table_shows_ptq_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "r.txt"
    render_overwrite_report(merge_record(record, ptq={"conv": conv(), "pool": POOL}))
    err = capsys.readouterr().err
    assert "Record" in err and "PTQ values" in err
    assert "2 ch: 0.125 … 0.25" in err and "act INT8, wts INT6" in err
    assert "2 new, 0 changed, 0 unchanged; written" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale_d": 0.0}, "scale_d must be finite and positive, got 0.0"),
        ({"scale_d": float("nan")}, "scale_d must be finite and positive"),
        ({"scale_w": (0.1, -1.0)}, "scale_w must be finite and positive, got -1.0"),
        ({"offset_w": (0,)}, "scale_w and offset_w must have the same length, got 2 and 1"),
        ({"offset_d": 2**40}, "offset_d does not fit in int32"),
        ({"tensor_balance_factor": (float("inf"),)}, "tensor_balance_factor must be finite"),
    ],
)
def test_malformed_values_are_refused_before_the_record_is_touched(kwargs: dict[str, object], message: str) -> None:
    values = {"layer": "conv", "scale_d": 0.5, "offset_d": 0, "scale_w": (0.1, 0.2), "offset_w": (0, 0)} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PtqFactors(**values)  # type: ignore[arg-type]


def test_field_change_of_strings_and_lengths() -> None:
    assert not FieldChange("act_type", ("INT8",), ("INT8",)).changed
    assert FieldChange("scale_w", (0.5,), (0.5, 0.25)).channels_changed is None
    assert field_change_text(FieldChange("scale_w", (0.5,), (0.5, 0.25))) == "0.5 → 2 ch: 0.25 … 0.5"
    assert field_change_text(FieldChange("scale_w", None, (0.5, 0.25))) == "none → 2 ch: 0.25 … 0.5"
