"""kvcal.plan: every FORMATS.md §3 rule of `quant_algo_params`, the plan types, the model check."""

from __future__ import annotations

import math
from typing import Any

import pytest
from models import K_PROJ, V_PROJ, tiny_decoder

from kvcal.errors import ConfigError
from kvcal.kv.plan import CalibrationPlan, LayerPlan, check_layers_in_model
from kvcal.params import (
    HfmgParams,
    IfmrParams,
    QuantSettings,
    check_batch_num,
    settings_from_params,
)
from kvcal.quant import Granularity


def test_defaults() -> None:
    settings = settings_from_params(None)
    assert settings == QuantSettings(params=IfmrParams(), granularity=0, asymmetric=True, batch_num=1)
    assert settings.params == IfmrParams(0.999999, 0.999999, (0.7, 1.3), 0.01)
    assert settings_from_params({"act_algo": "hfmg"}).params == HfmgParams(4096)
    assert settings.algo == "ifmr" and settings.num_bits == 8


def test_all_keys_accepted() -> None:
    settings = settings_from_params(
        {
            "act_algo": "ifmr",
            "num_bits": 8,
            "with_offset": False,
            "batch_num": 3,
            "quant_granularity": "per_channel",
            "max_percentile": 1,  # ints are accepted where floats are
            "min_percentile": 0.9,
            "search_range": (1, 2),
            "search_step": 1,
        }
    )
    expected = QuantSettings(IfmrParams(1.0, 0.9, (1.0, 2.0), 1.0), granularity=1, asymmetric=False, batch_num=3)
    assert settings == expected
    assert isinstance(settings.params, IfmrParams) and type(settings.params.max_percentile) is float
    hfmg = settings_from_params({"act_algo": "hfmg", "num_of_bins": 1024, "quant_granularity": "1"})
    assert hfmg == QuantSettings(HfmgParams(1024), granularity=1, asymmetric=True)


@pytest.mark.parametrize(
    ("with_offset", "asymmetric", "expected"),
    [(None, None, True), (False, None, False), (True, False, False), (False, True, True)],
)
def test_asymmetric_wins_over_with_offset(with_offset: bool | None, asymmetric: bool | None, expected: bool) -> None:
    params: dict[str, Any] = {}
    if with_offset is not None:
        params["with_offset"] = with_offset
    if asymmetric is not None:
        params["asymmetric"] = asymmetric
    assert settings_from_params(params).asymmetric is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (1, 1), ("0", 0), ("1", 1), ("per_tensor", 0), ("per_channel", 1), (" per_channel ", 1)],
)
def test_granularity_forms(value: Any, expected: int) -> None:
    assert Granularity.parse(value) == expected
    assert settings_from_params({"quant_granularity": value}).granularity == expected


