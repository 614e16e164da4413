"""PTQ calibration as a library: the user's model is untouched, `create_ptq_cali_model`, the copy, progress."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ptq_helpers import (
    PTQ_DATA,
    one_torch_thread,  # noqa: F401
    ptq_models,
)
from torch import Tensor, nn

import kvcal
from kvcal.errors import (
    CalibrationError,
    ConfigError,
    DeviceError,
    RecordOverwriteWarning,
)
from kvcal.ptq.job import run_ptq_calibration
from kvcal.ptq.model_copy import calibration_copy, model_bytes
from kvcal.record.store import read_record

pm = ptq_models()


def _data(directory: Path, count: int = 3) -> list[Tensor]:
    directory.mkdir()
    batches = [pm.sample(batch=2, seed=10 + i) for i in range(count)]
    for i, x in enumerate(batches):
        torch.save(x, directory / f"{i}.pt")
    return batches


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: (v.clone(), v.dtype, v.device) for k, v in model.state_dict(keep_vars=True).items()},
        "ids": [id(t) for t in (*model.parameters(), *model.buffers())],
        "modes": [m.training for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
        "modules": [(name, id(m)) for name, m in model.named_modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["ids"] == before["ids"] and after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"] and after["modules"] == before["modules"]
    for key, (tensor, dtype, device) in before["tensors"].items():
        now, now_dtype, now_device = after["tensors"][key]
        assert (now_dtype, now_device) == (dtype, device) and torch.equal(now, tensor), key


def _user_model() -> nn.Module:
    model = pm.build()
    model.train()
    model.conv3d.eval()  # a mix of modes
    model.layer2.register_forward_hook(lambda m, a, o: None)
    model.conv.register_forward_pre_hook(lambda m, a: None)
    return model


@pytest.mark.parametrize("config", ["ifmr", "hfmg", "defaults"])
def test_the_users_model_is_bit_identical_after_calibration(tmp_path: Path, config: str) -> None:
    _data(tmp_path / "data")
    model = _user_model()
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_ptq_calibration(model=model, config_path=PTQ_DATA / f"{config}.json",
                                     dataset_dir=tmp_path / "data", record_path=tmp_path / "r.txt")
    assert result.layers
    _assert_unchanged(model, before)
    assert int(model.counter.calls) == 0  # the copy ran, not the model


def test_the_copy_keeps_shared_weights_modes_and_is_frozen() -> None:
    model = _user_model()
    copy = calibration_copy(model, torch.device("cpu"))
    assert copy.shared_a.weight is copy.shared_b.weight
    assert copy.shared_a.weight is not model.shared_a.weight
    assert [m.training for m in copy.modules()] == [m.training for m in model.modules()]
    assert not any(p.requires_grad for p in copy.parameters())
    assert model_bytes(copy) == model_bytes(model)


def test_a_model_in_training_mode_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcal"):
        calibration_copy(_user_model(), torch.device("cpu"))
    assert "the model and 15 of its modules are in training mode" in caplog.text
    assert "call model.eval() first" in caplog.text


def test_too_large_and_dispatched_models(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.ptq.model_copy

    model = pm.build()
    monkeypatch.setattr(kvcal.ptq.model_copy, "available_bytes", lambda device: 10)
    with pytest.raises(CalibrationError, match=r"needs 0\.00 GiB on cpu, where 0\.00 GiB is available"):
        calibration_copy(model, torch.device("cpu"))
    monkeypatch.undo()
    model.hf_device_map = {"": "cpu", "layer2": "disk"}
    with pytest.raises(DeviceError, match="dispatched over cpu"):
        calibration_copy(model, torch.device("cpu"))


def test_create_ptq_cali_model_calibrates_as_batches_run(tmp_path: Path) -> None:
    batches = _data(tmp_path / "data")
    model = pm.build()
    before = _snapshot(model)
    record = tmp_path / "api.txt"
    cali = kvcal.create_ptq_cali_model(PTQ_DATA / "ifmr.json", record, model)  # batch_num 2
    outputs = [cali(x) for x in batches[:2]]
    assert cali.complete and record.exists()
    _assert_unchanged(model, before)
    assert outputs[0].shape == pm.build()(batches[0]).shape
    cli_record = tmp_path / "lib.txt"
    run_ptq_calibration(model=pm.build(), config_path=PTQ_DATA / "ifmr.json", dataset_dir=tmp_path / "data",
                        record_path=cli_record)
    assert record.read_bytes() == cli_record.read_bytes()
    assert cali.result is not None and cali.result.model_sqnr_db > 0
    assert isinstance(cali.model, nn.Module)
    cali(batches[2])  # later calls pass through
    again = kvcal.create_ptq_cali_model(PTQ_DATA / "ifmr.json", record, pm.build())
    again(batches[2])
    with pytest.warns(RecordOverwriteWarning) as caught:
        again(batches[1])
    assert any("overwrote the factors of conv: scale_d" in str(w.message) for w in caught)


def test_create_ptq_cali_model_refuses_ada_and_bad_configs_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="layers 'conv', 'deconv', 'layer2' use ada_quantize"):
        kvcal.create_ptq_cali_model(PTQ_DATA / "ada.json", tmp_path / "r.txt", pm.build())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 2}))
    with pytest.raises(ConfigError, match="'version' must be 1"):
        kvcal.create_ptq_cali_model(bad, tmp_path / "r.txt", pm.build())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        kvcal.create_ptq_cali_model(PTQ_DATA / "ifmr.json", tmp_path / "r.txt", "model")  # type: ignore[arg-type]


def test_disabled_layers_stay_float_and_get_no_entry(tmp_path: Path) -> None:
    batches = _data(tmp_path / "data")
    model = pm.build()
    cali = kvcal.create_ptq_cali_model(PTQ_DATA / "defaults.json", tmp_path / "r.txt", model)  # layer2 disabled
    for x in batches:
        cali(x)
    keys = [entry.key for entry in read_record(tmp_path / "r.txt").record]
    assert sorted(keys) == ["conv", "conv3d", "deconv", "layer10", "pool"]
    assert torch.equal(cali.model.layer2.weight, model.layer2.weight)
    assert not torch.equal(cali.model.layer10.weight, model.layer10.weight)
    assert cali.result is not None and cali.result.float_layers == ("layer2",)


@pytest.mark.parametrize(("config", "expected"), [("ifmr", [0, 1, 2, 3]), ("hfmg", [0, 1, 2])])
def test_progress_counts_the_dmq_and_evaluation_passes(tmp_path: Path, config: str, expected: list[int]) -> None:
    # ifmr.json: DMQ without fusion (its statistics come from the first pass), batch_num 2 → 3 passes;
    # hfmg.json: no DMQ, batch_num 1 → 2 passes.
    _data(tmp_path / "data")
    seen: list[tuple[int, int]] = []
    run_ptq_calibration(model=pm.build(), config_path=PTQ_DATA / f"{config}.json", dataset_dir=tmp_path / "data",
                        record_path=tmp_path / "r.txt", progress=lambda done, total: seen.append((done, total)))
    total = expected[-1]
    assert seen == [(n, total) for n in expected]


def test_the_dmq_pass_runs_when_a_pair_was_fused(tmp_path: Path) -> None:
    _data(tmp_path / "data")
    document = json.loads((PTQ_DATA / "ifmr.json").read_text())
    document.update(do_fusion=True, skip_fusion_layers=[])
    config = tmp_path / "fused.json"
    config.write_text(json.dumps(document))
    seen: list[tuple[int, int]] = []
    result = run_ptq_calibration(model=pm.build(), config_path=config, dataset_dir=tmp_path / "data",
                                 record_path=tmp_path / "r.txt", progress=lambda d, t: seen.append((d, t)))
    assert result.fused == (("conv", "bn"),)
    assert seen[0] == (0, 4) and seen[1] == (1, 4)


class KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(input=x)


def test_a_layer_called_with_a_keyword_input_is_balanced_and_observed(tmp_path: Path) -> None:
    x = torch.randn(4, 6)
    cfg = {"version": 1, "batch_num": 1, "fc": {
        "quant_enable": True, "dmq_balancer_param": 0.5,
        "activation_quant_params": {"num_bits": 8, "act_algo": "hfmg", "asymmetric": False, "num_of_bins": 1024},
        "weight_quant_params": {"num_bits": 8, "channel_wise": False, "wts_algo": "arq_quantize"}}}
    config = tmp_path / "c.json"
    config.write_text(json.dumps(cfg))
    cali = kvcal.create_ptq_cali_model(config, tmp_path / "r.txt", KeywordInput())
    out = cali(x)
    torch.testing.assert_close(out, KeywordInput()(x), rtol=0.05, atol=0.05)
    value = read_record(tmp_path / "r.txt").record[0].value
    assert len(value.tensor_balance_factor) == 6 and value.HasField("scale_d")


def test_nan_in_a_layer_input_names_the_layer(tmp_path: Path) -> None:
    cali = kvcal.create_ptq_cali_model(PTQ_DATA / "hfmg.json", tmp_path / "r.txt", pm.build())
    x = pm.sample()
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="forward call 1: layer 'conv': batch 1 contains NaN or inf"):
        cali(x)
    assert not (tmp_path / "r.txt").exists()


def test_a_weighted_layer_without_weight_parameters_gets_arq_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    document = json.loads((PTQ_DATA / "ada.json").read_text())  # conv3d: ADA from common_config, no weights
    for name in ("conv", "deconv", "layer2"):
        document[name]["quant_enable"] = False
    config = tmp_path / "c.json"
    config.write_text(json.dumps(document))
    _data(tmp_path / "data", 4)
    with caplog.at_level(logging.WARNING, logger="kvcal"):
        run_ptq_calibration(model=pm.build(), config_path=config, dataset_dir=tmp_path / "data",
                            record_path=tmp_path / "r.txt")
    assert "layer 'conv3d' has no weight_quant_params" in caplog.text
    conv3d = next(e for e in read_record(tmp_path / "r.txt").record if e.key == "conv3d").value
    assert conv3d.wts_type == "INT8" and len(conv3d.scale_w) == 2  # per channel, the Conv3d default
