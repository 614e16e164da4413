"""The PTQ JSON config (kvcal.ptq.config_json): byte for byte against hand-written files,
written by `kvcal.create_quant_config`, and read back with full validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from ptq_helpers import (
    PTQ_DATA,
    one_torch_thread,  # noqa: F401
    ptq_models,
)

import kvcal
from kvcal.errors import ConfigError
from kvcal.ptq.config_json import is_ptq_config, plan_to_json, read_config
from kvcal.ptq.layers import discover_layers
from kvcal.ptq.plan import PtqWarning

pm = ptq_models()


# Every run of the test model warns once per excluded module.
EXCLUDED_WARNINGS = len(pm.EXCLUDED)


def create(tmp_path: Path, **kwargs: Any) -> tuple[bytes, list[str]]:
    out = tmp_path / "config.json"
    with pytest.warns(PtqWarning) as caught:
        kvcal.create_quant_config(str(out), pm.build(), pm.sample(), **kwargs)
    return out.read_bytes(), [str(w.message) for w in caught]


def expected(name: str) -> bytes:
    return (PTQ_DATA / f"{name}.json").read_bytes()


def test_defaults_without_a_cfg(tmp_path: Path) -> None:
    data, messages = create(tmp_path, skip_layers=["layer2"], batch_num=3, activation_offset=False)
    assert data == expected("defaults")
    assert len(messages) == EXCLUDED_WARNINGS
    assert "layer 'reused' (Linear) is not quantized: runs 2 times in one forward pass (a reused module)" in messages


@pytest.mark.parametrize("name", ["ifmr", "hfmg", "ada", "bits7", "nonquant_override"])
def test_cfg_outputs_match_the_hand_written_files(tmp_path: Path, name: str) -> None:
    data, _ = create(tmp_path, config_defination=str(PTQ_DATA / f"{name}.cfg"))
    assert data == expected(name)
    assert not data.endswith(b"\n")


def test_dmq_on_avgpool_from_common_config_is_dropped_with_a_warning(tmp_path: Path) -> None:
    _, messages = create(tmp_path, config_defination=str(PTQ_DATA / "ifmr.cfg"))
    assert messages[EXCLUDED_WARNINGS:] == ["layer 'pool' (AvgPool2d): dmq_balancer is not supported there; dropped"]


def test_override_of_a_module_that_is_not_quantizable_is_ignored_with_a_warning(tmp_path: Path) -> None:
    _, messages = create(tmp_path, config_defination=str(PTQ_DATA / "nonquant_override.cfg"))
    assert messages[EXCLUDED_WARNINGS:] == [
        (
            f"{PTQ_DATA / 'nonquant_override.cfg'}:4:5: override_layer_configs: layer 'reused' is a Linear that is "
            "not quantizable: runs 2 times in one forward pass (a reused module); its override is ignored"
        )
    ]


def test_low_bits_and_ada_from_common_config_are_info_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kvcal.ptq.api"):
        create(tmp_path, config_defination=str(PTQ_DATA / "bits7.cfg"))
    assert "layer 'layer2' (Linear): quant_bits 7 applies only to Conv2d; 8 bits" in caplog.messages
    assert len(caplog.messages) == 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvcal.ptq.api"):
        create(tmp_path, config_defination=str(PTQ_DATA / "ada.cfg"))
    assert caplog.messages == [
        "layer 'pool' (AvgPool2d): ada_quantize does not apply; no weight parameters",
        "layer 'conv3d' (Conv3d): ada_quantize does not apply; no weight parameters",
    ]


@pytest.mark.parametrize("name", ["defaults", "ifmr", "hfmg", "ada", "bits7", "nonquant_override"])
def test_read_back_gives_the_same_plan_and_bytes(name: str) -> None:
    discovery = discover_layers(pm.build(), pm.sample())
    plan = read_config(PTQ_DATA / f"{name}.json", discovery)
    assert plan_to_json(plan).encode() == expected(name)
    assert plan.layer_names == sorted(pm.QUANTIZABLE)
    assert is_ptq_config(json.loads(expected(name)))


def test_missing_keys_take_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "activation_offset": False,
                "conv3d": {"quant_enable": True},
                "layer2": {"quant_enable": True, "activation_quant_params": {"num_of_bins": 1024}},
                "conv": {"quant_enable": False, "weight_quant_params": {}},
            }
        )
    )
    plan = read_config(path, discover_layers(pm.build(), pm.sample()))
    layers = {layer.name: layer for layer in plan.layers}
    assert plan.batch_num == 1 and plan.do_fusion is True and plan.skip_fusion_layers == ()
    assert layers["conv3d"].asymmetric is False and layers["conv3d"].weight is None
    assert layers["layer2"].act.algo == "hfmg" and layers["layer2"].asymmetric is False
    assert layers["conv"].weight is not None and layers["conv"].weight.channel_wise is True


def _layer(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(expected("defaults"))["conv"]
    entry.update(changes)
    return entry


def _document(**layers: Any) -> dict[str, Any]:
    document = json.loads(expected("defaults"))
    document.update(layers)
    return document


READ_ERRORS = [
    (_document(version=2), "key 'version' must be 1"),
    (_document(batch_num=0), "batch_num must be an integer >= 1"),
    (_document(activation_offset="yes"), "key 'activation_offset': value must be true or false"),
    (_document(fakequant_precision_mode="FP16"), "fakequant_precision_mode' must be 'FORCE_FP16_QUANT'"),
    (_document(skip_fusion_layers=["pool"]), "layer 'pool' is an AvgPool2d; only Conv1d, Conv2d, Conv3d"),
    (_document(skip_fusion_layers=["convv"]), "'convv' does not exist in the model; did you mean 'conv'"),
    (_document(reused=_layer()), "layer 'reused' is a Linear that is not quantizable: runs 2 times"),
    (_document(nothere=_layer()), "layer 'nothere' does not exist in the model"),
    (_document(conv=_layer(extra=1)), "layer 'conv': unknown key 'extra'"),
    (_document(conv={"activation_quant_params": {}}), "layer 'conv': quant_enable (true or false) is missing"),
    (_document(conv=_layer(quant_enable=1)), "quant_enable must be true or false"),
    (
        _document(conv=_layer(activation_quant_params={"num_of_bins": 1024, "search_step": 0.1})),
        "search_step is a parameter of ifmr, not of act_algo 'hfmg'",
    ),
    (_document(conv=_layer(activation_quant_params={"num_bits": 16})), "num_bits must be 8"),
    (_document(conv=_layer(activation_quant_params={"search_step": 0.9})), "search_step must be in (0,"),
    (
        _document(conv=_layer(weight_quant_params={"reg_param": 0.1})),
        "reg_param is a parameter of ada_quantize, not of wts_algo 'arq_quantize'",
    ),
    (
        _document(conv=_layer(weight_quant_params={"wts_algo": "ada_quantize", "beta_range": [1.0, 2.0]})),
        "beta_range must satisfy beta_range_start > beta_range_end > 0",
    ),
    (_document(conv=_layer(weight_quant_params={"num_bits": 4})), "num_bits must be 6, 7 or 8"),
    (_document(layer2=_layer(weight_quant_params={"num_bits": 7})), "weight num_bits 7 is supported only on Conv2d"),
    (_document(layer2=_layer(weight_quant_params={"channel_wise": True})), "channel_wise must be false on Linear"),
    (_document(conv3d=_layer(activation_quant_params={"asymmetric": True})), "asymmetric must be false on Conv3d"),
    (_document(pool=_layer(dmq_balancer_param=0.5)), "dmq_balancer_param is not supported on AvgPool2d"),
    (_document(conv=_layer(dmq_balancer_param=0.9)), "migration_strength must be in [0.2, 0.8]"),
    (
        _document(conv3d=_layer(weight_quant_params={"wts_algo": "ada_quantize"})),
        "ada_quantize is supported only on Conv2d, ConvTranspose2d, Linear",
    ),
    ({k: v for k, v in _document().items() if k in ("version", "layer2")}, "no layer left to quantize"),
    ([1], "the config must be a JSON object"),
]


@pytest.mark.parametrize(("document", "message"), READ_ERRORS, ids=[m for _, m in READ_ERRORS])
def test_read_errors_name_the_file_and_the_key(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as caught:
        read_config(path, discover_layers(pm.build(), pm.sample()))
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"version": 1, "version": 1}', "duplicated key 'version'"),
        ('{"version": NaN}', "NaN is not a valid"),
        ('{"version": 1,', "invalid JSON"),
    ],
)
def test_malformed_json(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config(path, discover_layers(pm.build(), pm.sample()))
