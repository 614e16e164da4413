"""Models bigger than one device: a dispatched (device_map, disk-offloaded) model is calibrated
where it is, gives the same factors as the same model undispatched, and is never moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kvcal.calibration.runner import run_calibration
from kvcal.cli import main
from kvcal.errors import DeviceError
from kvcal.placement import dispatch_devices, place_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_models import KV_NAMES  # noqa: E402
from hf_models import build as build_hf  # noqa: E402
from test_kv_taps_hf import padded_batches, plan, write_dataset  # noqa: E402

DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    build_hf("llama").save_pretrained(directory)
    return directory


def load(model_dir: Path, offload: Path | None = None) -> nn.Module:
    kwargs = {} if offload is None else {"device_map": DEVICE_MAP, "offload_folder": str(offload)}
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def placement(model: nn.Module) -> dict[str, str]:
    return {name: str(p.device) for name, p in model.named_parameters()}


@pytest.mark.parametrize("tap", ["cache", "proj"])
def test_dispatched_model_gives_the_undispatched_factors(model_dir: Path, tmp_path: Path, tap: str) -> None:
    data = write_dataset(tmp_path / "data", padded_batches())
    plain = run_calibration(model=load(model_dir), plan=plan(), dataset_dir=data,
                            record_path=tmp_path / "plain.txt", tap=tap)
    model = load(model_dir, tmp_path / "offload")
    assert dispatch_devices(model) == {torch.device("cpu")}
    assert "meta" in set(placement(model).values())  # layer 1 really is offloaded
    before = placement(model)
    with torch.inference_mode():
        logits = model(**padded_batches()[0]).logits
    result = run_calibration(model=model, plan=plan(), dataset_dir=data, record_path=tmp_path / "big.txt",
                             tap=tap, device="auto")
    assert placement(model) == before and model.hf_device_map == DEVICE_MAP
    with torch.inference_mode():
        assert torch.equal(model(**padded_batches()[0]).logits, logits)
    for name in KV_NAMES:
        assert torch.equal(result.qparams[name].scale, plain.qparams[name].scale), name
        assert torch.equal(result.qparams[name].offset, plain.qparams[name].offset), name


def test_cli_calibrates_an_offloaded_model_as_the_readme_says(model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", padded_batches())
    config = tmp_path / "c.json"
    runner = CliRunner()
    entry = ["--model", "transformers:AutoModelForCausalLM.from_pretrained", "--model-arg", str(model_dir)]
    dispatch = ["--model-arg", f"device_map={json.dumps(DEVICE_MAP)}", "--model-arg",
                f"offload_folder={tmp_path / 'off'}"]
    result = runner.invoke(main, ["gen-config", *entry, *dispatch, "--quant-layers",
                                  "model.layers.*.self_attn.[kv]_proj", "--batch-num", "2", "-o", str(config)])
    assert result.exit_code == 0, result.output
    for name, device in (("big.txt", "cpu"), ("big_auto.txt", "auto")):
        result = runner.invoke(main, ["calibrate", *entry, *dispatch, "--config", str(config), "--dataset",
                                      str(data), "--record", str(tmp_path / name), "--device", device])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["calibrate", *entry, "--config", str(config), "--dataset", str(data),
                                  "--record", str(tmp_path / "plain.txt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    plain = (tmp_path / "plain.txt").read_text()
    assert (tmp_path / "big.txt").read_text() == plain == (tmp_path / "big_auto.txt").read_text()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k_proj(x)


def test_a_device_that_contradicts_the_dispatch_is_a_clean_error() -> None:
    model = Net()
    model.hf_device_map = {"k_proj": 0}  # as accelerate records a GPU placement
    with pytest.raises(DeviceError, match=r"dispatched over (cuda|npu):0 .*--device cpu contradicts"):
        place_model(model, "cpu")


def test_an_undispatched_model_still_moves_to_the_device() -> None:
    model = Net()
    assert dispatch_devices(model) is None
    assert place_model(model, "cpu") == torch.device("cpu")


class Unmovable(Net):
    def to(self, *args: object, **kwargs: object) -> Unmovable:  # type: ignore[override]
        raise RuntimeError("cannot move this one")


def test_a_failing_placement_names_the_stage() -> None:
    with pytest.raises(DeviceError, match="placing the model on cpu failed: RuntimeError: cannot move this one"):
        place_model(Unmovable(), "cpu")
