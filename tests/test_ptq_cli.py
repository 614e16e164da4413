"""`kvcal gen-config --ptq`: outputs, the layer and exclusion tables, usage, the wrong schema,
and every rule of PTQ.md §1–§3 violated once (exit 1, one `error:` line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

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

from kvcal.cli import main

MODEL = f"{PTQ_MODELS}:build"
CNN = f"{DEMO_CNN}:build"
OLD = b'{"previous": "config"}'


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset: the sample input first (the one gen-config runs), then a file it must not read."""
    directory = tmp_path_factory.mktemp("data")
    torch.save(ptq_models().sample(), directory / "batch_000.pt")
    (directory / "batch_001.pt").write_bytes(b"not read")
    return directory


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    demo = demo_cnn()
    directory = tmp_path_factory.mktemp("cnn_data")
    demo.write_batches(directory, batches=2)
    return directory


def run(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["gen-config", *args])


def ptq(data: Path, out: Path, *args: str, model: str = MODEL) -> Result:
    return run("--ptq", "--model", model, "--dataset", str(data), *args, "-o", str(out))


# --- successful runs ---


@pytest.mark.parametrize("name", ["ifmr", "hfmg", "ada", "bits7", "nonquant_override"])
def test_cfg_output_matches_the_hand_written_file(tmp_path: Path, data: Path, name: str) -> None:
    out = tmp_path / "config.json"
    result = ptq(data, out, "--cfg", str(PTQ_DATA / f"{name}.cfg"))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (PTQ_DATA / f"{name}.json").read_bytes()
    assert result.stdout == ""
    assert result.stderr.rstrip().endswith(f"wrote {out}")


