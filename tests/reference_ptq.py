"""Naive PTQ calibration, written straight from PTQ.md §4–§5: one layer, one channel at a time.

The oracle of the PTQ differential tests: deliberately slow and obvious, numpy float32
scalars where the text says float32, sharing no code with kvcal. Activations go through
the naive IFMR/HFMG of `reference_ifmr` / `reference_hfmg`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from reference_hfmg import hfmg_reference
from reference_ifmr import ifmr_reference
from torch import Tensor, nn

__all__ = [
    "EPS",
    "act_absmax_reference",
    "arq_reference",
    "calibrate_reference",
    "dmq_reference",
    "force_fp16_reference",
    "fuse_reference",
    "weight_absmax_reference",
]

EPS = np.float32(1.192092896e-7)
_TYPES = {nn.Linear: "Linear", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d", nn.ConvTranspose2d: "ConvTranspose2d",
          nn.AvgPool2d: "AvgPool2d"}


def _output_channel(w: np.ndarray, layer_type: str, groups: int, o: int) -> tuple[Any, ...]:
    """The index of output channel `o` in the weight array."""
    if layer_type != "ConvTranspose2d":
        return (o,)
    c_in_g, c_out_g = w.shape[0] // groups, w.shape[1]
    g, j = divmod(o, c_out_g)
    return (slice(g * c_in_g, (g + 1) * c_in_g), j)


def _output_count(w: np.ndarray, layer_type: str, groups: int) -> int:
    return w.shape[1] * groups if layer_type == "ConvTranspose2d" else w.shape[0]


def _arq_scale(values: np.ndarray, num_bits: int) -> np.float32:
    mx, mn = np.float32(values.max()), np.float32(values.min())
    q = np.float32(2 ** (num_bits - 1) - 1 + (1 if abs(mx) < abs(mn) else 0))
    scale = np.float32(max(abs(mx), abs(mn))) / q
    return np.float32(1.0) if scale < EPS else np.float32(scale)


def arq_reference(
    weight: Tensor, layer_type: str, groups: int, num_bits: int, channel_wise: bool
) -> tuple[list[float], Tensor]:
    """ARQ scales (one per output channel, or one) and the fake-quantized weight, channel by channel."""
    w = weight.detach().to(torch.float32).numpy().copy()
    out = np.empty_like(w)
    count = _output_count(w, layer_type, groups)
    whole = _arq_scale(w, num_bits)
    scales = []
    lo, hi = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    for o in range(count):
        index = _output_channel(w, layer_type, groups, o)
        values = w[index]
        scale = _arq_scale(values, num_bits) if channel_wise else whole
        out[index] = np.clip(np.round(values / scale), lo, hi).astype(np.float32) * scale
        scales.append(float(scale))
    return (scales if channel_wise else [float(whole)]), torch.from_numpy(out)


def weight_absmax_reference(weight: Tensor, layer_type: str, groups: int) -> list[float]:
    """`max|W|` per input channel, one channel at a time."""
    w = weight.detach().to(torch.float32).numpy()
    if layer_type == "Linear":
        return [float(np.abs(w[:, c]).max()) for c in range(w.shape[1])]
    if layer_type == "ConvTranspose2d":
        return [float(np.abs(w[c]).max()) for c in range(w.shape[0])]
    c_in_g, c_out_g = w.shape[1], w.shape[0] // groups
    result = []
    for c in range(c_in_g * groups):
        g, j = divmod(c, c_in_g)
        result.append(float(np.abs(w[g * c_out_g : (g + 1) * c_out_g, j]).max()))
    return result


def act_absmax_reference(x: Tensor, layer_type: str) -> list[float]:
    """`max|x|` per input channel: last dim (Linear) or dim 1 (Conv), one channel at a time."""
    a = x.detach().to(torch.float32)
    if layer_type == "Linear":
        return [float(a[..., c].abs().max()) for c in range(a.shape[-1])]
    return [float(a[:, c].abs().max()) for c in range(a.shape[1])]


def dmq_reference(act_max: Sequence[float], wts_max: Sequence[float], alpha: float) -> list[float]:
    """The DMQ factors of PTQ.md §5, channel by channel in float32; ValueError when one is out of range."""
    a = [np.float32(v) for v in act_max]
    w = [np.float32(v) for v in wts_max]
    s = [np.float32(0.0) if wj < EPS else np.float32(aj ** np.float32(alpha) / wj ** np.float32(1.0 - alpha))
         for aj, wj in zip(a, w)]
    valid = [j for j in range(len(s)) if s[j] >= EPS]
    act_outlier = max((np.float32(a[j] / s[j]) for j in valid), default=None)
    wts_outlier = max((np.float32(w[j] * s[j]) for j in valid), default=None)
    result = []
    for aj, wj, sj in zip(a, w, s):
        if aj < EPS and wj < EPS:
            sj = np.float32(1.0)
        elif aj < EPS:
            sj = np.float32(wts_outlier / wj)
        elif wj < EPS:
            sj = np.float32(aj / act_outlier)
        if not EPS < sj < np.float32(1.0) / EPS:
            raise ValueError(f"factor {sj} out of range")
        result.append(float(sj))
    return result


def force_fp16_reference(scale: float) -> float:
    """FORCE_FP16_QUANT rounding of one scale."""
    s = np.float32(scale)
    if s > 65504 or s < np.float32(2.0**-14):
        root = np.float32(np.float16(np.sqrt(s)))
        return float(np.float32(root * root))
    return float(np.float32(np.float16(s)))


def fuse_reference(conv: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Fused weight and bias, output channel by output channel (float32)."""
    w = conv.weight.detach().to(torch.float32).numpy()
    b = np.zeros(w.shape[0], np.float32) if conv.bias is None else conv.bias.detach().numpy()
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    eps = np.float32(bn.eps)
    fused_w, fused_b = np.empty_like(w), np.empty_like(b)
    for o in range(w.shape[0]):
        rs = np.float32(1.0) / np.sqrt(np.float32(var[o] + eps))
        fused_w[o] = w[o] * np.float32(gamma[o] * rs)
        fused_b[o] = np.float32((b[o] - mean[o]) * rs * gamma[o] + beta[o])
    return torch.from_numpy(fused_w), torch.from_numpy(fused_b)


