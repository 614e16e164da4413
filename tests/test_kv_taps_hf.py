"""Both taps on real transformers architectures, end to end, against the naive references.

The cache tap's factors must equal the reference run on what `past_key_values` holds
after each forward (padding removed); the proj tap's, the reference on the k_proj/v_proj
outputs (padding removed). Batches carry left and right padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from kvcal.calibration.runner import run_calibration
from kvcal.cli import main
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.params import HfmgParams, IfmrParams
from kvcal.quant import QParams

pytest.importorskip("transformers")

from hf_models import KV_NAMES, LAYERS, VOCAB, build  # noqa: E402
from reference_hfmg import hfmg_reference  # noqa: E402
from reference_ifmr import ifmr_reference  # noqa: E402

BINS = 1024


def padded_batches() -> list[dict[str, Tensor]]:
    """Two batches: left padding in one row of the first, right padding in one row of the second."""
    gen = torch.Generator().manual_seed(3)
    batches = []
    for side in ("left", "right"):
        ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
        mask = torch.ones_like(ids)
        if side == "left":
            mask[1, :4] = 0
        else:
            mask[0, 6:] = 0
        ids[mask == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def write_dataset(directory: Path, batches: list[dict[str, Tensor]]) -> Path:
    directory.mkdir()
    for i, batch in enumerate(batches):
        torch.save(batch, directory / f"{i:02d}.pt")
    return directory


def as_channels(states: Tensor) -> Tensor:
    batch, _, seq, _ = states.shape
    return states.transpose(1, 2).reshape(batch, seq, -1)


def cache_tensors(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, list[Tensor]]:
    """Per K/V layer, what the cache holds after each batch's forward, padding removed: [n, C]."""
    out: dict[str, list[Tensor]] = {name: [] for name in KV_NAMES}
    with torch.inference_mode():
        for batch in batches:
            cache = model(**batch, use_cache=True).cache
            keep = batch["attention_mask"] != 0
            for i in range(LAYERS):
                out[f"model.layers.{i}.self_attn.k_proj"].append(as_channels(cache.layers[i].keys)[keep])
                out[f"model.layers.{i}.self_attn.v_proj"].append(as_channels(cache.layers[i].values)[keep])
    return out


def proj_tensors(model: nn.Module, batches: list[dict[str, Tensor]], *, drop_padding: bool = True) -> dict[str, list[Tensor]]:
    """Per K/V layer, the Linear outputs of each batch ([n, C] without padding, else [b, s, C])."""
    out: dict[str, list[Tensor]] = {name: [] for name in KV_NAMES}
    modules = dict(model.named_modules())
    current: dict[str, Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: current.__setitem__(name, o.detach().clone()))
        for name in KV_NAMES
    ]
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
            keep = batch["attention_mask"] != 0
            for name in KV_NAMES:
                out[name].append(current[name][keep] if drop_padding else current[name])
    for handle in handles:
        handle.remove()
    return out


def plan() -> CalibrationPlan:
    """K: HFMG per-tensor (1024 bins), V: IFMR per-channel; asymmetric, 2 batches."""
    layers = [
        LayerPlan(name, HfmgParams(BINS), granularity=0) if name.endswith("k_proj") else
        LayerPlan(name, IfmrParams(), granularity=1)
        for name in KV_NAMES
    ]
    return CalibrationPlan(batch_num=2, activation_offset=True, layers=tuple(layers))


def reference(name: str, batches: list[Tensor]) -> tuple[list[float], list[int]]:
    if name.endswith("k_proj"):
        return hfmg_reference(batches, granularity=0, asymmetric=True, num_of_bins=BINS)
    return ifmr_reference(batches, granularity=1, asymmetric=True)


