"""Where calibration data is tapped, and how it reaches the observers.

A tap hands one tensor per configured layer and forward pass to `ObserverFeed.feed`,
channels last (`[batch, seq, C]` for a KV layer). The feed drops padded positions
(`attention_mask` 0), updates the layer's observer, keeps a sample of the last batch for
the summary and reports completion.

* `Tap.PROJ`: the configured Linear layer's output (AMCT's KV semantics), by a forward hook.
* `Tap.CACHE`: what the parent attention module writes into a transformers KV cache
  (keys after RoPE and q/k normalization), see `kvcal.calibration.cache_tap`.
* `Tap.AUTO`: `CACHE` when the model has a cache tap, else `PROJ`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kvcal.errors import CalibrationError
from kvcal.kv.plan import check_layers_in_model
from kvcal.observers import Observer
from kvcal.quant import Granularity, to_channels

__all__ = [
    "SQNR_SAMPLE_LIMIT",
    "Tap",
    "ActiveTap",
    "ObserverFeed",
    "LayerOutputTap",
    "KvCacheTap",
    "attach_tap",
    "resolve_tap",
    "batch_mask",
    "select_unmasked",
]

SQNR_SAMPLE_LIMIT = 1 << 20

CompleteCallback = Callable[[str, Observer], None]


class Tap(str, Enum):
    """Which tensor of a configured layer is observed."""

    AUTO = "auto"
    CACHE = "cache"
    PROJ = "proj"


def select_unmasked(x: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """`x` [batch, seq, ...] without the positions whose `mask` [batch, seq] is 0, as [n, ...].

    Raises:
        CalibrationError: the mask's shape does not match the first two dimensions of `x`.
    """
    if mask is None:
        return x
    if x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise CalibrationError(
            f"layer {name!r}: attention_mask of shape {tuple(mask.shape)} does not match its "
            f"[batch, seq, channels] data of shape {tuple(x.shape)}; padding cannot be excluded"
        )
    keep = mask.to(device=x.device) != 0
    if bool(keep.all()):
        return x  # nothing padded: no copy
    return x[keep]


def _sample(x: Tensor, granularity: Granularity, limit: int) -> Tensor:
    """An evenly strided copy of `x` as [channels, values], at most about `limit` values."""
    view = to_channels(x.detach(), granularity)
    stride = max(1, math.ceil(view.numel() / limit))
    return view[:, ::stride].clone()


class ObserverFeed:
    """Feeds tapped tensors to one observer per layer; shared by every tap.

    `mask` is the current batch's `attention_mask` (or None); the batch runner sets it
    before each forward pass.
    """

    def __init__(
        self,
        observers: Mapping[str, Observer],
        *,
        on_complete: CompleteCallback | None = None,
        keep_sample: bool = False,
        sample_limit: int = SQNR_SAMPLE_LIMIT,
    ) -> None:
        self.observers: dict[str, Observer] = dict(observers)
        self.samples: dict[str, Tensor] = {}
        self.mask: Tensor | None = None
        self._on_complete = on_complete
        self._keep_sample = keep_sample
        self._sample_limit = sample_limit

    @property
    def complete(self) -> bool:
        """True once every observed layer has seen its `batch_num` batches."""
        return all(observer.complete for observer in self.observers.values())

    def feed(self, name: str, x: Any) -> None:
        """One batch of layer `name`: padding dropped, then accumulated (ignored once complete)."""
        observer = self.observers[name]
        if observer.complete:
            return
        if isinstance(x, Tensor):
            x = select_unmasked(x.detach(), self.mask, name)
        try:
            observer.update(x)
        except TypeError as exc:
            # A float64 or integer output is a calibration problem, not a model crash.
            raise CalibrationError(str(exc)) from exc
        if observer.complete:
            if self._keep_sample:
                self.samples[name] = _sample(x, observer.settings.granularity, self._sample_limit)
            if self._on_complete is not None:
                self._on_complete(name, observer)


class ActiveTap(Protocol):
    """A tap attached to a model: feeds `feed` until `detach()` (also on leaving a `with`)."""

    tap: Tap
    feed: ObserverFeed

    def call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments to call the model with (the tap may need some set)."""
        ...

    def detach(self) -> None: ...

    def __enter__(self) -> ActiveTap: ...

    def __exit__(self, *exc_info: object) -> None: ...


class LayerOutputTap:
    """Forward hooks passing each configured module's output to the feed (`Tap.PROJ`).

    The hooks return nothing, so the model computes exactly what it did before. Use as a
    context manager, or call `detach()` (idempotent).
    """

    tap = Tap.PROJ

    def __init__(self, feed: ObserverFeed, modules: Mapping[str, nn.Module]) -> None:
        self.feed = feed
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.feed.feed(name, output)

        return hook

    def call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook; the observers and their state stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerOutputTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()


def batch_mask(kwargs: Mapping[str, Any]) -> Tensor | None:
    """The batch's `attention_mask` keyword tensor, if it has one."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None


class KvCacheTap:
    """What the parent attention modules write into a transformers KV cache (`Tap.CACHE`).

    Keys are observed after RoPE and q/k normalization, `[batch, seq, kv_heads * head_dim]`
    with head-major channels (the order of the `k_proj` output).
    """

    tap = Tap.CACHE

    def __init__(self, feed: ObserverFeed, model: nn.Module, names: Sequence[str]) -> None:
        from kvcal.calibration.cache_tap import CacheTap, cache_slots

        self.feed = feed
        self._cache_tap = CacheTap(model, cache_slots(model, names), feed.feed)
        self._cache_tap.__enter__()
        self._attached = True

    def call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._cache_tap.call_kwargs(kwargs)

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            self._cache_tap.__exit__(None, None, None)

    def __enter__(self) -> KvCacheTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()


def resolve_tap(model: nn.Module, tap: Tap) -> Tap:
    """`Tap.AUTO` → `CACHE` when the model writes a transformers KV cache, else `PROJ`."""
    if tap != Tap.AUTO:
        return tap
    from kvcal.calibration.cache_tap import has_cache_tap

    return Tap.CACHE if has_cache_tap(model) else Tap.PROJ


def attach_tap(model: nn.Module, names: Sequence[str], feed: ObserverFeed, tap: Tap) -> ActiveTap:
    """Attach `feed` to the layers `names` of `model` at `tap` (CACHE or PROJ).

    Raises:
        ConfigError: a layer that is missing, not a Linear, or that the tap cannot map.
    """
    check_layers_in_model(names, model, "calibration plan")
    if tap == Tap.CACHE:
        return KvCacheTap(feed, model, names)
    modules = dict(model.named_modules())
    return LayerOutputTap(feed, {name: modules[name] for name in names})
