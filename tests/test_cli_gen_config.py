"""`kvcal gen-config` and `create_quant_cali_config`: outputs, usage, and every FORMATS.md §1 rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from models import K_PROJ, V_PROJ, tiny_decoder

import kvcal
from kvcal.cli import main
from kvcal.errors import ConfigError
from kvcal.kv.config_json import read_config

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "config"
TINY = "models:tiny_decoder"
DEMO = str(ROOT / "scripts" / "demo_model.py") + ":build"
OLD = b'{"previous": "config"}\n'


def run(*args: str) -> Result:
    # A wide console so that table rows are not folded.
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["gen-config", *args])


# --- successful runs: byte-for-byte outputs ---


@pytest.mark.parametrize("name", ["formats_example", "custom"])
def test_cfg_output_matches_the_hand_written_file(tmp_path: Path, name: str) -> None:
    out = tmp_path / "config.json"
    result = run("--model", TINY, "--cfg", str(DATA / f"{name}.cfg"), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (DATA / f"{name}.json").read_bytes()
    assert result.stdout == ""
    assert f"wrote {out}" in result.stderr
    assert K_PROJ in result.stderr and V_PROJ in result.stderr


def test_table_shows_the_settings(tmp_path: Path) -> None:
    result = run("--model", TINY, "--cfg", str(DATA / "custom.cfg"), "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    assert "5 layer(s), batch_num 4, activation_offset false" in result.stderr
    assert "num_of_bins 2048" in result.stderr
    assert "percentiles 0.9999/0.99, search [0.6, 1.4) step 0.05" in result.stderr
    assert "per_channel" in result.stderr and "no (global)" in result.stderr


def test_quant_layers_output_matches_the_hand_written_file(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = run("--model", TINY, "--quant-layers", f"model.layers.1.self_attn.v_proj, {K_PROJ}", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (DATA / "quant_layers.json").read_bytes()
    # Repeating the option is the same as one comma-separated list.
    again = tmp_path / "again.json"
    result = run("--model", TINY, "--quant-layers", "model.layers.1.self_attn.v_proj", "--quant-layers", K_PROJ,
                 "-o", str(again))
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == out.read_bytes()


def test_existing_output_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    out.write_bytes(b"x" * 100000)
    result = run("--model", TINY, "--cfg", str(DATA / "formats_example.cfg"), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (DATA / "formats_example.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_model_args_and_checkpoint_reach_the_model(tmp_path: Path) -> None:
    import torch

    # A 1-layer model has no model.layers.1: the same layer list then fails, naming it.
    result = run("--model", TINY, "--model-arg", "num_layers=1", "--quant-layers", "model.layers.1.self_attn.k_proj",
                 "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 1
    assert "layer 'model.layers.1.self_attn.k_proj' does not exist in the model" in result.stderr
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_decoder(num_layers=1).state_dict(), ckpt)
    result = run("--model", TINY, "--model-arg", "num_layers=1", "--checkpoint", str(ckpt), "--quant-layers", K_PROJ,
                 "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    result = run("--model", TINY, "--checkpoint", str(ckpt), "--quant-layers", K_PROJ, "-o", str(tmp_path / "d.json"))
    assert result.exit_code == 1
    assert "does not match the model from 'models:tiny_decoder'" in result.stderr
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize(
    "cfg", sorted(p for p in (ROOT / "configs").glob("*.cfg") if not p.name.startswith("ptq_")), ids=lambda p: p.name
)
def test_sample_configs_run_against_the_demo_model(tmp_path: Path, cfg: Path) -> None:
    from kvcal.kv.cfg import load_cfg
    from kvcal.model_loader import load_model

    out = tmp_path / "config.json"
    result = run("--model", DEMO, "--cfg", str(cfg), "-o", str(out))
    assert result.exit_code == 0, result.output
    demo = load_model(DEMO)
    plan = read_config(out, demo)
    assert plan == load_cfg(cfg, demo)
    assert all(".self_attn.k_proj" in n or ".self_attn.v_proj" in n for n in plan.layer_names)


def test_sample_configs_exist() -> None:
    names = {p.name for p in (ROOT / "configs").glob("*.cfg")}
    assert {"example.cfg", "hfmg_per_channel.cfg", "ifmr_custom.cfg"} <= names


def test_python_dash_m_kvcal_with_a_relative_file_entry(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = subprocess.run(
        [sys.executable, "-m", "kvcal", "gen-config", "--model", "scripts/demo_model.py:build",
         "--cfg", "configs/example.cfg", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert read_config(out).batch_num == 2


# --- usage ---


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(main, ["gen-config", "--help"])
    assert result.exit_code == 0
    assert "kvcal gen-config --model scripts/demo_model.py:build --cfg configs/example.cfg" in result.output
    for option in ("--cfg", "--quant-layers", "--output", "--model", "--model-arg", "--checkpoint"):
        assert option in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--model", TINY, "-o", "x.json"],
        ["--model", TINY, "--cfg", "a.cfg", "--quant-layers", K_PROJ, "-o", "x.json"],
        ["--model", TINY, "--cfg", "a.cfg"],
        ["--cfg", "a.cfg", "-o", "x.json"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x.json").exists()


def test_model_load_error(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    result = run("--model", "models:no_such_model", "--quant-layers", K_PROJ, "-o", str(out))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: model entry point 'models:no_such_model'")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_bad_quant_layers_value(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    result = run("--model", TINY, "--quant-layers", f"{K_PROJ},", "-o", str(out))
    assert result.exit_code == 1
    assert "empty layer name" in result.stderr
    result = run("--model", TINY, "--quant-layers", f"{K_PROJ},{K_PROJ}", "-o", str(out))
    assert result.exit_code == 1
    assert f"--quant-layers: layer '{K_PROJ}' is listed twice" in result.stderr
    assert not out.exists()


def test_unwritable_output(tmp_path: Path) -> None:
    result = run("--model", TINY, "--quant-layers", K_PROJ, "-o", str(tmp_path / "missing" / "c.json"))
    assert result.exit_code == 1
    assert "error: cannot write config" in result.stderr
    assert f"directory {tmp_path / 'missing'} does not exist" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_output_onto_the_cfg_itself_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "quant.cfg"
    cfg.write_bytes((DATA / "formats_example.cfg").read_bytes())
    result = run("--model", TINY, "--cfg", str(cfg), "-o", str(cfg))
    assert result.exit_code == 1
    assert "is also the .cfg file of this run" in result.stderr
    assert cfg.read_bytes() == (DATA / "formats_example.cfg").read_bytes()


def test_missing_cfg_file(tmp_path: Path) -> None:
    result = run("--model", TINY, "--cfg", str(tmp_path / "nope.cfg"), "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 1
    assert "cannot read config" in result.stderr and "nope.cfg" in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--debug", "gen-config", "--model", TINY, "--quant-layers", "nope", "-o", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError)


# --- every FORMATS.md §1 rule, violated once, through the CLI ---

Q = f"kv_cache_quant_config {{\n    quant_layers: '{K_PROJ}'\n"


def _ifmr(body: str) -> str:
    return Q + f"    calibration_config {{ ifmr_quantize {{ {body} }} }}\n}}\n"


VIOLATIONS = [
    # (id, .cfg text, expected fragments; "CFG" stands for the file path)
    ("syntax", Q + "    calibration_config: { hfmg_quantize { num_of_bins 4096 } }\n}\n",
     ["CFG:3:55: ", 'Expected ":"']),
    ("unclosed", Q, ["CFG:2:19: ", 'Expected "}"']),
    ("unknown-field", "batch_num: 2\nbatch_size: 3\n", ["CFG:2:1: ", 'no field named "batch_size"']),
    ("unknown-nested-field", Q + "    calibration_config { ifmr_quantize { step: 0.1 } }\n}\n",
     ["CFG:3:42: ", 'no field named "step"']),
    ("field-twice", "batch_num: 2\nbatch_num: 3\n", ["CFG:2:12: ", 'multiple "batch_num" fields']),
    ("message-twice", Q + "}\n" + Q + "}\n", ["CFG:4:", 'multiple "kv_cache_quant_config" fields']),
    ("both-algorithms", Q + "    calibration_config { ifmr_quantize { } hfmg_quantize { } }\n}\n",
     ["CFG:3:44: ", '"hfmg_quantize" is specified along with field "ifmr_quantize"', "oneof"]),
    ("both-algorithms-override",
     f"override_layers_configs {{\n  layer_name: '{K_PROJ}'\n"
     "  kv_data_quant_config { hfmg_quantize { } ifmr_quantize { } }\n}\n",
     ["CFG:3:44: ", '"ifmr_quantize" is specified along with field "hfmg_quantize"']),
    ("bad-enum", _ifmr("quant_granularity: per_row"), ["CFG:3:", "per_row"]),
    ("negative-batch-num", "batch_num: -1\n" + Q + "}\n", ["CFG:1:12: ", "Value out of range: -1"]),
    ("missing-layer", f"kv_cache_quant_config {{\n    quant_layers: 'model.layers.0.self_attn.k_prj'\n}}\n",
     ["CFG:2:5: ", "layer 'model.layers.0.self_attn.k_prj' does not exist in the model", f"did you mean '{K_PROJ}'"]),
    ("missing-override-layer", f"override_layers_configs {{\n  layer_name: 'model.layers.9.self_attn.v_proj'\n}}\n",
     ["CFG:2:3: ", "layer 'model.layers.9.self_attn.v_proj' does not exist in the model", "did you mean"]),
    ("not-linear", "kv_cache_quant_config {\n    quant_layers: 'model.layers.0.input_layernorm'\n}\n",
     ["CFG:2:5: ", "layer 'model.layers.0.input_layernorm' is a LayerNorm, not a torch.nn.Linear"]),
    ("not-linear-override", "override_layers_configs { layer_name: 'model.embed_tokens' }\n",
     ["CFG:1:27: ", "layer 'model.embed_tokens' is a Embedding, not a torch.nn.Linear"]),
    ("duplicate-quant-layer", Q + f"    quant_layers: '{K_PROJ}'\n}}\n",
     ["CFG:3:5: ", f"layer '{K_PROJ}' is listed twice", "(first at line 2)"]),
    ("duplicate-override", f"override_layers_configs {{ layer_name: '{V_PROJ}' }}\n" * 2,
     ["CFG:2:27: ", f"layer '{V_PROJ}' is overridden twice"]),
    ("missing-layer-name", Q + "}\noverride_layers_configs {\n  kv_data_quant_config { }\n}\n",
     ["CFG:4:1: ", "override_layers_configs has no layer_name (it is required)"]),
    ("batch-num-zero", "batch_num: 0\n" + Q + "}\n", ["CFG:1:1: ", "batch_num must be an integer >= 1, got 0"]),
    ("num-of-bins", Q + "    calibration_config { hfmg_quantize { num_of_bins: 1000 } }\n}\n",
     ["CFG:3:42: ", "kv_cache_quant_config.calibration_config",
      "num_of_bins must be one of [1024, 2048, 4096, 8192], got 1000"]),
    ("max-percentile-low", _ifmr("max_percentile: 0.5"),
     ["CFG:3:42: ", "max_percentile must be in (0.5, 1], got 0.5"]),
    ("max-percentile-high", _ifmr("max_percentile: 1.01"),
     ["CFG:3:42: ", "max_percentile must be in (0.5, 1], got 1.01"]),
    ("min-percentile", _ifmr("min_percentile: 0.3"),
     ["CFG:3:42: ", "min_percentile must be in (0.5, 1], got 0.3"]),
    ("search-range-start-zero", _ifmr("search_range_start: 0"),
     ["CFG:3:42: ", "search_range must satisfy 0 < start < end, got [0.0, 1.3]"]),
    ("search-range-start-negative", _ifmr("search_range_start: -0.5"),
     ["CFG:3:42: ", "0 < start < end, got [-0.5, 1.3]"]),
    ("search-range-inverted", _ifmr("search_range_start: 1.2 search_range_end: 0.8"),
     ["CFG:3:42: ", "0 < start < end, got [1.2, 0.8]"]),
    ("search-range-equal", _ifmr("search_range_end: 0.7"), ["CFG:3:42: ", "0 < start < end, got [0.7, 0.7]"]),
    ("search-step-zero", _ifmr("search_step: 0"),
     ["CFG:3:42: ", "search_step must be in (0, search_range end - start]", "got 0.0"]),
    ("search-step-negative", _ifmr("search_step: -0.01"), ["CFG:3:42: ", "search_step must be in (0, ", "got -0.01"]),
    ("search-step-too-big", _ifmr("search_range_start: 0.9 search_range_end: 1.0 search_step: 0.2"),
     ["CFG:3:88: ", "search_step must be in (0, ", "got 0.2"]),
    ("search-step-nan", _ifmr("search_step: nan"), ["CFG:3:42: ", "search_step must be a finite number"]),
    ("override-value",
     Q + f"}}\noverride_layers_configs {{\n  layer_name: '{K_PROJ}'\n"
     "  kv_data_quant_config { ifmr_quantize { min_percentile: 0.5 } }\n}\n",
     ["CFG:6:42: ", f"override of layer '{K_PROJ}'", "min_percentile must be in (0.5, 1], got 0.5"]),
    ("no-layers-empty-file", "", ["CFG: no layers to calibrate"]),
    ("no-layers", "batch_num: 2\nkv_cache_quant_config { calibration_config { hfmg_quantize { } } }\n",
     ["CFG: no layers to calibrate"]),
]


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
@pytest.mark.parametrize(("text", "fragments"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_cfg_rule_violations(tmp_path: Path, text: str, fragments: list[str], existing: bool) -> None:
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(text)
    out = tmp_path / "config.json"
    if existing:
        out.write_bytes(OLD)
    result = run("--model", TINY, "--cfg", str(cfg), "-o", str(out))
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert message.startswith("error: "), message
    assert message.count("\n") == 1, message  # one line, no traceback
    for fragment in fragments:
        assert fragment.replace("CFG", str(cfg)) in message, message
    if existing:
        assert out.read_bytes() == OLD
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["quant.cfg"] + (["config.json"] if existing else []))


# --- the Python API ---


def test_create_quant_cali_config_with_a_cfg_wins_over_quant_layers(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    kvcal.create_quant_cali_config(
        str(out), tiny_decoder(), {"kv_cache_quant_layers": [V_PROJ]}, str(DATA / "formats_example.cfg")
    )
    assert out.read_bytes() == (DATA / "formats_example.json").read_bytes()


def test_create_quant_cali_config_with_quant_layers(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = kvcal.create_quant_cali_config(
        out, tiny_decoder(), quant_layers={"kv_cache_quant_layers": ("model.layers.1.self_attn.v_proj", K_PROJ)}
    )
    assert result is None
    assert out.read_bytes() == (DATA / "quant_layers.json").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({}, ValueError, "give quant_layers"),
        ({"quant_layers": [K_PROJ]}, TypeError, "quant_layers must be a dict"),
        ({"quant_layers": {"kv_cache_quant_layers": K_PROJ}}, TypeError, "must be a list of layer names"),
        ({"quant_layers": {"kv_quant": [K_PROJ]}}, ValueError, "unknown key 'kv_quant'"),
        ({"quant_layers": {}}, ValueError, "must have the key 'kv_cache_quant_layers'"),
        ({"quant_layers": {"kv_cache_quant_layers": []}}, ConfigError, "no layers to calibrate"),
        ({"quant_layers": {"kv_cache_quant_layers": ["model.norm"]}}, ConfigError, "is a LayerNorm"),
        ({"config_defination": 3}, TypeError, "config_defination must be the path of a .cfg file"),
    ],
)
def test_create_quant_cali_config_errors(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    out = tmp_path / "config.json"
    with pytest.raises(error, match=None) as info:
        kvcal.create_quant_cali_config(str(out), tiny_decoder(), **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert not out.exists()


def test_create_quant_cali_config_argument_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config_file must be a path"):
        kvcal.create_quant_cali_config(3, tiny_decoder(), {"kv_cache_quant_layers": [K_PROJ]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kvcal.create_quant_cali_config(
            str(tmp_path / "c.json"), "model", {"kv_cache_quant_layers": [K_PROJ]}  # type: ignore[arg-type]
        )


SPY_MODEL = """
import pathlib
from models import tiny_decoder

def build():
    pathlib.Path(__file__).with_name("MODEL_WAS_BUILT").write_text("yes")
    return tiny_decoder()
"""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kv_cache_quant_config { quant_layers: 'a' quant_layers: 'a' }\n", "is listed twice"),
        ("batch_num: 0\nkv_cache_quant_config { quant_layers: 'a' }\n", "batch_num must be an integer >= 1"),
        ("kv_cache_quant_config { quant_layers: 'a'\n", "q.cfg:"),
        ("batch_num: 1\n", "no layers to calibrate"),
    ],
)
def test_cfg_errors_come_before_the_model_loads(tmp_path: Path, text: str, fragment: str) -> None:
    model_file = tmp_path / "spy.py"
    model_file.write_text(SPY_MODEL, encoding="utf-8")
    cfg = tmp_path / "q.cfg"
    cfg.write_text(text, encoding="utf-8")
    result = run("--model", f"{model_file}:build", "--cfg", str(cfg), "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert not (tmp_path / "MODEL_WAS_BUILT").exists()
    assert not (tmp_path / "c.json").exists()
