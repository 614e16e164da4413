"""The offloaded-model workload of `make bench`: calibrate vs plain forward of a disk-offloaded model.

A Llama-architecture model (hidden 1024, 8 layers, ~110M parameters, random weights,
built locally) is saved once, then loaded with accelerate's dispatch: embeddings and the
first half of the layers on the CPU, the second half offloaded to disk. Two child
processes each load it the same way and run the same batches: one plain forward per
batch, or `run_calibration` (cache tap, HFMG per tensor on every K/V projection).
Reported: wall time of the batches and peak resident memory of each process, and their
ratios (calibrate ÷ forward). Each child is timed best of `repeats` runs in-process.

Usage: python scripts/bench_offload.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HIDDEN, HEADS, KV_HEADS = 8, 1024, 16, 4
BATCHES, BATCH, SEQ = 2, 4, 256

CHILD = r"""
import json, resource, sys, time
import torch
torch.manual_seed(0)
from transformers import AutoModelForCausalLM
mode, model_dir, offload, data, record = sys.argv[1:6]
layers = int(sys.argv[6])
device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
for i in range(layers):
    device_map[f"model.layers.{i}"] = "cpu" if i < layers // 2 else "disk"
model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=offload).eval()
batches = [torch.load(p) for p in sorted(__import__("pathlib").Path(data).glob("*.pt"))]
best = float("inf")
for _ in range(int(sys.argv[7])):
    start = time.perf_counter()
    if mode == "forward":
        with torch.inference_mode():
            for b in batches:
                model(**b)
    else:
        from kvcal.calibration.runner import run_calibration
        from kvcal.kv.plan import CalibrationPlan, LayerPlan
        from kvcal.params import HfmgParams
        names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "kv"]
        plan = CalibrationPlan(batch_num=len(batches), activation_offset=True,
                               layers=tuple(LayerPlan(n, HfmgParams(), granularity=0) for n in names))
        run_calibration(model=model, plan=plan, dataset_dir=data, record_path=record, device="auto",
                        tap="cache", dry_run=True)
    best = min(best, time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": best, "peak_mib": peak}))
"""


def _prepare(root: Path) -> tuple[Path, Path]:
    """Save the model and write the batches once (in a child, so this process stays small)."""
    model_dir, data = root / "model", root / "data"
    script = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size={HIDDEN}, intermediate_size={HIDDEN * 3},
                     num_hidden_layers={LAYERS}, num_attention_heads={HEADS}, num_key_value_heads={KV_HEADS},
                     max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(config).save_pretrained({str(model_dir)!r})
import pathlib
pathlib.Path({str(data)!r}).mkdir()
gen = torch.Generator().manual_seed(1)
for i in range({BATCHES}):
    ids = torch.randint(3, 32000, ({BATCH}, {SEQ}), generator=gen)
    torch.save({{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}, {str(data)!r} + f"/b{{i}}.pt")
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    return model_dir, data


def _child(mode: str, root: Path, model_dir: Path, data: Path, repeats: int) -> dict[str, float]:
    args = [mode, str(model_dir), str(root / f"offload_{mode}"), str(data), str(root / "r.txt"), str(LAYERS)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args, str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def offloaded_workload(repeats: int = 2) -> dict[str, float]:
    """Times and peak RSS of forward and calibrate on the offloaded model, and their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = _prepare(root)
        forward = _child("forward", root, model_dir, data, repeats)
        calibrate = _child("calibrate", root, model_dir, data, repeats)
    return {
        "forward_s": forward["seconds"],
        "calibrate_s": calibrate["seconds"],
        "time_ratio": calibrate["seconds"] / forward["seconds"],
        "forward_peak_mib": forward["peak_mib"],
        "calibrate_peak_mib": calibrate["peak_mib"],
        "rss_ratio": calibrate["peak_mib"] / forward["peak_mib"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    figures = offloaded_workload()
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["time_ratio"] <= 1.3 and figures["rss_ratio"] <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
