"""The PTQ rules in one place (kvcal.ptq.plan) and the .cfg schema (kvcal.ptq.cfg, the proto)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvcal.errors import ConfigError
from kvcal.params import HfmgParams, IfmrParams
from kvcal.ptq.cfg import check_not_ptq_cfg, load_ptq_cfg
from kvcal.ptq.plan import (
    AdaParams,
    ArqChoice,
    ArqParams,
    CalibrationChoice,
    LayerSettings,
    Note,
    PtqPlan,
    resolve_layer,
)

ROOT = Path(__file__).resolve().parent.parent
IFMR, HFMG = IfmrParams(), HfmgParams()


def resolve(
    layer_type: str = "Linear",
    chosen: CalibrationChoice | None = None,
    common: CalibrationChoice | None = None,
    offset: bool = True,
) -> tuple[LayerSettings, list[Note]]:
    notes: list[Note] = []
    layer = resolve_layer(
        "x",
        layer_type,
        quant_enable=True,
        chosen=chosen,
        common=common,  # type: ignore[arg-type]
        activation_offset=offset,
        notes=notes,
    )
    return layer, notes


@pytest.mark.parametrize(
    ("layer_type", "chosen", "common", "offset", "expected"),
    [
        ("Conv3d", CalibrationChoice(asymmetric=True), None, True, False),  # Conv3d: always symmetric
        ("Linear", CalibrationChoice(act=IFMR, asymmetric=False), None, True, False),  # the chosen config's own
        ("Linear", CalibrationChoice(act=IFMR), CalibrationChoice(act=IFMR, asymmetric=False), True, False),
        ("Linear", CalibrationChoice(act=IFMR), CalibrationChoice(act=HFMG, asymmetric=False), True, True),
        ("Linear", CalibrationChoice(), CalibrationChoice(act=IFMR, asymmetric=False), True, False),  # default IFMR
        ("Linear", CalibrationChoice(act=HFMG), CalibrationChoice(asymmetric=None), False, False),
        ("Linear", None, None, False, False),
    ],
)
def test_asymmetric_precedence(
    layer_type: str, chosen: CalibrationChoice | None, common: CalibrationChoice | None, offset: bool, expected: bool
) -> None:
    assert resolve(layer_type, chosen, common, offset)[0].asymmetric is expected


def test_the_chosen_config_is_not_merged_with_common_config() -> None:
    common = CalibrationChoice(act=HFMG, weight=ArqChoice(quant_bits=7), dmq=0.5)
    layer, _ = resolve("Conv2d", CalibrationChoice(asymmetric=False), common)
    assert (layer.act, layer.weight, layer.dmq) == (IFMR, ArqParams(8, True), None)


@pytest.mark.parametrize(
    ("layer_type", "channel_wise"),
    [("Conv2d", True), ("Conv3d", True), ("ConvTranspose2d", True), ("Linear", False), ("AvgPool2d", False)],
)
def test_channel_wise_defaults_per_type(layer_type: str, channel_wise: bool) -> None:
    assert resolve(layer_type)[0].weight == ArqParams(8, channel_wise)
    ada, _ = resolve(
        layer_type if layer_type not in ("Conv3d", "AvgPool2d") else "Linear", CalibrationChoice(weight=AdaParams())
    )
    assert isinstance(ada.weight, AdaParams) and ada.weight.channel_wise is (
        layer_type in ("Conv2d", "ConvTranspose2d")
    )


def test_what_is_dropped_or_adjusted_is_noted() -> None:
    common = CalibrationChoice(weight=ArqChoice(quant_bits=6), dmq=0.5)
    layer, notes = resolve("AvgPool2d", common, common)
    assert (layer.weight, layer.dmq) == (ArqParams(8, False), None)
    assert [note.level for note in notes] == ["warning", "info"]
    layer, notes = resolve("Conv3d", CalibrationChoice(weight=AdaParams()))
    assert layer.weight is None and notes[0].level == "info"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_type": "Conv3d", "asymmetric": True}, "asymmetric must be false on Conv3d"),
        ({"layer_type": "AvgPool2d", "dmq": 0.5}, "dmq_balancer_param is not supported on AvgPool2d"),
        ({"layer_type": "Linear", "weight": ArqParams(7, False)}, "weight num_bits 7 is supported only on Conv2d"),
        ({"layer_type": "Linear", "weight": ArqParams(8, True)}, "channel_wise must be false on Linear"),
        ({"layer_type": "Conv3d", "weight": AdaParams(channel_wise=True)}, "ada_quantize is supported only on"),
        ({"layer_type": "Linear", "weight": AdaParams()}, "must say channel_wise true or false"),
        ({"layer_type": "Conv1d"}, "layer type 'Conv1d' is not quantizable"),
        ({"layer_type": "Linear", "dmq": 0.1}, r"migration_strength must be in \[0.2, 0.8\]"),
    ],
)
def test_layer_settings_invariants(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "name": "x",
        "layer_type": "Linear",
        "quant_enable": True,
        "act": IFMR,
        "asymmetric": False,
        "weight": None,
    }
    values.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LayerSettings(**values)  # type: ignore[arg-type]


def test_plan_invariants() -> None:
    layer = LayerSettings("b", "Linear", True, IFMR, True, ArqParams())
    plan = PtqPlan(
        batch_num=1, activation_offset=True, layers=(layer, LayerSettings("a", "Linear", False, IFMR, True, None))
    )
    assert plan.layer_names == ["a", "b"] and plan.enabled_layers == (layer,)
    with pytest.raises(ValueError, match="global key"):
        PtqPlan(
            batch_num=1, activation_offset=True, layers=(LayerSettings("version", "Linear", True, IFMR, True, None),)
        )
    with pytest.raises(ValueError, match="configured twice"):
        PtqPlan(batch_num=1, activation_offset=True, layers=(layer, layer))
    with pytest.raises(ValueError, match="no layer left to quantize"):
        PtqPlan(batch_num=1, activation_offset=True, layers=())


def test_both_amct_pytorch_proto_modules_load_in_one_process() -> None:
    code = (
        "from kvcal.proto import scale_offset_record_pb2 as r, calibration_config_pytorch_pb2 as c, "
        "quant_cali_config_pb2 as k; "
        "assert r.DESCRIPTOR.package == c.DESCRIPTOR.package == 'AMCTPytorchProto'; "
        "print(sorted(set(r.DESCRIPTOR.message_types_by_name) & set(c.DESCRIPTOR.message_types_by_name)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cfg_defaults_and_globals(tmp_path: Path) -> None:
    cfg = tmp_path / "q.cfg"
    cfg.write_text("# nothing set\n")
    parsed = load_ptq_cfg(cfg)
    assert (parsed.batch_num, parsed.activation_offset, parsed.do_fusion, parsed.fakequant_precision_mode) == (
        1,
        True,
        True,
        None,
    )
    assert parsed.common is None and parsed.type_overrides == {} and parsed.layer_overrides == {}
    cfg.write_text("fakequant_precision_mode: FORCE_FP16_QUANT\ncommon_config { ada_quantize { reg_param: 0.3 } }\n")
    parsed = load_ptq_cfg(cfg)
    assert parsed.fakequant_precision_mode == "FORCE_FP16_QUANT"
    assert parsed.common == CalibrationChoice(weight=AdaParams(reg_param=0.3))


def test_check_not_ptq_cfg_is_silent_unless_only_the_ptq_schema_parses(tmp_path: Path) -> None:
    check_not_ptq_cfg(ROOT / "configs" / "example.cfg")  # a KV .cfg
    check_not_ptq_cfg(tmp_path / "missing.cfg")  # the KV path reports it
    garbage = tmp_path / "g.cfg"
    garbage.write_text("{{{")
    check_not_ptq_cfg(garbage)
    with pytest.raises(ConfigError, match="this is a PTQ .cfg"):
        check_not_ptq_cfg(ROOT / "configs" / "ptq_example.cfg")
