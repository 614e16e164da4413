"""PTQ calibration of a calibration copy (PTQ.md §4–§6): the engine that both front doors drive.

On a copy of the user's model (`kvcal.ptq.model_copy`), batch by batch:

1. **First pass** (the first batch through the untouched copy): layer discovery — the
   config is then read and validated against it —, the Conv→BatchNorm consumers, the
   float model output (the reference of the model SQNR) and, for the layers the config
   gives DMQ, the input's per-channel abs-max. Then BN fusion (`kvcal.ptq.fusion`).
2. **DMQ pass**, only when a DMQ layer's statistics could not come from the first pass
   (a pair was fused): the first batch through the fused, still float copy. Then, per
   enabled layer: DMQ factors and `W * f`, ARQ scales, and the copy's weight becomes its
   fake-quantized value, so that downstream activations see upstream weight quantization.
3. **Observed passes**, batches 1…batch_num: each enabled layer's input, divided by `f`
   with DMQ, feeds a per-tensor IFMR/HFMG observer (the same observers as the KV path).
4. **Evaluation pass**: activation factors (FORCE_FP16 rounding where configured), then
   the first batch once more with every enabled layer's input fake-quantized too (the
   model SQNR), and the per-layer SQNR of PTQ.md §6 from the kept inputs.

After that the copy keeps dividing DMQ layers' inputs by `f` (its weights hold `W * f`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvcal.calibration.runner import forward_batch
from kvcal.dataset import Batch
from kvcal.errors import CalibrationError
from kvcal.observers import Observer, make_observer
from kvcal.params import QuantSettings
from kvcal.ptq.config_json import read_config
from kvcal.ptq.fusion import FusedPair, FusionWatch, fuse_pairs
from kvcal.ptq.layers import LAYER_TYPES, Discovery, LayerType, discover_layers
from kvcal.ptq.model_copy import calibration_copy
from kvcal.ptq.plan import (
    CHANNEL_WISE_TYPES,
    FORCE_FP16_QUANT,
    ArqParams,
    LayerSettings,
    PtqPlan,
)
from kvcal.ptq.preview import ConfigPreview
from kvcal.ptq.summary import (
    PtqLayerSummary,
    fake_quant_input,
    input_clipped,
    layer_output_sqnr,
    leading_samples,
    output_sqnr,
)
from kvcal.ptq.weights import (
    activation_channel_absmax,
    arq_scales,
    balance_weight,
    balanced_input_view,
    dmq_factors,
    fake_quant_weight,
    force_fp16,
    input_rows,
    output_rows,
)
from kvcal.quant import Granularity, QParams, sqnr_db
from kvcal.record.ptq_value import PtqFactors

__all__ = ["Mode", "PtqSession"]

logger = logging.getLogger(__name__)

_TYPE_OF_CLASS: dict[type[nn.Module], LayerType] = {cls: name for name, cls in LAYER_TYPES.items()}


class Mode(enum.Enum):
    """What the layer-input hooks do."""

    OFF = "off"  # nothing (the copy is still float, or kvcal itself is calling a layer)
    OBSERVE = "observe"  # divide by f, feed the observer
    QUANTIZE = "quantize"  # divide by f, fake-quantize
    PASS = "pass"  # divide by f


@dataclass(eq=False)
class LayerState:
    """One enabled layer during calibration."""

    settings: LayerSettings
    module: nn.Module
    observer: Observer
    weight: ArqParams | None  # None: no weight (AvgPool2d)
    factor: Tensor | None = None  # DMQ f [C_in], on the copy's device
    scale_w: Tensor | None = None
    float_weight: Tensor | None = None  # W (fused, × f) before ARQ, on the CPU
    weight_sqnr: float = math.nan
    sample: Tensor | None = None  # leading samples of the last observed input
    act: QParams | None = None


class _InputAbsMax:
    """Forward pre-hooks that record each named layer's per-channel input abs-max on its first call."""

    def __init__(self, modules: dict[str, tuple[nn.Module, LayerType]]) -> None:
        self.absmax: dict[str, Tensor] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name, kind), with_kwargs=True)
                         for name, (module, kind) in modules.items()]

    def _hook(self, name: str, kind: LayerType) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor) and name not in self.absmax:
                self.absmax[name] = activation_channel_absmax(x, kind)

        return hook

    def __enter__(self) -> _InputAbsMax:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _FirstPass:
    discovery: Discovery
    watch: FusionWatch | None
    output: Any
    absmax: dict[str, Tensor] = field(default_factory=dict)