def _fuse(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        weight, bias = fuse_reference(conv, bn)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, child = bn_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, nn.Identity())


def _input_shape_factor(f: Tensor, layer_type: str, x: Tensor) -> Tensor:
    return f if layer_type == "Linear" else f.reshape(-1, *([1] * (x.dim() - 2)))


def _balance(weight: Tensor, f: Sequence[float], layer_type: str, groups: int) -> Tensor:
    """`W * f` along the input channels, one input channel at a time."""
    w = weight.detach().to(torch.float32).clone()
    for c, fc in enumerate(f):
        if layer_type == "Linear":
            w[:, c] *= fc
        elif layer_type == "ConvTranspose2d":
            w[c] *= fc
        else:
            c_in_g, c_out_g = w.shape[1], w.shape[0] // groups
            g, j = divmod(c, c_in_g)
            w[g * c_out_g : (g + 1) * c_out_g, j] *= fc
    return w


def calibrate_reference(
    model: nn.Module, config: dict[str, Any], batches: Sequence[Tensor], fuse: Sequence[tuple[str, str]] = ()
) -> dict[str, dict[str, Any]]:
    """Every enabled layer's record fields for a PTQ JSON `config`, `batches` (model(x) each) and the BN `fuse` pairs."""
    model = copy.deepcopy(model).eval()
    _fuse(model, fuse)
    modules = dict(model.named_modules())
    layers = {n: e for n, e in config.items() if isinstance(e, dict) and e.get("quant_enable")}
    first: dict[str, Tensor] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: first.setdefault(n, a[0])) for n in layers]
    with torch.no_grad():
        model(batches[0])
    for h in hooks:
        h.remove()
    factors: dict[str, Tensor] = {}
    result: dict[str, dict[str, Any]] = {}
    for name, entry in layers.items():
        module, kind = modules[name], _TYPES[type(modules[name])]
        fields: dict[str, Any] = {"act_type": "INT8"}
        if kind == "AvgPool2d":
            fields.update(scale_w=[1.0], offset_w=[0])
        else:
            groups = getattr(module, "groups", 1)
            weight = module.weight.detach().to(torch.float32)
            if "dmq_balancer_param" in entry:
                f = dmq_reference(act_absmax_reference(first[name], kind),
                                  weight_absmax_reference(weight, kind, groups), entry["dmq_balancer_param"])
                factors[name] = torch.tensor(f, dtype=torch.float32)
                fields["tensor_balance_factor"] = f
                weight = _balance(weight, f, kind, groups)
            wq = entry["weight_quant_params"]
            scales, quantized = arq_reference(weight, kind, groups, wq["num_bits"], wq["channel_wise"])
            module.weight = nn.Parameter(quantized, requires_grad=False)
            fields.update(scale_w=scales, offset_w=[0] * len(scales), wts_type=f"INT{wq['num_bits']}")
        result[name] = fields
    seen: dict[str, list[Tensor]] = {n: [] for n in layers}

    def divide_and_keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            x = args[0]
            if name in factors:
                x = x / _input_shape_factor(factors[name], _TYPES[type(module)], x)
            seen[name].append(x.clone())
            return (x, *args[1:])

        return hook

    hooks = [modules[n].register_forward_pre_hook(divide_and_keep(n)) for n in layers]
    with torch.no_grad():
        for x in batches[: config.get("batch_num", 1)]:
            model(x)
    for h in hooks:
        h.remove()
    for name, entry in layers.items():
        act = entry["activation_quant_params"]
        if act["act_algo"] == "hfmg":
            scales, offsets = hfmg_reference(seen[name], granularity=0, asymmetric=act["asymmetric"],
                                             num_of_bins=act["num_of_bins"])
        else:
            scales, offsets = ifmr_reference(
                seen[name], granularity=0, asymmetric=act["asymmetric"], max_percentile=act["max_percentile"],
                min_percentile=act["min_percentile"], search_range=tuple(act["search_range"]),
                search_step=act["search_step"],
            )
        scale = scales[0]
        if config.get("fakequant_precision_mode") == "FORCE_FP16_QUANT":
            scale = force_fp16_reference(scale)
        result[name].update(scale_d=scale, offset_d=offsets[0])
    return result