# Wrong type: TypeError naming the key.
@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"act_algo": 1}, "act_algo"),
        ({"num_bits": "8"}, "num_bits"),
        ({"num_bits": 8.0}, "num_bits"),
        ({"num_bits": True}, "num_bits"),
        ({"with_offset": 1}, "with_offset"),
        ({"asymmetric": "true"}, "asymmetric"),
        ({"batch_num": 1.0}, "batch_num"),
        ({"batch_num": True}, "batch_num"),
        ({"batch_num": "2"}, "batch_num"),
        ({"quant_granularity": 1.0}, "quant_granularity"),
        ({"quant_granularity": True}, "quant_granularity"),
        ({"quant_granularity": None}, "quant_granularity"),
        ({"max_percentile": "0.9"}, "max_percentile"),
        ({"max_percentile": True}, "max_percentile"),
        ({"min_percentile": None}, "min_percentile"),
        ({"search_range": "0.7,1.3"}, "search_range"),
        ({"search_range": [0.7]}, "search_range"),
        ({"search_range": [0.7, 1.3, 1.5]}, "search_range"),
        ({"search_range": {0.7, 1.3}}, "search_range"),
        ({"search_range": [0.7, "1.3"]}, "search_range end"),
        ({"search_range": [False, 1.3]}, "search_range start"),
        ({"search_step": "0.01"}, "search_step"),
        ({"act_algo": "hfmg", "num_of_bins": 4096.0}, "num_of_bins"),
        ({"act_algo": "hfmg", "num_of_bins": "4096"}, "num_of_bins"),
        ({"act_algo": "hfmg", "num_of_bins": True}, "num_of_bins"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_key(params: dict[str, Any], key: str) -> None:
    with pytest.raises(TypeError) as info:
        settings_from_params(params)
    assert key in str(info.value)
    # The message shows the bad value (for a search_range element: that element).
    name, _, part = key.partition(" ")
    bad = params[name]
    if part:
        bad = bad[0 if part == "start" else 1]
    assert repr(bad) in str(info.value)


# Bad value, unknown key, key of the other algorithm: ValueError naming the key and what is accepted.
@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"act_algo": "minmax"}, ["act_algo", "'ifmr' or 'hfmg'", "'minmax'"]),
        ({"num_bits": 4}, ["num_bits", "must be 8", "4"]),
        ({"num_bits": 16}, ["num_bits", "must be 8", "16"]),
        ({"batch_num": 0}, ["batch_num", ">= 1", "0"]),
        ({"batch_num": -3}, ["batch_num", ">= 1", "-3"]),
        ({"quant_granularity": 2}, ["quant_granularity", "0 or 1", "2"]),
        ({"quant_granularity": "2"}, ["quant_granularity", "'2'", "'per_channel'"]),
        ({"quant_granularity": "per_row"}, ["quant_granularity", "'per_row'", "'per_tensor'"]),
        ({"max_percentile": 0.5}, ["max_percentile", "(0.5, 1]", "0.5"]),
        ({"max_percentile": 1.0000001}, ["max_percentile", "(0.5, 1]", "1.0000001"]),
        ({"min_percentile": 0.2}, ["min_percentile", "(0.5, 1]", "0.2"]),
        ({"min_percentile": math.nan}, ["min_percentile", "finite"]),
        ({"search_range": [1.3, 0.7]}, ["search_range", "0 < start < end", "[1.3, 0.7]"]),
        ({"search_range": [0, 1]}, ["search_range", "0 < start < end"]),
        ({"search_range": [-1, 1]}, ["search_range", "0 < start < end"]),
        ({"search_range": [1, 1]}, ["search_range", "0 < start < end"]),
        ({"search_range": [0.7, math.inf]}, ["search_range end", "finite"]),
        ({"search_step": 0}, ["search_step", "(0, search_range end - start]", "got 0.0"]),
        ({"search_step": -0.1}, ["search_step", "(0, search_range end - start]"]),
        ({"search_step": 0.7}, ["search_step", "(0, search_range end - start]", "0.7"]),
        ({"act_algo": "hfmg", "num_of_bins": 1000}, ["num_of_bins", "[1024, 2048, 4096, 8192]", "1000"]),
        ({"act_algo": "hfmg", "num_of_bins": 0}, ["num_of_bins", "[1024, 2048, 4096, 8192]"]),
        ({"foo": 1}, ["unknown key 'foo'", "accepted keys for ifmr", "search_step"]),
        ({"act_algo": "hfmg", "bins": 1}, ["unknown key 'bins'", "accepted keys for hfmg", "num_of_bins"]),
        ({"num_of_bins": 4096}, ["num_of_bins", "parameter of hfmg", "'ifmr'"]),
        ({"act_algo": "hfmg", "search_step": 0.01}, ["search_step", "parameter of ifmr", "'hfmg'"]),
        ({"act_algo": "hfmg", "max_percentile": 0.9}, ["max_percentile", "parameter of ifmr"]),
    ],
)
def test_bad_values_raise_value_error_naming_the_key(params: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        settings_from_params(params)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_non_string_keys() -> None:
    with pytest.raises(TypeError, match="keys must be strings"):
        settings_from_params({1: 2})  # type: ignore[dict-item]


def test_check_batch_num() -> None:
    assert check_batch_num(5) == 5
    with pytest.raises(ValueError):
        check_batch_num(0)
    with pytest.raises(TypeError):
        check_batch_num(2.0)


def test_plan_resolves_settings_per_layer() -> None:
    plan = CalibrationPlan(
        batch_num=2,
        activation_offset=False,
        layers=(LayerPlan(K_PROJ, HfmgParams(2048), 1, None), LayerPlan(V_PROJ, IfmrParams(), 0, True)),
    )
    assert plan.layer_names == [K_PROJ, V_PROJ]
    assert plan.settings(plan.layers[0]) == QuantSettings(HfmgParams(2048), 1, asymmetric=False, batch_num=2)
    assert plan.settings(plan.layers[1]) == QuantSettings(IfmrParams(), 0, asymmetric=True, batch_num=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"layers": ()}, ValueError, "no layers to calibrate"),
        (
            {"layers": (LayerPlan("a", IfmrParams()), LayerPlan("a", HfmgParams()))},
            ValueError,
            "layer 'a' is configured twice",
        ),
        ({"batch_num": 0}, ValueError, "batch_num"),
        ({"activation_offset": "yes"}, TypeError, "activation_offset"),
    ],
)
def test_plan_rules(kwargs: dict[str, Any], error: type[Exception], fragment: str) -> None:
    arguments: dict[str, Any] = {"batch_num": 1, "activation_offset": True, "layers": (LayerPlan("a", IfmrParams()),)}
    arguments.update(kwargs)
    with pytest.raises(error, match=fragment):
        CalibrationPlan(**arguments)


def test_check_layers_in_model() -> None:
    model = tiny_decoder()
    check_layers_in_model([K_PROJ, V_PROJ, "lm_head"], model, "src")
    with pytest.raises(ConfigError) as info:
        check_layers_in_model(["model.layers.0.self_attn.v_prj"], model, "quant.cfg:3:5")
    message = str(info.value)
    assert message.startswith("quant.cfg:3:5: layer 'model.layers.0.self_attn.v_prj' does not exist in the model")
    assert f"did you mean '{V_PROJ}'" in message
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn' is a TinyAttention, not a torch.nn.Linear"):
        check_layers_in_model(["model.layers.0.self_attn"], model, "src")
    with pytest.raises(ConfigError, match="layer '' does not exist"):
        check_layers_in_model([""], model, "src")
    with pytest.raises(ConfigError) as info:
        check_layers_in_model(["zzzzzzzz"], model, "src")
    assert "did you mean" not in str(info.value)


def test_search_step_equal_to_the_range_is_compared_as_written() -> None:
    # 1.0 - 0.8 is 0.19999999999999996 in binary; as written in a config it is 0.2.
    params = IfmrParams(search_range=(0.8, 1.0), search_step=0.2)
    assert params.search_step == 0.2
    with pytest.raises(ValueError, match="search_step must be in"):
        IfmrParams(search_range=(0.8, 1.0), search_step=0.2000001)
