"""`kvcal calibrate` on PTQ configs: every factor against the naive reference of PTQ.md, the record,
the report, and every failure path (exit 1, one `error:` line, the record byte-identical)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from ptq_helpers import (
    DEMO_CNN,
    PTQ_DATA,
    PTQ_MODELS,
    ROOT,
    demo_cnn,
    one_torch_thread,  # noqa: F401
    ptq_models,
)
from reference_ptq import calibrate_reference

from kvcal.cli import main
from kvcal.record.store import read_record

NET = f"{PTQ_MODELS}:build"
CNN = f"{DEMO_CNN}:build"


pm = ptq_models()
cnn = demo_cnn()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def calibrate(model: str, config: Path, data: Path, record: Path, *extra: str) -> Result:
    return run("calibrate", "--model", model, "--config", str(config), "--dataset", str(data),
               "--record", str(record), "--device", "cpu", *extra)


def record_values(path: Path) -> dict[str, dict[str, Any]]:
    """Each entry's `value` fields, as the reference returns them."""
    result = {}
    for entry in read_record(path).record:
        if not entry.HasField("value"):
            continue
        v = entry.value
        fields: dict[str, Any] = {"scale_d": v.scale_d, "offset_d": v.offset_d, "scale_w": list(v.scale_w),
                                  "offset_w": list(v.offset_w), "act_type": v.act_type}
        if len(v.tensor_balance_factor):
            fields["tensor_balance_factor"] = list(v.tensor_balance_factor)
        if v.HasField("wts_type"):
            fields["wts_type"] = v.wts_type
        result[entry.key] = fields
    return result


