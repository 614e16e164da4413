"""PTQ workloads of `make bench`: `kvcal calibrate` on a PTQ config ÷ plain forward passes over the same batches.

P1 is the CNN demo model (`configs/ptq_example.cfg`: IFMR, DMQ, BN fusion, 6-bit
weights), P2 a Linear-heavy model (six 1024-wide Linear layers, the default config:
IFMR, ARQ); P2h is P2 with HFMG activations and P2w two 4096-wide layers observing as
many values a batch (both for information). All time `run_ptq_calibration` — the library
call behind `kvcal calibrate`: data loading, the calibration copy, every forward pass, the
searches, the SQNR summary and the record merge — against the model's own forward passes
over the same 8 batches.

PTQ calibration runs `batch_num + 2` forward passes (plus one with DMQ after a fused
BatchNorm): the first batch through the untouched copy (layer discovery, Conv→BN
consumers, the float reference) and once more fully fake-quantized (the model SQNR). So
the ratio cannot go below `1 + 2 / batch_num` = 1.25, whatever the observers cost.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["LinearHeavy", "cnn_over_forward", "linear_over_forward"]

TimedPair = Callable[[Callable[[], object], Callable[[], object], torch.device], tuple[float, float]]


class LinearHeavy(nn.Module):
    """Six 1024-wide Linear layers with GELU: [batch, tokens, 1024] → same."""

    def __init__(self, width: int = 1024, depth: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def _over_forward(
    model: nn.Module, batches: list[Tensor], config: dict[str, object], device: torch.device, timed_pair: TimedPair
) -> tuple[float, float]:
    from kvcal.ptq.job import run_ptq_calibration

    model = model.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for index, batch in enumerate(batches):
            torch.save(batch, data / f"batch_{index:03d}.pt")
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        on_device = [batch.to(device) for batch in batches]

        def forward_only() -> None:
            with torch.inference_mode():
                for batch in on_device:
                    model(batch)

        def calibrate() -> None:
            run_ptq_calibration(model=model, config_path=path, dataset_dir=data,
                                record_path=Path(tmp) / "record.txt", device=device)

        forward_only()  # warm-up
        calibrate()
        return timed_pair(calibrate, forward_only, device)


def _config(model: nn.Module, sample: Tensor, batch_num: int, cfg: Path | None) -> dict[str, object]:
    import kvcal

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # excluded modules and notes: not what is measured
        path = Path(tmp) / "config.json"
        kvcal.create_quant_config(path, model, sample, config_defination=cfg)
        document = json.loads(path.read_text())
    document["batch_num"] = batch_num
    return document


def cnn_over_forward(device: torch.device, timed_pair: TimedPair, batch_num: int = 8) -> tuple[float, float]:
    """(calibrate, plain forward) of the CNN demo model, configs/ptq_example.cfg, batches of 64 images."""
    from demo_cnn_model import IMAGE_SIZE, build

    model = build()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn((64, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen) for _ in range(batch_num)]
    config = _config(model, batches[0], batch_num, ROOT / "configs" / "ptq_example.cfg")
    return _over_forward(model, batches, config, device, timed_pair)


_HFMG = {"num_bits": 8, "act_algo": "hfmg", "asymmetric": True, "num_of_bins": 4096}


def linear_over_forward(
    device: torch.device,
    timed_pair: TimedPair,
    batch_num: int = 8,
    hfmg: bool = False,
    width: int = 1024,
    depth: int = 6,
) -> tuple[float, float]:
    """(calibrate, plain forward) of `LinearHeavy`, the default config (or HFMG activations).

    Batches of 4 x (128 * 1024 / width) tokens: every layer observes 512k values a batch
    whatever the width, while the forward pass does `width / 1024` times more work per
    observed value.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LinearHeavy(width, depth)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn((4, 128 * 1024 // width, width), generator=gen) for _ in range(batch_num)]
    config = _config(model, batches[0], batch_num, None)
    if hfmg:
        for entry in config.values():
            if isinstance(entry, dict):
                entry["activation_quant_params"] = dict(_HFMG)
    return _over_forward(model, batches, config, device, timed_pair)