def test_arguments_output_matches_the_hand_written_file(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "config.json"
    out.write_bytes(OLD)  # replaced whole
    result = ptq(data, out, "--skip-layers", " layer2", "--batch-num", "3", "--no-activation-offset")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (PTQ_DATA / "defaults.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_tables_show_layers_exclusions_and_notes(tmp_path: Path, data: Path) -> None:
    result = ptq(data, tmp_path / "c.json", "--cfg", str(PTQ_DATA / "ifmr.cfg"))
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert (
        "PTQ config: 6 quantizable layer(s), 4 enabled; batch_num 2, activation_offset false, do_fusion false, "
        "skip_fusion_layers conv"
    ) in err
    rows = {line.split()[1]: line.split("│")[2:-1] for line in err.splitlines() if line.startswith("│ ")}
    cells = [cell.strip() for cell in rows["conv"]]
    assert cells == ["Conv2d", "yes", "ifmr", "yes", "6 (arq)", "no", "0.3"]
    assert [cell.strip() for cell in rows["pool"]] == ["AvgPool2d", "no", "ifmr", "yes", "8 (arq)", "no", "-"]
    assert "Not quantized: 8 module(s)" in err
    assert [cell.strip() for cell in rows["dilated"]] == [
        "Conv3d",
        "dilation (2, 1, 1) (a Conv3d needs dilation[0] == 1)",
    ]
    assert rows["sub"][0].strip() == "SubLinear"
    assert "warning: layer 'pool' (AvgPool2d): dmq_balancer is not supported there; dropped" in err


def test_info_lines_for_settings_that_do_not_apply(tmp_path: Path, data: Path) -> None:
    result = ptq(data, tmp_path / "c.json", "--cfg", str(PTQ_DATA / "bits7.cfg"))
    assert result.exit_code == 0, result.output
    assert "note: layer 'layer2' (Linear): quant_bits 7 applies only to Conv2d; 8 bits" in result.stderr
    assert "warning:" not in result.stderr


def test_demo_cnn_with_the_sample_cfg(tmp_path: Path, cnn_data: Path) -> None:
    from kvcal.model_loader import load_model
    from kvcal.ptq.config_json import read_config
    from kvcal.ptq.layers import discover_layers

    out = tmp_path / "c.json"
    result = ptq(cnn_data, out, "--cfg", str(ROOT / "configs" / "ptq_example.cfg"), model=CNN)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr and "Not quantized" not in result.stderr
    model = load_model(CNN)
    plan = read_config(out, discover_layers(model, torch.load(cnn_data / "batch_000.pt")))
    layers = {layer.name: layer for layer in plan.layers}
    assert set(layers) == {"conv1", "conv2", "deconv", "pool", "head"}
    assert [name for name, layer in layers.items() if not layer.quant_enable] == ["deconv", "pool"]
    assert (layers["conv1"].dmq, layers["conv2"].weight.num_bits, layers["conv1"].asymmetric) == (0.6, 6, False)


def test_sample_ptq_configs_exist() -> None:
    assert (ROOT / "configs" / "ptq_example.cfg").is_file()


# --- usage and the wrong schema ---


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ptq", "--model", MODEL], "--ptq needs --dataset DIR"),
        (["--ptq", "--model", MODEL, "--dataset", "d", "--quant-layers", "conv"], "are for KV-cache configs"),
        (["--ptq", "--model", MODEL, "--dataset", "d", "--algo", "hfmg"], "are for KV-cache configs"),
        (["--ptq", "--model", MODEL, "--dataset", "d", "--cfg", "x.cfg", "--batch-num", "2"], "go without --cfg"),
        (["--ptq", "--model", MODEL, "--dataset", "d", "--cfg", "x.cfg", "--skip-layers", "a"], "go without --cfg"),
        (["--ptq", "--model", MODEL, "--dataset", "d", "--cfg", "x.cfg", "--activation-offset"], "go without --cfg"),
        (["--model", MODEL, "--dataset", "d", "--quant-layers", "conv"], "go with --ptq"),
        (["--model", MODEL, "--skip-layers", "conv", "--quant-layers", "conv"], "go with --ptq"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "c.json"
    result = run(*args, "-o", str(out))
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists()


def test_kv_cfg_with_ptq_says_which_flag(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "c.json"
    kv_cfg = ROOT / "tests" / "data" / "config" / "formats_example.cfg"
    result = ptq(data, out, "--cfg", str(kv_cfg))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {kv_cfg}:")
    assert "this is a KV-cache .cfg (AMCTQuantCaliConfig schema), not a PTQ one" in result.stderr
    assert "without --ptq" in result.stderr
    assert not out.exists()


def test_ptq_cfg_without_ptq_says_which_flag(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    cfg = PTQ_DATA / "ifmr.cfg"
    result = run("--model", "models:tiny_decoder", "--cfg", str(cfg), "-o", str(out))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {cfg}:5:1: ")
    assert "this is a PTQ .cfg (AMCTConfig schema, whole-network quantization)" in result.stderr
    assert "--ptq --dataset DIR" in result.stderr
    assert not out.exists()


# --- every rule violated once ---

SYNTAX_AND_SCHEMA = [
    ("batch_num: 1 {", ":1:14: ", "Expected"),
    ("bacth_num: 1", ":1:1: ", 'has no field named "bacth_num"'),
    ("batch_num: 1\nbatch_num: 2", ":2:12: ", 'should not have multiple "batch_num" fields'),
    ("common_config { arq_quantize {} ada_quantize {} }", ":1:33: ", 'another member of oneof "wts_quant_algo"'),
    ("common_config { ifmr_quantize {} hfmg_quantize {} }", ":1:34: ", 'another member of oneof "acts_quant_algo"'),
    ("common_config { ifmr_quantize { dst_type: INT16 } }", ":1:33: ", "dst_type INT16 is not supported; only INT8"),
    ("common_config { hfmg_quantize { dst_type: INT16 } }", ":1:33: ", "dst_type INT16 is not supported"),
    ("override_layer_configs { calibration_config {} }", ":1:1: ", "override_layer_configs has no layer_name"),
    ("override_layer_types { layer_type: 'Linear' }", ":1:1: ", "override_layer_types has no calibration_config"),
]
NAMES = [
    ("skip_layers: 'layre2'", ":1:1: ", "skip_layers: 'layre2' does not exist in the model; did you mean 'layer2'"),
    (
        "override_layer_configs { layer_name: 'cnv' calibration_config {} }",
        ":1:26: ",
        "override_layer_configs: 'cnv' does not exist in the model; did you mean 'conv'",
    ),
    ("skip_fusion_layers: 'conv4'", ":1:1: ", "skip_fusion_layers: 'conv4' does not exist in the model"),
    (
        "skip_layers: 'conv'\nskip_layers: 'conv'",
        ":2:1: ",
        "skip_layers: layer 'conv' is listed twice (first at line 1)",
    ),
    ("skip_fusion_layers: ['conv', 'conv']", ":1:30: ", "skip_fusion_layers: layer 'conv' is listed twice"),
    (
        "override_layer_configs { layer_name: 'conv' calibration_config {} }\n" * 2,
        ":2:26: ",
        "override_layer_configs: layer 'conv' is overridden twice (first at line 1)",
    ),
    (
        "override_layer_types { layer_type: 'Linear' calibration_config {} }\n" * 2,
        ":2:24: ",
        "override_layer_types: type 'Linear' is overridden twice (first at line 1)",
    ),
    ("skip_layer_types: 'Linear'\nskip_layer_types: 'Linear'", ":2:1: ", "type 'Linear' is listed twice"),
    (
        "skip_layer_types: 'Conv1d'",
        ":1:1: ",
        "skip_layer_types: layer type 'Conv1d' is not quantizable; the types are Linear, Conv2d, Conv3d,",
    ),
    (
        "override_layer_types { layer_type: 'nn.Linear' calibration_config {} }",
        ":1:24: ",
        "override_layer_types: layer type 'nn.Linear' is not quantizable",
    ),
    (
        "skip_layers: 'reused'",
        ":1:1: ",
        "skip_layers: layer 'reused' is a Linear that is not quantizable: runs 2 times in one forward pass",
    ),
    ("skip_layers: 'bn'", ":1:1: ", "skip_layers: layer 'bn' is a BatchNorm2d, not one of the quantizable types"),
    (
        "skip_layer_types: ['Linear', 'Conv2d', 'Conv3d', 'ConvTranspose2d', 'AvgPool2d']",
        ": ",
        "no layer left to quantize: every quantizable layer is skipped (skip_layers and skip_layer_types cover",
    ),
    (
        "skip_fusion_layers: 'layer2'",
        ":1:1: ",
        "skip_fusion_layers: layer 'layer2' is a Linear; only Conv1d, Conv2d, Conv3d layers are fused",
    ),
]
TYPE_RULES = [
    (
        "override_layer_types { layer_type: 'Conv3d' calibration_config { hfmg_quantize { asymmetric: true } } }",
        ":1:82: ",
        "override_layer_types 'Conv3d': asymmetric: true is not supported on Conv3d",
    ),
    (
        "override_layer_configs { layer_name: 'conv3d' calibration_config { ifmr_quantize { asymmetric: true } } }",
        ":1:84: ",
        "override_layer_configs: layer 'conv3d' (Conv3d): asymmetric: true is not supported on Conv3d",
    ),
    (
        "override_layer_types { layer_type: 'AvgPool2d' calibration_config { dmq_balancer {} } }",
        ":1:69: ",
        "override_layer_types 'AvgPool2d': dmq_balancer is not supported on AvgPool2d",
    ),
    (
        "override_layer_configs { layer_name: 'pool' calibration_config { dmq_balancer {} } }",
        ":1:66: ",
        "override_layer_configs: layer 'pool' (AvgPool2d): dmq_balancer is not supported on AvgPool2d",
    ),
    (
        "override_layer_types { layer_type: 'Conv3d' calibration_config { ada_quantize {} } }",
        ":1:66: ",
        "ada_quantize is supported only on Conv2d, ConvTranspose2d, Linear, not on Conv3d",
    ),
    (
        "override_layer_configs { layer_name: 'pool' calibration_config { ada_quantize {} } }",
        ":1:66: ",
        "layer 'pool' (AvgPool2d): ada_quantize is supported only on Conv2d, ConvTranspose2d, Linear",
    ),
    (
        "override_layer_types { layer_type: 'Linear' calibration_config { arq_quantize { quant_bits: 7 } } }",
        ":1:81: ",
        "override_layer_types 'Linear': quant_bits 7 is supported only on Conv2d, not on Linear",
    ),
    (
        "override_layer_configs { layer_name: 'deconv' calibration_config { arq_quantize { quant_bits: 6 } } }",
        ":1:83: ",
        "layer 'deconv' (ConvTranspose2d): quant_bits 6 is supported only on Conv2d",
    ),
    (
        "override_layer_types { layer_type: 'Linear' calibration_config { arq_quantize { channel_wise: true } } }",
        ":1:81: ",
        "override_layer_types 'Linear': channel_wise must be false on Linear",
    ),
    (
        "override_layer_configs { layer_name: 'layer2' calibration_config { ada_quantize { channel_wise: true } } }",
        ":1:83: ",
        "layer 'layer2' (Linear): channel_wise must be false on Linear",
    ),
    (
        "skip_layer_types: 'AvgPool2d'\ncommon_config { arq_quantize { channel_wise: true } }",
        ":2:32: ",
        "layer 'pool' (AvgPool2d): channel_wise must be false on AvgPool2d",
    ),
]
VALUES = [
    ("batch_num: 0", ":1:1: ", "batch_num must be an integer >= 1, got 0"),
    (
        "common_config { arq_quantize { quant_bits: 4 } }",
        ":1:32: ",
        "arq_quantize: quant_bits must be 6, 7 or 8, got 4",
    ),
    (
        "common_config { dmq_balancer { migration_strength: 0.9 } }",
        ":1:32: ",
        "dmq_balancer: migration_strength must be in [0.2, 0.8], got 0.9",
    ),
    (
        "common_config { dmq_balancer { migration_strength: 0.1 } }",
        ":1:32: ",
        "migration_strength must be in [0.2, 0.8]",
    ),
    (
        "common_config { ada_quantize { reg_param: 1 } }",
        ":1:32: ",
        "ada_quantize: reg_param must be in (0, 1), got 1.0",
    ),
    ("common_config { ada_quantize { warm_start: 0 } }", ":1:32: ", "warm_start must be in (0, 1), got 0.0"),
    (
        "common_config { ada_quantize { beta_range_start: 2 beta_range_end: 3 } }",
        ":1:32: ",
        "beta_range must satisfy beta_range_start > beta_range_end > 0, got [2.0, 3.0]",
    ),
    ("common_config { ada_quantize { beta_range_end: 0 } }", ":1:32: ", "beta_range_start > beta_range_end > 0"),
    ("common_config { ifmr_quantize { search_step: 0.7 } }", ":1:33: ", "ifmr_quantize: search_step must be in (0,"),
    ("common_config { ifmr_quantize { max_percentile: 0.5 } }", ":1:33: ", "max_percentile must be in (0.5, 1]"),
    ("common_config { ifmr_quantize { min_percentile: 1.5 } }", ":1:33: ", "min_percentile must be in (0.5, 1]"),
    (
        "common_config { ifmr_quantize { search_range_start: 1.4 } }",
        ":1:33: ",
        "search_range must satisfy 0 < start < end",
    ),
    (
        "common_config { hfmg_quantize { num_of_bins: 1000 } }",
        ":1:33: ",
        "num_of_bins must be one of [1024, 2048, 4096, 8192]",
    ),
]
RULES = SYNTAX_AND_SCHEMA + NAMES + TYPE_RULES + VALUES


@pytest.mark.parametrize(("text", "where", "message"), RULES, ids=[message for _, _, message in RULES])
def test_every_rule_is_one_error_line_and_nothing_is_written(
    tmp_path: Path, data: Path, text: str, where: str, message: str
) -> None:
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(text + "\n")
    out = tmp_path / "config.json"
    out.write_bytes(OLD)
    result = ptq(data, out, "--cfg", str(cfg))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {cfg}{where}"), result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "quant.cfg"]


ARGUMENT_ERRORS = [
    (
        ["--skip-layers", "layre2"],
        "error: --skip-layers: 'layre2' does not exist in the model; did you mean 'layer2', 'layer10'?",
    ),
    (["--skip-layers", "conv,conv"], "error: --skip-layers: layer 'conv' is listed twice"),
    (
        ["--skip-layers", "unused"],
        "error: --skip-layers: layer 'unused' is a Linear that is not quantizable: never runs",
    ),
    (["--skip-layers", "conv,"], "error: --skip-layers 'conv,': empty layer name"),
    (
        ["--skip-layers", "conv,deconv,pool,conv3d", "--skip-layers", "layer2,layer10"],
        "error: --skip-layers: no layer left to quantize: every quantizable layer is skipped",
    ),
]


@pytest.mark.parametrize(("args", "message"), ARGUMENT_ERRORS, ids=[m for _, m in ARGUMENT_ERRORS])
def test_argument_errors(tmp_path: Path, data: Path, args: list[str], message: str) -> None:
    out = tmp_path / "config.json"
    result = ptq(data, out, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message or result.stderr.startswith(message), result.stderr
    assert not out.exists()


def test_model_that_raises_on_the_first_batch(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    torch.save(torch.zeros(2, 5), directory / "a.pt")
    out = tmp_path / "c.json"
    result = ptq(directory, out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: data file {directory / 'a.pt'}: the model's forward pass raised ")
    assert not out.exists()


def test_checks_before_the_model_loads(tmp_path: Path, data: Path) -> None:
    broken = f"{tmp_path / 'never.py'}:build"  # never imported: each error comes first
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("batch_num: 0\n")
    result = ptq(data, tmp_path / "c.json", "--cfg", str(cfg), model=broken)
    assert "batch_num must be an integer >= 1" in result.stderr
    result = ptq(tmp_path / "nodata", tmp_path / "c.json", model=broken)
    assert "dataset directory" in result.stderr and "does not exist" in result.stderr
    result = ptq(data, tmp_path / "missing" / "c.json", model=broken)
    assert "directory" in result.stderr and "does not exist" in result.stderr
    result = ptq(data, cfg, "--cfg", str(cfg), model=broken)
    assert "is also the .cfg file of this run" in result.stderr
    result = ptq(data, data / "batch_000.pt", model=broken)
    assert "is also the data file of this run" in result.stderr
    assert cfg.read_text() == "batch_num: 0\n" and (data / "batch_000.pt").stat().st_size > 100


def test_json_is_valid_and_names_every_layer(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "c.json"
    assert ptq(data, out).exit_code == 0
    document = json.loads(out.read_text())
    assert list(document)[:5] == ["version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers"]
    assert list(document)[5:] == sorted(["conv", "deconv", "pool", "conv3d", "layer2", "layer10"])
