"""kvcal.simple_cfg: .cfg → plan (the plan's content, positions in messages, the layer-list path).

Every FORMATS.md §1 violation is also run through the CLI in test_cli_gen_config.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from models import K_PROJ, V_PROJ, tiny_decoder

from kvcal.errors import ConfigError
from kvcal.floats import f32_value as float32_value
from kvcal.kv.cfg import load_cfg, plan_from_layers
from kvcal.kv.plan import LayerPlan
from kvcal.params import HfmgParams, IfmrParams
from kvcal.quant import Granularity

DATA = Path(__file__).parent / "data" / "config"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "quant.cfg"
    path.write_text(text)
    return path


def test_formats_example_plan() -> None:
    plan = load_cfg(DATA / "formats_example.cfg", tiny_decoder())
    assert plan.batch_num == 2
    assert plan.activation_offset is True
    assert plan.layers == (
        LayerPlan(K_PROJ, HfmgParams(4096), granularity=0, asymmetric=None),
        LayerPlan(V_PROJ, IfmrParams(search_step=0.02), granularity=1, asymmetric=None),
    )
    assert type(plan.layers[1].granularity) is Granularity


def test_custom_plan_override_wins_and_override_only_layers_are_appended() -> None:
    plan = load_cfg(str(DATA / "custom.cfg"), tiny_decoder())
    assert (plan.batch_num, plan.activation_offset) == (4, False)
    assert plan.layer_names == [
        K_PROJ,
        V_PROJ,
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.self_attn.q_proj",
    ]
    custom = IfmrParams(max_percentile=0.9999, min_percentile=0.99, search_range=(0.6, 1.4), search_step=0.05)
    assert plan.layers[0] == LayerPlan(K_PROJ, custom, granularity=1, asymmetric=True)
    assert plan.layers[1] == LayerPlan(V_PROJ, HfmgParams(2048), granularity=0, asymmetric=False)
    assert plan.layers[3].params == IfmrParams() and plan.layers[3].asymmetric is None
    assert plan.layers[4].params == IfmrParams() and plan.layers[4].granularity == 0
    # Unset asymmetric follows activation_offset; a set one wins.
    assert plan.settings(plan.layers[3]).asymmetric is False
    assert plan.settings(plan.layers[0]).asymmetric is True
    assert plan.settings(plan.layers[0]).batch_num == 4


def test_float32_values_are_shortest_decimals(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"kv_cache_quant_config {{ quant_layers: '{K_PROJ}' calibration_config {{ ifmr_quantize {{"
        " max_percentile: 0.999999 min_percentile: 0.9999 search_step: 0.0123 } } }",
    )
    params = load_cfg(path, None).layers[0].params
    assert isinstance(params, IfmrParams)
    assert params.max_percentile == 0.999999  # not 0.9999989867210388
    assert params.min_percentile == 0.9999
    assert params.search_step == 0.0123
    assert float32_value(0.1) == 0.1
    assert float32_value(0.9999989867210388) == 0.999999


def test_empty_calibration_config_and_no_calibration_config_mean_ifmr_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f"kv_cache_quant_config {{ quant_layers: '{K_PROJ}' calibration_config {{ }} }}")
    assert load_cfg(path, None).layers[0] == LayerPlan(K_PROJ, IfmrParams(), 0, None)
    path = write(tmp_path, f"kv_cache_quant_config {{ quant_layers: '{K_PROJ}' }}")
    plan = load_cfg(path, None)
    assert plan.layers[0] == LayerPlan(K_PROJ, IfmrParams(), 0, None)
    assert (plan.batch_num, plan.activation_offset) == (1, True)


def test_list_syntax_angle_brackets_and_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\nkv_cache_quant_config <\n"
        f"  quant_layers: ['{K_PROJ}', \"{V_PROJ}\"]  # trailing comment\n"
        "  calibration_config < hfmg_quantize < num_of_bins: 1024; quant_granularity: 1 > >\n>\n",
    )
    plan = load_cfg(path, tiny_decoder())
    assert plan.layer_names == [K_PROJ, V_PROJ]
    assert plan.layers[1] == LayerPlan(V_PROJ, HfmgParams(1024), 1, None)


def test_model_none_skips_layer_checks(tmp_path: Path) -> None:
    path = write(tmp_path, "kv_cache_quant_config { quant_layers: 'anything' }")
    assert load_cfg(path, None).layer_names == ["anything"]


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        # The locator points at the field at fault, also inside list syntax and after comments.
        ("# c\nbatch_num: 0\n", "2:1", "batch_num must be an integer >= 1, got 0"),
        (
            f"kv_cache_quant_config {{\n  quant_layers: ['{K_PROJ}', '{K_PROJ}']\n}}",
            "2:53",
            "listed twice in kv_cache_quant_config.quant_layers (first at line 2)",
        ),
        (
            f"kv_cache_quant_config {{ quant_layers: '{K_PROJ}'\n  calibration_config {{ ifmr_quantize {{\n"
            "    search_range_start: 0.9\n    search_range_end: 0.8 } } }",
            "3:5",
            "search_range must satisfy 0 < start < end",
        ),
        (
            f"kv_cache_quant_config {{ quant_layers: '{K_PROJ}'\n  calibration_config {{ ifmr_quantize {{\n"
            "    search_range_end: 0.705 } } }",
            "2:24",  # the default search_step is at fault: no field to point at, so its block
            "search_step must be in (0, search_range end - start]",
        ),
        (
            f"override_layers_configs {{ layer_name: '{K_PROJ}' }}\n"
            f"override_layers_configs {{\n  layer_name: '{K_PROJ}' }}",
            "3:3",
            f"layer '{K_PROJ}' is overridden twice in override_layers_configs (first at line 1)",
        ),
    ],
)
def test_error_positions(tmp_path: Path, text: str, position: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_cfg(path, tiny_decoder())
    assert str(info.value).startswith(f"{path}:{position}: ")
    assert fragment in str(info.value)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*missing.cfg"):
        load_cfg(tmp_path / "missing.cfg", None)
    path = tmp_path / "latin1.cfg"
    path.write_bytes(b"batch_num: 1 # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_cfg(path, None)


def test_plan_from_layers() -> None:
    plan = plan_from_layers([V_PROJ, K_PROJ], tiny_decoder())
    assert plan.layers == (LayerPlan(V_PROJ, IfmrParams()), LayerPlan(K_PROJ, IfmrParams()))
    assert (plan.batch_num, plan.activation_offset) == (1, True)
    plan = plan_from_layers((K_PROJ,), None, batch_num=3, activation_offset=False)
    assert (plan.batch_num, plan.activation_offset) == (3, False)


@pytest.mark.parametrize(
    ("names", "error", "fragment"),
    [
        ([], ConfigError, "no layers to calibrate"),
        ([K_PROJ, K_PROJ], ConfigError, f"layer '{K_PROJ}' is listed twice"),
        ([""], ConfigError, "empty layer name"),
        (["model.layers.0.self_attn.kproj"], ConfigError, f"did you mean '{K_PROJ}'"),
        (["model.layers.0.input_layernorm"], ConfigError, "is a LayerNorm, not a torch.nn.Linear"),
        ([3], TypeError, "layer names must be str, got 3"),
    ],
)
def test_plan_from_layers_errors(names: list[object], error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        plan_from_layers(names, tiny_decoder())  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_plan_from_layers_rejects_a_single_string() -> None:
    with pytest.raises(TypeError, match="single string"):
        plan_from_layers(K_PROJ, None)


def test_plan_from_layers_bad_batch_num() -> None:
    with pytest.raises(ConfigError, match="batch_num must be an integer >= 1, got 0"):
        plan_from_layers([K_PROJ], None, batch_num=0)