def assert_matches(got: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(expected)
    for layer, fields in expected.items():
        assert sorted(got[layer]) == sorted(fields), layer
        for key, value in fields.items():
            if key in ("offset_d", "offset_w", "act_type", "wts_type"):
                assert got[layer][key] == value, (layer, key)
            else:
                np.testing.assert_allclose(got[layer][key], value, rtol=1e-6, err_msg=f"{layer} {key}")


def net_batches(data: Path, count: int = 4) -> list[torch.Tensor]:
    data.mkdir(exist_ok=True)
    batches = [pm.sample(batch=2, seed=i) for i in range(count)]
    for i, x in enumerate(batches):
        torch.save(x, data / f"b{i}.pt")
    return batches


@pytest.mark.parametrize("config", ["ifmr", "hfmg", "bits7", "defaults", "nonquant_override"])
def test_every_factor_matches_the_reference(tmp_path: Path, config: str) -> None:
    source = PTQ_DATA / f"{config}.json"
    document = json.loads(source.read_text())
    batches = net_batches(tmp_path / "data")
    record = tmp_path / "record.txt"
    result = calibrate(NET, source, tmp_path / "data", record)
    assert result.exit_code == 0, result.stderr
    fuse = [("conv", "bn")] if document["do_fusion"] and "conv" not in document["skip_fusion_layers"] else []
    assert_matches(record_values(record), calibrate_reference(pm.build(), document, batches, fuse))


def _cnn_configs(tmp_path: Path, data: Path) -> dict[str, Path]:
    example = tmp_path / "example.json"
    result = run("gen-config", "--ptq", "--model", CNN, "--dataset", str(data), "--cfg",
                 str(ROOT / "configs" / "ptq_example.cfg"), "-o", str(example))
    assert result.exit_code == 0, result.stderr
    document = json.loads(example.read_text())
    # Every layer on: HFMG and DMQ on the ConvTranspose2d, per-channel; the AvgPool2d; FORCE_FP16; both BNs fused.
    everything = dict(document, skip_fusion_layers=[], fakequant_precision_mode="FORCE_FP16_QUANT", batch_num=3)
    for name in ("deconv", "pool"):
        everything[name] = dict(document[name], quant_enable=True)
    everything["deconv"] = dict(
        everything["deconv"], dmq_balancer_param=0.5,
        activation_quant_params={"num_bits": 8, "act_algo": "hfmg", "asymmetric": True, "num_of_bins": 1024},
    )
    full = tmp_path / "everything.json"
    full.write_text(json.dumps(everything, indent=4))
    return {"example": example, "everything": full}


@pytest.mark.parametrize("which", ["example", "everything"])
def test_the_cnn_demo_end_to_end_matches_the_reference(tmp_path: Path, which: str) -> None:
    data = tmp_path / "data"
    cnn.write_batches(data, batches=3, batch_size=2)
    config = _cnn_configs(tmp_path, data)[which]
    document = json.loads(config.read_text())
    record = tmp_path / "record.txt"
    result = calibrate(CNN, config, data, record)
    assert result.exit_code == 0, result.stderr
    batches = [torch.load(path) for path in sorted(data.iterdir())]
    fuse = [(c, b) for c, b in (("conv1", "bn1"), ("conv2", "bn2")) if c not in document["skip_fusion_layers"]]
    assert_matches(record_values(record), calibrate_reference(cnn.build(), document, batches, fuse))
    assert "PTQ calibration: model output SQNR" in result.stderr
    assert "BatchNorm fused: bn1 into conv1" in result.stderr


@pytest.fixture
def cnn_ws(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    cnn.write_batches(data, batches=3, batch_size=2)
    paths = _cnn_configs(tmp_path, data)
    return {"data": data, "config": paths["example"], "record": tmp_path / "record.txt", "root": tmp_path}


def test_rerunning_with_the_same_data_is_unchanged_and_does_not_rewrite(cnn_ws: dict[str, Path]) -> None:
    assert calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"]).exit_code == 0
    before, stat = cnn_ws["record"].read_bytes(), os.stat(cnn_ws["record"])
    second = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"])
    assert second.exit_code == 0, second.stderr
    assert "0 new, 0 changed, 3 unchanged; nothing changed: record not rewritten" in second.stderr
    assert cnn_ws["record"].read_bytes() == before
    assert os.stat(cnn_ws["record"]).st_mtime_ns == stat.st_mtime_ns


PRIOR = """record {
  key: "head"
  kv_cache_value {
    scale: 0.5
    offset: 1
  }
}
record {
  key: "conv1"
  value {
    scale_d: 0.25
    offset_d: 3
    shift_bit: 7
    tensor_balance_factor: 9.0
    dst_type: "INT4"
  }
}
record {
  key: "conv2"
  value {
    scale_d: 0.5
    offset_d: -128
    tensor_balance_factor: 2.0
  }
}
record {
  key: "foreign"
  value {
    scale_d: 0.125
  }
}
"""


def test_ptq_and_kv_entries_on_one_key_coexist_and_other_fields_are_kept(cnn_ws: dict[str, Path]) -> None:
    cnn_ws["record"].write_text(PRIOR)
    document = json.loads(cnn_ws["config"].read_text())
    document.pop("conv2")  # conv2 is not calibrated: its entry stays as it was
    config = cnn_ws["root"] / "no_conv2.json"
    config.write_text(json.dumps(document))
    result = calibrate(CNN, config, cnn_ws["data"], cnn_ws["record"])
    assert result.exit_code == 0, result.stderr
    entries = {entry.key: entry for entry in read_record(cnn_ws["record"]).record}
    assert list(entries) == ["head", "conv1", "conv2", "foreign"]
    head = entries["head"]
    assert list(head.kv_cache_value.scale) == [0.5] and list(head.kv_cache_value.offset) == [1]
    assert head.value.HasField("scale_d") and head.value.wts_type == "INT8"
    conv1 = entries["conv1"].value
    assert conv1.shift_bit == [7] and conv1.dst_type == "INT4"  # fields kvcal does not own are kept
    assert len(conv1.tensor_balance_factor) == 3 and conv1.tensor_balance_factor[0] != 9.0
    assert entries["conv2"].value.tensor_balance_factor == [2.0]
    assert entries["foreign"].value.scale_d == 0.125
    assert "new" in result.stderr and "changed" in result.stderr
    assert "9.0 → 3 ch: " in result.stderr


def test_a_layer_calibrated_without_dmq_loses_a_stale_balance_factor(cnn_ws: dict[str, Path]) -> None:
    cnn_ws["record"].write_text('record {\n  key: "head"\n  value {\n    tensor_balance_factor: 4.0\n  }\n}\n')
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"], "--report",
                       str(cnn_ws["root"] / "r.json"))
    assert result.exit_code == 0, result.stderr
    head = next(e for e in read_record(cnn_ws["record"]).record if e.key == "head")
    assert len(head.value.tensor_balance_factor) == 0
    report = json.loads((cnn_ws["root"] / "r.json").read_text())
    change = next(c for c in report["overwrite_report"]["layers"] if c["layer"] == "head")
    balance = next(f for f in change["fields"] if f["field"] == "tensor_balance_factor")
    assert (balance["old"], balance["new"], balance["changed"]) == ([4.0], None, True)


def test_report_json(cnn_ws: dict[str, Path]) -> None:
    report = cnn_ws["root"] / "report.json"
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"], "--report", str(report))
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["mode"] == "ptq" and data["batch_num"] == 2 and data["batches_used"] == 2
    assert data["fused_bn"] == [{"conv": "conv1", "bn": "bn1"}]
    assert data["float_layers"] == ["deconv", "pool"]
    assert isinstance(data["model_sqnr_db"], float) and data["model_sqnr_db"] > 10
    layers = {layer["layer"]: layer for layer in data["layers"]}
    assert sorted(layers) == ["conv1", "conv2", "head"]
    for layer in layers.values():
        assert all(isinstance(layer[k], float) for k in ("weight_sqnr_db", "input_sqnr_db", "output_sqnr_db"))
    assert layers["conv2"]["weight_bits"] == 6 and layers["conv1"]["fused_bn"] == "bn1"
    changes = data["overwrite_report"]["layers"]
    assert {c["kind"] for c in changes} == {"ptq"} and {c["status"] for c in changes} == {"new"}


def test_dry_run_writes_nothing(cnn_ws: dict[str, Path]) -> None:
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"], "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "dry run: nothing written" in result.stderr
    assert not cnn_ws["record"].exists()


def test_inspect_record_shows_and_diffs_ptq_entries(cnn_ws: dict[str, Path]) -> None:
    assert calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"]).exit_code == 0
    table = run("inspect-record", str(cnn_ws["record"]), "--json")
    kinds = {(e["layer"], e["kind"]) for e in json.loads(table.stdout)["entries"]}
    assert {("conv1", "activation"), ("conv1", "weight"), ("conv1", "balance"), ("head", "weight")} <= kinds
    other = cnn_ws["root"] / "other.txt"
    document = json.loads(cnn_ws["config"].read_text())
    document["head"]["activation_quant_params"]["asymmetric"] = False
    document["conv1"]["dmq_balancer_param"] = 0.3
    config = cnn_ws["root"] / "changed.json"
    config.write_text(json.dumps(document))
    assert calibrate(CNN, config, cnn_ws["data"], other).exit_code == 0
    diff = json.loads(run("inspect-record", str(cnn_ws["record"]), "--diff", str(other), "--json").stdout)
    rows = {(row["layer"], row["kind"]): row for row in diff["layers"]}
    assert rows[("head", "activation")]["status"] == "changed"
    assert rows[("conv1", "balance")]["status"] == "changed"
    assert rows[("conv1", "balance")]["channels_changed"] == 3


# ------------------------------------------------------------------ failure paths


def _nan_batch(ws: dict[str, Path]) -> None:
    bad = torch.load(ws["data"] / "batch_001.pt")
    bad[0, 0, 0, 0] = float("nan")
    torch.save(bad, ws["data"] / "batch_001.pt")


def _ada(ws: dict[str, Path]) -> Path:
    document = json.loads(ws["config"].read_text())
    document["head"]["weight_quant_params"] = {"num_bits": 8, "channel_wise": False, "wts_algo": "ada_quantize"}
    path = ws["root"] / "ada.json"
    path.write_text(json.dumps(document))
    return path


def _missing_layer(ws: dict[str, Path]) -> Path:
    document = json.loads(ws["config"].read_text())
    document["nonexistent"] = document["head"]
    path = ws["root"] / "missing.json"
    path.write_text(json.dumps(document))
    return path


def _too_many(ws: dict[str, Path]) -> Path:
    document = json.loads(ws["config"].read_text())
    document["batch_num"] = 9
    path = ws["root"] / "many.json"
    path.write_text(json.dumps(document))
    return path


FAILURES: dict[str, tuple[Any, str]] = {
    "nan": (_nan_batch, "contains NaN or inf"),
    "ada": (_ada, "layer 'head' use ada_quantize: ADA calibration is not supported yet"),
    "missing layer": (_missing_layer, "'nonexistent' does not exist in the model"),
    "too few batches": (_too_many, "has 3 data file(s); batch_num asks for 9"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_leave_the_record_byte_identical(cnn_ws: dict[str, Path], case: str) -> None:
    cnn_ws["record"].write_text(PRIOR)
    prepare, message = FAILURES[case]
    config = prepare(cnn_ws) or cnn_ws["config"]
    report = cnn_ws["root"] / "report.json"
    result = calibrate(CNN, config, cnn_ws["data"], cnn_ws["record"], "--report", str(report))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: ") and message in result.stderr, result.stderr
    assert cnn_ws["record"].read_text() == PRIOR
    assert not report.exists()


def test_ada_is_refused_before_any_data_is_read(cnn_ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.calibration.job

    def no_data(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("data read")

    monkeypatch.setattr(kvcal.calibration.job, "open_data", no_data)
    result = calibrate(CNN, _ada(cnn_ws), cnn_ws["data"], cnn_ws["record"])
    assert result.exit_code == 1 and "ADA calibration is not supported yet" in result.stderr


@pytest.mark.parametrize("target", ["record", "report"])
def test_a_failing_write_leaves_both_files_as_they_were(
    cnn_ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    import kvcal.record.store

    cnn_ws["record"].write_text(PRIOR)
    report = cnn_ws["root"] / "report.json"
    report.write_text("old report\n")
    real = kvcal.record.store.atomic_write
    failing_path = cnn_ws["record"] if target == "record" else report

    def failing(path: Path, data: bytes, **kwargs: Any) -> None:
        if Path(path) == failing_path:
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(kvcal.record.store, "atomic_write", failing)
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"], "--report", str(report))
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert cnn_ws["record"].read_text() == PRIOR
    assert report.read_text() == "old report\n"


def test_a_model_raising_mid_calibration_and_ctrl_c(cnn_ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.ptq.calibrate

    cnn_ws["record"].write_text(PRIOR)
    real = kvcal.ptq.calibrate.PtqSession.observe
    calls = {"n": 0}

    def raising(self: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(kvcal.ptq.calibrate.PtqSession, "observe", raising)
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"])
    assert result.exit_code == 130 and "interrupted; nothing was written" in result.stderr
    assert cnn_ws["record"].read_text() == PRIOR


def test_tap_does_not_apply_to_a_ptq_config(cnn_ws: dict[str, Path]) -> None:
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"], "--tap", "proj")
    assert result.exit_code == 1 and "--tap proj is for KV-cache configs" in result.stderr


def test_a_model_too_large_to_copy_names_the_limit(cnn_ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.ptq.model_copy

    monkeypatch.setattr(kvcal.ptq.model_copy, "available_bytes", lambda device: 1024)
    result = calibrate(CNN, cnn_ws["config"], cnn_ws["data"], cnn_ws["record"])
    assert result.exit_code == 1
    assert "too large to copy for PTQ calibration" in result.stderr
    assert "where 0.00 GiB is available" in result.stderr
    assert not cnn_ws["record"].exists()
