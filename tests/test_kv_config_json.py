"""kvcal.config_json: exact JSON layout, atomic writes, strict read-back."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from models import K_PROJ, V_PROJ, tiny_decoder

from kvcal.errors import ConfigError
from kvcal.kv.cfg import load_cfg, plan_from_layers
from kvcal.kv.config_json import plan_to_json, read_config, write_config
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.params import HfmgParams, IfmrParams

DATA = Path(__file__).parent / "data" / "config"


@pytest.mark.parametrize("name", ["formats_example", "custom"])
def test_cfg_to_json_matches_the_hand_written_file(name: str) -> None:
    plan = load_cfg(DATA / f"{name}.cfg", tiny_decoder())
    assert plan_to_json(plan) == (DATA / f"{name}.json").read_text()


def test_layer_list_to_json_matches_the_hand_written_file() -> None:
    plan = plan_from_layers(["model.layers.1.self_attn.v_proj", K_PROJ], tiny_decoder())
    assert plan_to_json(plan) == (DATA / "quant_layers.json").read_text()


def test_layout_details() -> None:
    plan = CalibrationPlan(
        batch_num=3,
        activation_offset=False,
        layers=(
            LayerPlan("b", IfmrParams(max_percentile=1, search_range=(0.5, 2), search_step=0.1), 1, True),
            LayerPlan("a", HfmgParams(8192), 0, None),
        ),
    )
    text = plan_to_json(plan)
    assert not text.endswith("\n")
    assert '"max_percentile":1.0,' in text
    assert '"search_range":[\n                0.5,\n                2.0\n            ],' in text
    assert text.index('"b"') < text.index('"a"')  # plan order, not sorted
    entry = json.loads(text)["a"]["kv_data_quant_config"]
    assert list(entry) == ["act_algo", "num_of_bins", "quant_granularity"]
    entry = json.loads(text)["b"]["kv_data_quant_config"]
    assert list(entry) == [
        "act_algo",
        "max_percentile",
        "min_percentile",
        "search_range",
        "search_step",
        "asymmetric",
        "quant_granularity",
    ]


def test_floats_are_written_as_shortest_float32() -> None:
    plan = CalibrationPlan(1, True, (LayerPlan("x", IfmrParams(max_percentile=0.9999989867210388)),))
    assert '"max_percentile":0.999999,' in plan_to_json(plan)


def test_layer_named_like_a_global_key_is_refused() -> None:
    plan = CalibrationPlan(1, True, (LayerPlan("batch_num", IfmrParams()),))
    with pytest.raises(ConfigError, match="collides"):
        plan_to_json(plan)


@pytest.mark.parametrize("name", ["formats_example", "custom", "quant_layers"])
def test_read_back_round_trip(tmp_path: Path, name: str) -> None:
    expected = (DATA / f"{name}.json").read_text()
    plan = read_config(DATA / f"{name}.json", tiny_decoder())
    assert plan_to_json(plan) == expected
    if name != "quant_layers":
        assert plan == load_cfg(DATA / f"{name}.cfg", None)
    out = tmp_path / "again.json"
    write_config(plan, out)
    assert out.read_text() == expected


def test_read_fills_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    layers = {K_PROJ: {"kv_data_quant_config": {}}, V_PROJ: {"kv_data_quant_config": {"act_algo": "hfmg"}}}
    path.write_text(json.dumps(layers))
    plan = read_config(path)
    assert (plan.batch_num, plan.activation_offset) == (1, True)
    assert plan.layers == (LayerPlan(K_PROJ, IfmrParams(), 0, None), LayerPlan(V_PROJ, HfmgParams(), 0, None))


def test_write_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    out.write_text("x" * 10000)
    os.chmod(out, 0o640)
    plan = plan_from_layers([K_PROJ], None)
    write_config(plan, out)
    assert out.read_text() == plan_to_json(plan)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_new_file_gets_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_config(plan_from_layers([K_PROJ], None), tmp_path / "new.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "config.json"
    out.write_bytes(b"old contents")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError, match="cannot write config .*config.json: No space left on device"):
        write_config(plan_from_layers([K_PROJ], None), out)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_write_into_a_missing_directory_or_onto_a_directory(tmp_path: Path) -> None:
    plan = plan_from_layers([K_PROJ], None)
    with pytest.raises(ConfigError, match="cannot write config"):
        write_config(plan, tmp_path / "no" / "such" / "config.json")
    with pytest.raises(ConfigError, match="it is a directory"):
        write_config(plan, tmp_path)


# --- read validation errors: each names the file and the key or layer ---

GOOD_IFMR = {
    "act_algo": "ifmr",
    "max_percentile": 0.999999,
    "min_percentile": 0.999999,
    "search_range": [0.7, 1.3],
    "search_step": 0.01,
    "quant_granularity": 0,
}


def _doc(**layer_config: Any) -> dict[str, Any]:
    config = dict(GOOD_IFMR)
    for key, value in layer_config.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    return {"batch_num": 1, "activation_offset": True, K_PROJ: {"kv_data_quant_config": config}}


_DELETE = object()


def _hfmg(**extra: Any) -> dict[str, Any]:
    return {"batch_num": 1, K_PROJ: {"kv_data_quant_config": {"act_algo": "hfmg", "num_of_bins": 4096, **extra}}}


@pytest.mark.parametrize(
    ("document", "fragments"),
    [
        ([1, 2], ["the config must be a JSON object, got list"]),
        ({"batch_num": 1}, ["no layers to calibrate"]),
        ({**_doc(), "batch_num": "2"}, ["batch_num must be an integer >= 1, got '2'"]),
        ({**_doc(), "batch_num": True}, ["batch_num must be an integer >= 1, got True"]),
        ({**_doc(), "batch_num": 1.0}, ["batch_num must be an integer >= 1, got 1.0"]),
        ({**_doc(), "batch_num": 0}, ["batch_num must be an integer >= 1, got 0"]),
        ({**_doc(), "activation_offset": 1}, ["key 'activation_offset' must be true or false, got 1"]),
        ({K_PROJ: []}, [f"layer '{K_PROJ}'", "must be an object"]),
        ({"": {"kv_data_quant_config": {}}}, ["empty layer name"]),
        ({K_PROJ: {"kv_data_quant_config": {}, "extra": 1}}, [f"layer '{K_PROJ}'", "unknown key 'extra'"]),
        ({K_PROJ: {}}, [f"layer '{K_PROJ}'", "the entry must have the key 'kv_data_quant_config'"]),
        ({K_PROJ: {"kv_data_quant_config": 3}}, [f"layer '{K_PROJ}'", "kv_data_quant_config must be an object"]),
        (_doc(act_algo="minmax"), ["act_algo must be 'ifmr' or 'hfmg', got 'minmax'"]),
        (_doc(act_algo=1), ["act_algo must be a str, 'ifmr' or 'hfmg', got 1"]),
        (_doc(search_rnge=[0.7, 1.3]), [f"layer '{K_PROJ}'", "unknown key 'search_rnge'"]),
        (_doc(num_of_bins=4096), ["num_of_bins is a parameter of hfmg, not of act_algo 'ifmr'"]),
        (_hfmg(search_step=0.01), ["search_step is a parameter of ifmr, not of act_algo 'hfmg'"]),
        (_doc(max_percentile="0.9"), ["max_percentile must be a number, got '0.9'"]),
        (_doc(max_percentile=True), ["max_percentile must be a number, got True"]),
        (_doc(max_percentile=0.5), ["max_percentile must be in (0.5, 1], got 0.5"]),
        (_doc(min_percentile=1.01), ["min_percentile must be in (0.5, 1], got 1.01"]),
        (_doc(search_range=0.7), ["search_range must be a list of two numbers"]),
        (_doc(search_range=[0.7]), ["search_range must be a list of two numbers"]),
        (_doc(search_range=[0.7, "1.3"]), ["search_range end must be a number"]),
        (_doc(search_range=[1.3, 0.7]), ["search_range must satisfy 0 < start < end, got [1.3, 0.7]"]),
        (_doc(search_range=[0, 1]), ["search_range must satisfy 0 < start < end"]),
        (_doc(search_step=0), ["search_step must be in (0, search_range end - start]"]),
        (_doc(search_step=0.7), ["search_step must be in (0, search_range end - start]"]),
        (_doc(search_step=10**400), ["search_step must be a finite number, got an integer of 401 digits"]),
        (_hfmg(num_of_bins=1000), ["num_of_bins must be one of [1024, 2048, 4096, 8192], got 1000"]),
        (_hfmg(num_of_bins=4096.0), ["num_of_bins must be an integer"]),
        (_doc(quant_granularity="1"), ["quant_granularity must be the integer 0 or 1, got '1'"]),
        (_doc(quant_granularity=True), ["quant_granularity must be the integer 0 or 1, got True"]),
        (_doc(quant_granularity=2), ["quant_granularity must be 0 or 1, got 2"]),
        (_doc(asymmetric="yes"), ["asymmetric must be true or false, got 'yes'"]),
        (_hfmg(asymmetric=None), ["asymmetric must be true or false, got None"]),
    ],
)
def test_read_validation_errors(tmp_path: Path, document: Any, fragments: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document, indent=4))
    with pytest.raises(ConfigError) as info:
        read_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{\n    "batch_num":1,\n    "x":{\n}', "bad.json:4:2: invalid JSON: Expecting"),
        ('{"batch_num":1,}', "bad.json:1:16: invalid JSON: Expecting property name"),
        ("", "bad.json:1:1: invalid JSON: Expecting value"),
        ('{"batch_num":1, "batch_num":2}', "duplicated key 'batch_num'"),
        (
            f'{{"{K_PROJ}":{{"kv_data_quant_config":{{"act_algo":"hfmg","act_algo":"ifmr"}}}}}}',
            "duplicated key 'act_algo'",
        ),
        (f'{{"{K_PROJ}":{{}}, "{K_PROJ}":{{}}}}', f"duplicated key '{K_PROJ}'"),
        (f'{{"{K_PROJ}":{{"kv_data_quant_config":{{"search_step":NaN}}}}}}', "NaN is not a valid JSON number"),
        (f'{{"{K_PROJ}":{{"kv_data_quant_config":{{"search_step":Infinity}}}}}}', "Infinity is not a valid"),
    ],
)
def test_read_syntax_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_read_layers_must_be_linear_layers_of_the_model(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model.layers.0.self_attn.kproj": {"kv_data_quant_config": {}}}))
    with pytest.raises(ConfigError) as info:
        read_config(path, tiny_decoder())
    assert str(info.value).startswith(f"{path}: layer 'model.layers.0.self_attn.kproj' does not exist in the model")
    assert f"did you mean '{K_PROJ}'" in str(info.value)
    path.write_text(json.dumps({"model.norm": {"kv_data_quant_config": {}}}))
    with pytest.raises(ConfigError, match="'model.norm' is a LayerNorm, not a torch.nn.Linear"):
        read_config(path, tiny_decoder())
    # Without a model there is nothing to check against.
    assert read_config(path).layer_names == ["model.norm"]


def test_read_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*nope.json"):
        read_config(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config(path)