def _first_pass(copy: nn.Module, batch: Batch, preview: ConfigPreview) -> _FirstPass:
    """Discovery, fusion consumers, float output and the preview's DMQ statistics, in one forward pass."""
    modules = dict(copy.named_modules())
    dmq = {
        name: (modules[name], _TYPE_OF_CLASS[type(modules[name])])
        for name in preview.dmq_layers
        if name in modules and type(modules[name]) in _TYPE_OF_CLASS and type(modules[name]) is not nn.AvgPool2d
    }
    outputs: list[Any] = []
    handle = copy.register_forward_hook(lambda module, args, output: outputs.append(output))
    watch = FusionWatch(copy) if preview.do_fusion else None
    try:
        with watch or contextlib.nullcontext(), _InputAbsMax(dmq) as absmax:
            discovery = discover_layers(
                copy, batch.kwargs if batch.kwargs else batch.args, source=f"data file {batch.path}"
            )
    finally:
        handle.remove()
    return _FirstPass(discovery, watch, outputs[0] if outputs else None, absmax.absmax)


def _layer_state(settings: LayerSettings, module: nn.Module, batch_num: int) -> LayerState:
    observer = make_observer(
        QuantSettings(settings.act, Granularity.PER_TENSOR, settings.asymmetric, batch_num), settings.name
    )
    weight: ArqParams | None = None
    if settings.layer_type != "AvgPool2d":
        weight = settings.weight if isinstance(settings.weight, ArqParams) else None
        if weight is None:  # no weight_quant_params (ADA chosen for a type it does not apply to)
            weight = ArqParams(channel_wise=settings.layer_type in CHANNEL_WISE_TYPES)
            logger.warning(
                f"layer {settings.name!r} has no weight_quant_params: its weights are calibrated with ARQ "
                f"defaults ({weight.num_bits} bits, channel_wise {str(weight.channel_wise).lower()})"
            )
        parameter = module._parameters.get("weight")
        if not isinstance(parameter, Tensor) or not parameter.is_floating_point():
            raise CalibrationError(
                f"layer {settings.name!r}: its weight is not a floating-point parameter of the module "
                "(a parametrized or quantized module?); it cannot be calibrated"
            )
    return LayerState(settings, module, observer, weight)


def _quantize_weight(state: LayerState, absmax: Tensor | None) -> None:
    """DMQ (with `absmax`, the first batch's input per channel) and ARQ; the module's weight becomes fake-quantized."""
    if state.weight is None:
        return
    kind, module = state.settings.layer_type, state.module
    groups = int(getattr(module, "groups", 1))
    weight = module.weight.detach()
    if state.settings.dmq is not None and absmax is not None:
        wts_max = input_rows(weight.to(torch.float32), kind, groups).abs().amax(dim=1)
        state.factor = dmq_factors(absmax, wts_max, state.settings.dmq, state.settings.name)
        balanced = balance_weight(weight, state.factor, kind, groups)
    else:
        balanced = weight.to(torch.float32)  # the copy's own tensor, never changed in place: no second copy
    bits, channel_wise = state.weight.num_bits, state.weight.channel_wise
    scale = arq_scales(output_rows(balanced, kind, groups), bits, channel_wise)
    quantized = fake_quant_weight(balanced, scale, kind, groups, bits)
    state.weight_sqnr = sqnr_db(balanced, quantized)
    state.scale_w = scale.cpu()
    state.float_weight = balanced.cpu()
    module.weight = nn.Parameter(quantized.to(weight.dtype), requires_grad=False)