def assert_reference(qparams: QParams, expected: tuple[list[float], list[int]], name: str) -> None:
    scales, offsets = expected
    torch.testing.assert_close(qparams.scale, torch.tensor(scales, dtype=torch.float32), rtol=1e-6, atol=0.0,
                               msg=lambda m: f"{name}: {m}")
    assert qparams.offset.tolist() == offsets, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_cache_tap_factors_equal_the_reference_on_the_cache(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    batches = padded_batches()
    expected = cache_tensors(model, batches)
    data = write_dataset(tmp_path / "data", batches)
    result = run_calibration(model=model, plan=plan(), dataset_dir=data, record_path=tmp_path / "r.txt", tap="cache")
    assert {layer.tap.value for layer in result.layers} == {"cache"}
    for name in KV_NAMES:
        assert_reference(result.qparams[name], reference(name, expected[name]), name)
    # The model is left without hooks and computes what it computed before.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_proj_tap_factors_equal_the_reference_on_the_linear_outputs(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    batches = padded_batches()
    expected = proj_tensors(model, batches)
    data = write_dataset(tmp_path / "data", batches)
    result = run_calibration(model=model, plan=plan(), dataset_dir=data, record_path=tmp_path / "r.txt", tap="proj")
    for name in KV_NAMES:
        assert_reference(result.qparams[name], reference(name, expected[name]), name)


def test_padding_changes_the_factors_when_not_excluded(tmp_path: Path) -> None:
    """The references with padding kept differ: the tests above would catch a tap ignoring the mask."""
    model = build("llama")
    batches = padded_batches()
    kept = proj_tensors(model, batches, drop_padding=False)
    dropped = proj_tensors(model, batches)
    differing = [name for name in KV_NAMES if reference(name, kept[name]) != reference(name, dropped[name])]
    assert differing


def test_qwen3_cache_tap_differs_from_proj_tap(tmp_path: Path) -> None:
    """Qwen3 normalizes and rotates keys after k_proj: the two taps must not give the same K factors."""
    model = build("qwen3")
    data = write_dataset(tmp_path / "data", padded_batches())
    cache = run_calibration(model=model, plan=plan(), dataset_dir=data, record_path=tmp_path / "c.txt", tap="cache")
    proj = run_calibration(model=model, plan=plan(), dataset_dir=data, record_path=tmp_path / "p.txt", tap="proj")
    k0 = "model.layers.0.self_attn.k_proj"
    assert not torch.equal(cache.qparams[k0].scale, proj.qparams[k0].scale)
    # Values are not transformed after v_proj: both taps see the same tensors.
    v0 = "model.layers.0.self_attn.v_proj"
    assert torch.equal(cache.qparams[v0].scale, proj.qparams[v0].scale)


MODEL_SOURCE = """
from hf_models import build as _build

def build(arch="llama"):
    return _build(arch)
"""


def cli_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    source = tmp_path / "tiny_hf.py"
    source.write_text(MODEL_SOURCE, encoding="utf-8")
    entry = f"{source}:build"
    data = write_dataset(tmp_path / "data", padded_batches())
    config = tmp_path / "config.json"
    result = CliRunner().invoke(main, ["gen-config", "--model", entry, "--quant-layers",
                                       "model.layers.*.self_attn.[kv]_proj", "--batch-num", "2", "-o", str(config)])
    assert result.exit_code == 0, result.output
    return entry, data, config


def test_cli_default_uses_the_cache_tap_on_a_transformers_model(tmp_path: Path) -> None:
    entry, data, config = cli_setup(tmp_path)
    assert list(json.loads(config.read_text()))[2:] == KV_NAMES  # the glob, expanded in model order
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", entry, "--config", str(config), "--dataset", str(data),
                                       "--record", str(tmp_path / "r.txt"), "--device", "cpu", "--report", str(report)])
    assert result.exit_code == 0, result.output
    layers = json.loads(report.read_text())["layers"]
    assert [layer["tap"] for layer in layers] == ["cache"] * len(KV_NAMES)
    assert all(0.0 <= layer["clipped_fraction"] <= 1.0 for layer in layers)
    assert "Clipped" in result.stderr and "cache" in result.stderr
    assert "warning" not in result.stderr


def test_cli_proj_tap_warns_that_keys_are_observed_before_rope(tmp_path: Path) -> None:
    entry, data, config = cli_setup(tmp_path)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", entry, "--config", str(config), "--dataset", str(data),
                                       "--record", str(tmp_path / "r.txt"), "--device", "cpu", "--tap", "proj",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning:") == 1
    assert "before RoPE/normalization" in result.stderr
    assert {layer["tap"] for layer in json.loads(report.read_text())["layers"]} == {"proj"}
