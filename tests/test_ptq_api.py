"""`kvcal.create_quant_config`: the reference toolkit's signature and semantics."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from ptq_helpers import (
    PTQ_DATA,
    ROOT,
    one_torch_thread,  # noqa: F401
    ptq_models,
)
from torch import Tensor, nn

import kvcal
from kvcal.errors import ConfigError
from kvcal.ptq.plan import PtqWarning

pm = ptq_models()


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        return self.fc(x).sum() + self.conv(image).sum()


def test_signature_is_the_reference_one() -> None:
    parameters = inspect.signature(kvcal.create_quant_config).parameters
    assert [(p.name, p.default) for p in parameters.values()] == [
        ("config_file", inspect.Parameter.empty),
        ("model", inspect.Parameter.empty),
        ("input_data", inspect.Parameter.empty),
        ("skip_layers", None),
        ("batch_num", 1),
        ("activation_offset", True),
        ("config_defination", None),
    ]
    assert "create_quant_config" in kvcal.__all__


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_input(tmp_path: Path, as_dict: bool) -> None:
    x, image = torch.zeros(2, 4), torch.zeros(2, 1, 3, 3)
    out = tmp_path / "c.json"
    kvcal.create_quant_config(out, TwoInputs(), {"x": x, "image": image} if as_dict else (x, image))
    assert out.read_text().count('"quant_enable":true') == 2


def test_the_cfg_wins_and_the_arguments_only_warn(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    with pytest.warns(PtqWarning) as caught:
        kvcal.create_quant_config(
            out,
            pm.build(),
            pm.sample(),
            skip_layers=["conv"],
            batch_num=5,
            activation_offset=False,
            config_defination=PTQ_DATA / "hfmg.cfg",
        )
    assert out.read_bytes() == (PTQ_DATA / "hfmg.json").read_bytes()
    messages = [str(w.message) for w in caught]
    assert messages[0] == (
        "skip_layers, batch_num, activation_offset ignored: config_defination is given, "
        "and the .cfg sets skip_layers, batch_num and activation_offset"
    )
    assert caught[0].filename == __file__  # the warning points at the caller
    with pytest.warns(PtqWarning) as caught:  # defaults given: only the excluded modules are reported
        kvcal.create_quant_config(out, pm.build(), pm.sample(), config_defination=str(PTQ_DATA / "hfmg.cfg"))
    assert all("is not quantized" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"config_file": 3}, TypeError, "config_file must be a path"),
        ({"model": "m"}, TypeError, "model must be a torch.nn.Module"),
        ({"input_data": [torch.zeros(1)]}, TypeError, "input_data must be a tensor, a tuple"),
        ({"skip_layers": "conv"}, TypeError, "skip_layers must be a list of layer names"),
        ({"batch_num": 0}, ValueError, "batch_num must be an integer >= 1"),
        ({"activation_offset": 1}, TypeError, "activation_offset must be true or false"),
        ({"config_defination": 3}, TypeError, "config_defination must be the path of a .cfg file"),
        ({"skip_layers": ["nope"]}, ConfigError, "skip_layers: 'nope' does not exist in the model"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    arguments: dict[str, object] = {
        "config_file": str(tmp_path / "c.json"),
        "model": pm.build(),
        "input_data": pm.sample(),
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        kvcal.create_quant_config(**arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "c.json").exists()


def test_kv_cfg_is_refused_with_the_api_to_use(tmp_path: Path) -> None:
    cfg = ROOT / "configs" / "example.cfg"
    with pytest.raises(ConfigError, match=r"example\.cfg:\d+:\d+: .*not a PTQ one: .*create_quant_cali_config"):
        kvcal.create_quant_config(tmp_path / "c.json", pm.build(), pm.sample(), config_defination=cfg)


def test_errors_write_nothing_and_come_before_the_forward_pass(tmp_path: Path) -> None:
    class Refuses(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise AssertionError("the model must not run")

    out = tmp_path / "c.json"
    out.write_bytes(b"old")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("common_config { dmq_balancer { migration_strength: 0.9 } }\n")
    with pytest.raises(ConfigError, match=r"bad\.cfg:1:32: dmq_balancer: migration_strength"):
        kvcal.create_quant_config(out, Refuses(), torch.zeros(1), config_defination=cfg)
    with pytest.raises(ConfigError, match="is also the .cfg file of this run"):
        kvcal.create_quant_config(cfg, Refuses(), torch.zeros(1), config_defination=cfg)
    with pytest.raises(ConfigError, match="directory .* does not exist"):
        kvcal.create_quant_config(tmp_path / "no" / "c.json", Refuses(), torch.zeros(1))
    # Names are checked against named_modules() before the model runs.
    with pytest.raises(ConfigError, match="skip_layers: 'nope' does not exist in the model"):
        kvcal.create_quant_config(out, Refuses(), torch.zeros(1), skip_layers=["nope"])
    cfg.write_text("skip_fusion_layers: 'nope'\n")
    with pytest.raises(ConfigError, match=r"bad\.cfg:1:1: skip_fusion_layers: 'nope' does not exist"):
        kvcal.create_quant_config(out, Refuses(), torch.zeros(1), config_defination=cfg)
    assert out.read_bytes() == b"old"


def test_a_model_without_quantizable_layers(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1] = model[0]  # the same module twice: it runs twice
    with pytest.raises(ConfigError, match=r"no quantizable layer .*'0' \(Linear\): runs 2 times"):
        kvcal.create_quant_config(tmp_path / "c.json", model, torch.zeros(1, 2))
    assert not (tmp_path / "c.json").exists()