def _with_input(args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input": x}


class PtqSession:
    """One PTQ calibration of one calibration copy; `kvcal calibrate` and `create_ptq_cali_model` drive it.

    Use `start`, then `prepare` (runs the DMQ pass when `needs_dmq_pass`), `observe` each
    batch until `complete`, then `finish`. `copy` is the calibration copy (BN-fused).
    """

    def __init__(self, copy: nn.Module, plan: PtqPlan, first: _FirstPass, fused: tuple[FusedPair, ...],
                 batch: Batch) -> None:
        self.copy, self.plan, self.fused, self.first_batch = copy, plan, fused, batch
        self.mode = Mode.OFF
        self._first = first
        self._finished: tuple[dict[str, PtqFactors], tuple[PtqLayerSummary, ...], float] | None = None
        modules = dict(copy.named_modules())
        self.layers = {s.name: _layer_state(s, modules[s.name], plan.batch_num) for s in plan.enabled_layers}
        self._handles = [
            state.module.register_forward_pre_hook(self._hook(state), with_kwargs=True)
            for state in self.layers.values()
        ]

    @classmethod
    def start(cls, model: nn.Module, preview: ConfigPreview, batch: Batch, device: torch.device) -> PtqSession:
        """Copy `model` onto `device`, run the first pass on `batch`, read the config, fuse.

        Raises:
            ConfigError: the config does not match the model (or the model raises on `batch`).
            CalibrationError: the model cannot be copied onto `device`.
        """
        copy = calibration_copy(model, device)
        first = _first_pass(copy, batch, preview)
        plan = read_config(preview.source, first.discovery)
        pairs = first.watch.pairs(plan.skip_fusion_layers) if plan.do_fusion and first.watch is not None else []
        return cls(copy, plan, first, fuse_pairs(copy, pairs), batch)

    @property
    def dmq_layers(self) -> dict[str, LayerState]:
        return {name: s for name, s in self.layers.items() if s.settings.dmq is not None and s.weight is not None}

    @property
    def needs_dmq_pass(self) -> bool:
        """Whether `prepare` runs the first batch again (DMQ statistics on the fused float copy)."""
        return bool(self.dmq_layers) and (bool(self.fused) or any(n not in self._first.absmax for n in self.dmq_layers))

    @property
    def passes(self) -> int:
        """Forward passes from `prepare` on: the DMQ pass, batch_num observed passes, the evaluation pass."""
        return int(self.needs_dmq_pass) + self.plan.batch_num + 1

    def prepare(self) -> None:
        """DMQ factors (running the DMQ pass if needed), ARQ, and fake-quantized weights; then observe."""
        absmax = {} if self.needs_dmq_pass else dict(self._first.absmax)
        if self.needs_dmq_pass:
            watched = {n: (s.module, s.settings.layer_type) for n, s in self.dmq_layers.items()}
            with _InputAbsMax(watched) as watch:
                forward_batch(self.copy, self.first_batch)
            absmax = watch.absmax
        for name, state in self.layers.items():
            if name in self.dmq_layers and name not in absmax:
                raise CalibrationError(f"layer {name!r} did not run on data file {self.first_batch.path}: no DMQ factors")
            _quantize_weight(state, absmax.get(name))
        self.mode = Mode.OBSERVE

    def _hook(self, state: LayerState) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            mode = self.mode
            if mode is Mode.OFF:
                return None
            original = x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                return None
            if state.factor is not None:
                x = x / balanced_input_view(state.factor, state.settings.layer_type, x.dim()).to(x.dtype)
            if mode is Mode.OBSERVE:
                self._observe(state, x)
            elif mode is Mode.QUANTIZE and state.act is not None:
                x = fake_quant_input(x, state.act)
            return None if x is original else _with_input(args, kwargs, x)

        return hook

    @staticmethod
    def _observe(state: LayerState, x: Tensor) -> None:
        observer = state.observer
        if observer.complete:
            return
        try:
            observer.update(x)
        except TypeError as exc:  # a float64 or integer input is a calibration problem, not a model crash
            raise CalibrationError(str(exc)) from exc
        if observer.complete:
            state.sample = leading_samples(x)

    def observe(self, batch: Batch) -> Any:
        """One observed forward pass of the copy; its output."""
        return forward_batch(self.copy, batch)

    @property
    def complete(self) -> bool:
        return all(state.observer.complete for state in self.layers.values())

    def incomplete_message(self, files_run: int, files_total: int) -> str | None:
        """Why the observers are not complete after `files_run` batches, or None when they are."""
        short = [(n, s.observer.batches_seen) for n, s in self.layers.items() if not s.observer.complete]
        if not short:
            return None
        counts = ", ".join(f"{name!r} saw {seen} of {self.plan.batch_num}" for name, seen in short)
        return (
            f"layer inputs observed in fewer batches than batch_num={self.plan.batch_num} after {files_run} "
            f"of {files_total} data file(s): {counts} (does the layer run on every batch?); nothing was written"
        )

    def finish(self) -> tuple[dict[str, PtqFactors], tuple[PtqLayerSummary, ...], float]:
        """Activation factors, the evaluation pass, the SQNRs: (record values, summaries, model SQNR).

        Computed once; later calls return the same (a record write that failed can be retried).
        """
        if self._finished is None:
            self._finished = self._finish()
        return self._finished

    def _finish(self) -> tuple[dict[str, PtqFactors], tuple[PtqLayerSummary, ...], float]:
        for state in self.layers.values():
            qparams = state.observer.compute()
            scale = qparams.scale.detach().to(torch.float32)
            if self.plan.fakequant_precision_mode == FORCE_FP16_QUANT:
                scale = force_fp16(scale)
            state.act = QParams(scale, qparams.offset)
        self.mode = Mode.QUANTIZE
        try:
            quantized = forward_batch(self.copy, self.first_batch)
        finally:
            self.mode = Mode.OFF
        model_sqnr = output_sqnr(self._first.output, quantized)
        self._first.output = None
        acts = {name: state.act for name, state in self.layers.items() if state.act is not None}
        summaries = tuple(self._summary(state, acts[name]) for name, state in self.layers.items())
        self.mode = Mode.PASS
        return {name: _record_value(state, acts[name]) for name, state in self.layers.items()}, summaries, model_sqnr

    def _summary(self, state: LayerState, act: QParams) -> PtqLayerSummary:
        sample = state.sample
        if sample is None:
            input_sqnr = output_sqnr_db = clipped = math.nan
        else:
            input_sqnr = sqnr_db(sample, fake_quant_input(sample, act))
            clipped = input_clipped(sample, act)
            output_sqnr_db = layer_output_sqnr(state.module, sample, act, state.float_weight)
        scale_w = state.scale_w
        fused = next((pair.bn for pair in self.fused if pair.conv == state.settings.name), None)
        return PtqLayerSummary(
            name=state.settings.name,
            layer_type=state.settings.layer_type,
            algorithm=state.settings.act.algo,
            asymmetric=state.settings.asymmetric,
            batches=state.observer.batches_seen,
            scale_d=float(act.scale.reshape(-1)[0]),
            offset_d=int(act.offset.reshape(-1)[0]),
            weight_bits=None if state.weight is None else state.weight.num_bits,
            channel_wise=None if state.weight is None else state.weight.channel_wise,
            scale_w_min=None if scale_w is None else float(scale_w.min()),
            scale_w_max=None if scale_w is None else float(scale_w.max()),
            weight_channels=1 if scale_w is None else int(scale_w.numel()),
            balance_min=None if state.factor is None else float(state.factor.min()),
            balance_max=None if state.factor is None else float(state.factor.max()),
            fused_bn=fused,
            weight_sqnr_db=state.weight_sqnr,
            input_sqnr_db=input_sqnr,
            output_sqnr_db=output_sqnr_db,
            input_clipped=clipped,
        )

    def detach(self) -> None:
        """Remove the hooks from the copy (it then computes with fake-quantized weights only)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _record_value(state: LayerState, act: QParams) -> PtqFactors:
    factor = None if state.factor is None else tuple(state.factor.cpu().tolist())
    if state.weight is None or state.scale_w is None:
        scale_w: tuple[float, ...] = (1.0,)
        wts_type = None
    else:
        scale_w, wts_type = tuple(state.scale_w.tolist()), f"INT{state.weight.num_bits}"
    return PtqFactors(
        layer=state.settings.name,
        scale_d=float(act.scale.reshape(-1)[0]),
        offset_d=int(act.offset.reshape(-1)[0]),
        scale_w=scale_w,
        offset_w=(0,) * len(scale_w),
        tensor_balance_factor=factor,
        wts_type=wts_type,
    )
