"""QuantCalibrationOp: the CLI.md snippet, pass-through, completion, record writes, errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kvcal import QuantCalibrationOp
from kvcal.errors import CalibrationError, RecordOverwriteWarning
from kvcal.observers import make_observer
from kvcal.params import settings_from_params
from kvcal.record.store import read_record

HFMG_PER_CHANNEL = {"act_algo": "hfmg", "num_bits": 8, "quant_granularity": "1", "with_offset": True, "batch_num": 1}


def kv_entries(path: str | os.PathLike[str]) -> dict[str, tuple[list[float], list[int]]]:
    record = read_record(path)
    return {
        entry.key: (list(entry.kv_cache_value.scale), list(entry.kv_cache_value.offset))
        for entry in record.record
        if entry.HasField("kv_cache_value")
    }


def test_cli_md_snippet_runs_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # ---- CLI.md, verbatim apart from the import ----
    record_file = os.path.join("./", "kv_cache.txt")

    class LinearNet(nn.Module):
        def __init__(self, quant_algo_params):
            super().__init__()
            self.layer1 = nn.Linear(28, 1024, bias=False)
            self.ptq_1 = QuantCalibrationOp(record_file, quant_algo_params=quant_algo_params,
                                            quant_method="kv_cache_quant")
        def forward(self, layer_name, x):
            return self.ptq_1(layer_name, self.layer1(x))

    model = LinearNet({"act_algo": "hfmg", "num_bits": 8, "quant_granularity": "1",
                       "with_offset": True, "batch_num": 1}).eval()
    model("qat_1", torch.randn((2, 2, 28, 28)))
    # ---- end of snippet ----
    entries = kv_entries(tmp_path / "kv_cache.txt")
    assert list(entries) == ["qat_1"]
    scales, offsets = entries["qat_1"]
    assert len(scales) == len(offsets) == 1024
    assert all(s > 0 for s in scales)
    assert all(-128 <= o <= 127 for o in offsets)


def test_forward_returns_the_same_object_and_matches_the_observer(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    op = QuantCalibrationOp(record, quant_algo_params=HFMG_PER_CHANNEL)
    x = torch.randn(3, 5, 16)
    assert op("k", x) is x
    expected = make_observer(settings_from_params(HFMG_PER_CHANNEL), "k")
    expected.update(x)
    qparams = expected.compute()
    scales, offsets = kv_entries(record)["k"]
    assert torch.equal(torch.tensor(scales, dtype=torch.float32), qparams.scale.float())
    assert offsets == qparams.offset.tolist()


def test_layer_written_only_when_batch_num_is_reached(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    params = {"act_algo": "ifmr", "batch_num": 2, "quant_granularity": 0}
    op = QuantCalibrationOp(str(record), quant_algo_params=params)
    first, second = torch.randn(4, 8), torch.randn(4, 8) * 3
    op("v", first)
    assert not record.exists()
    op("v", second)
    written = record.read_bytes()
    reference = make_observer(settings_from_params(params), "v")
    reference.update(first)
    reference.update(second)
    assert kv_entries(record)["v"][0] == [float(reference.compute().scale[0])]
    # Calls after completion pass through and change nothing.
    huge = torch.randn(4, 8) * 1000
    assert op("v", huge) is huge
    assert record.read_bytes() == written
    observer = op.observer("v")
    assert observer is not None and observer.batches_seen == 2


def test_one_observer_per_layer_name(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    op = QuantCalibrationOp(record)
    op("a", torch.randn(10))
    op("b", torch.randn(10) * 5)
    entries = kv_entries(record)
    assert list(entries) == ["a", "b"]
    assert entries["a"] != entries["b"]


def test_recalibration_warns_old_to_new_and_keeps_foreign_entries(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    record.write_text(
        'record {\n  key: "conv1"\n  value {\n    scale_d: 0.5\n    offset_d: 3\n  }\n}\n', encoding="utf-8"
    )
    QuantCalibrationOp(record)("k", torch.linspace(-1, 1, 101))
    old_scale = kv_entries(record)["k"][0][0]
    with pytest.warns(RecordOverwriteWarning, match="→") as caught:
        QuantCalibrationOp(record)("k", torch.linspace(-4, 4, 101))
    (message,) = [str(w.message) for w in caught]
    assert "k" in message and str(record) in message
    new_scale = kv_entries(record)["k"][0][0]
    assert new_scale != old_scale
    parsed = read_record(record)
    assert parsed.record[0].key == "conv1" and parsed.record[0].value.scale_d == 0.5
    # The same data again: unchanged, so no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantCalibrationOp(record)("k", torch.linspace(-4, 4, 101))


def test_bad_quant_method_and_params(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    with pytest.raises(ValueError, match="quant_method must be 'kv_cache_quant', got 'weight_quant'"):
        QuantCalibrationOp(record, quant_method="weight_quant")
    with pytest.raises(ValueError, match="num_bits"):
        QuantCalibrationOp(record, {"num_bits": 4})
    with pytest.raises(ValueError, match="num_of_bins"):
        QuantCalibrationOp(record, {"act_algo": "ifmr", "num_of_bins": 1024})
    with pytest.raises(TypeError, match="batch_num"):
        QuantCalibrationOp(record, {"batch_num": "2"})
    with pytest.raises(TypeError, match="quant_algo_params must be a dict"):
        QuantCalibrationOp(record, [("act_algo", "ifmr")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="record_file must be a path"):
        QuantCalibrationOp(None)  # type: ignore[arg-type]
    assert not record.exists()


def test_bad_inputs_name_the_layer_and_write_nothing(tmp_path: Path) -> None:
    record = tmp_path / "r.txt"
    op = QuantCalibrationOp(record)
    with pytest.raises(CalibrationError, match="layer 'k'.*NaN or inf"):
        op("k", torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="float64"):
        op("k", torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="layer_name must be a str"):
        op(3, torch.ones(3))  # type: ignore[arg-type]
    assert not record.exists()


def test_is_a_module_without_state(tmp_path: Path) -> None:
    op = QuantCalibrationOp(tmp_path / "r.txt", {"act_algo": "hfmg"})
    assert isinstance(op, nn.Module)
    assert op.state_dict() == {}
    assert "act_algo='hfmg'" in repr(op)
