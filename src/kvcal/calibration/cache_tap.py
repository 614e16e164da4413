"""Observe the key/value tensors that transformers attention modules write into their KV cache.

A transformers attention module `P` (with an int `layer_idx`) calls
`cache.update(key_states, value_states, P.layer_idx, ...)` with tensors shaped
`[batch, kv_heads, seq, head_dim]`: keys after RoPE and after any q/k norm. The projection
outputs `P.k_proj` / `P.v_proj` are not what the cache stores, so the tap watches `update`.

How: a forward pre-hook on each configured `P` finds the `Cache` objects among P's arguments
(the kwarg is `cache` in transformers 5.x, `layer_past` in GPT-NeoX/Falcon; any name works)
and shadows `update` on those instances only; an always-called forward hook restores them when
P's forward returns or raises. Classes are never patched, the arguments are passed through
unchanged (identity and `isinstance` checks keep working), and the model's outputs are unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kvcal.errors import CalibrationError, ConfigError

__all__ = ["CacheSlot", "CacheTap", "cache_slots", "has_cache_tap"]

Kind = Literal["key", "value"]

_KINDS: dict[str, Kind] = {"k_proj": "key", "v_proj": "value"}
_PROJ_HINT = "use `--tap proj` to calibrate the Linear output instead"
# An EncoderDecoderCache is written through these sub-caches, never through its own `update`.
_SUB_CACHES = ("self_attention_cache", "cross_attention_cache")


@dataclass(frozen=True)
class CacheSlot:
    """The cache slot a configured k_proj/v_proj layer ends up in.

    Attributes:
        attention: Name of the parent attention module P that writes the cache.
        layer_idx: P's `layer_idx`, the index it passes to `cache.update`.
        kind: Whether the layer feeds the cached keys or the cached values.
    """

    attention: str
    layer_idx: int
    kind: Kind


def _layer_idx(module: nn.Module) -> int | None:
    """The module's `layer_idx` when it is an int (not a bool), else None."""
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else None


def cache_slots(model: nn.Module, layer_names: Sequence[str]) -> dict[str, CacheSlot]:
    """Map each configured layer (P.k_proj / P.v_proj) to the cache slot its parent attention writes.

    Args:
        model: The model the layers belong to.
        layer_names: Qualified module names, e.g. `model.layers.0.self_attn.k_proj`.

    Returns:
        One CacheSlot per layer name.

    Raises:
        ConfigError: A layer is missing, is not named k_proj/v_proj, or its parent has no int
            `layer_idx`; the message names the layer and suggests `--tap proj`.
    """
    modules = dict(model.named_modules())
    return {name: _slot(modules, name) for name in layer_names}


def _slot(modules: Mapping[str, nn.Module], name: str) -> CacheSlot:
    if name not in modules:
        raise ConfigError(f"layer {name}: no module of that name in the model")
    parent, _, child = name.rpartition(".")
    kind = _KINDS.get(child)
    if kind is None:
        raise ConfigError(
            f"layer {name}: the cache tap maps only the `k_proj`/`v_proj` child of an attention module "
            f"with an int `layer_idx` (this layer is `{child}`); {_PROJ_HINT}"
        )
    idx = _layer_idx(modules[parent]) if parent else None
    if idx is None:
        raise ConfigError(
            f"layer {name}: its parent module `{parent or '<model>'}` has no int `layer_idx`, so the "
            f"KV-cache slot it writes is unknown; {_PROJ_HINT}"
        )
    return CacheSlot(attention=parent, layer_idx=idx, kind=kind)


def has_cache_tap(model: nn.Module) -> bool:
    """Whether the cache tap applies: a transformers decoder whose attention layers write a Cache.

    True for a transformers `PreTrainedModel` (not encoder-decoder) with at least one module that
    has an int `layer_idx` and a `k_proj` or `v_proj` child. Never imports transformers: if it is
    not already imported, the model cannot be a transformers model.
    """
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None or not isinstance(model, pretrained):
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return any(
        _layer_idx(module) is not None and any(isinstance(getattr(module, c, None), nn.Module) for c in _KINDS)
        for module in model.modules()
    )


@dataclass(frozen=True)
class _Target:
    """One tapped attention module: its cache index and the (layer name, kind) pairs it feeds."""

    layer_idx: int
    outputs: tuple[tuple[str, Kind], ...]


def _targets(slots: Mapping[str, CacheSlot]) -> dict[str, _Target]:
    grouped: dict[tuple[str, int], list[tuple[str, Kind]]] = {}
    for name, slot in slots.items():
        grouped.setdefault((slot.attention, slot.layer_idx), []).append((name, slot.kind))
    attentions = [attention for attention, _ in grouped]
    if len(set(attentions)) != len(attentions):
        raise ConfigError(f"cache slots give one attention module several layer_idx values: {dict(slots)}")
    return {attention: _Target(idx, tuple(outputs)) for (attention, idx), outputs in grouped.items()}


def _cache_type() -> type | None:
    """transformers' Cache base class, if transformers is imported (never imports it)."""
    return getattr(sys.modules.get("transformers.cache_utils"), "Cache", None)


def _caches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The Cache objects among a call's arguments (the sub-caches of an EncoderDecoderCache)."""
    cache_type = _cache_type()
    if cache_type is None:
        return []
    found: dict[int, Any] = {}
    for value in (*args, *kwargs.values()):
        if isinstance(value, cache_type):
            subs = [getattr(value, a, None) for a in _SUB_CACHES]
            for cache in [s for s in subs if isinstance(s, cache_type)] or [value]:
                found[id(cache)] = cache
    return list(found.values())


_Patch = tuple[Any, Any]  # (cache, the instance-level `update` it had before, or None)


def _patch(cache: Any, write: Callable[[int, Tensor, Tensor], None]) -> _Patch:
    """Shadow `cache.update` on this instance: call `write`, then the original update."""
    previous = vars(cache).get("update")
    delegate = cache.update

    def update(key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        write(layer_idx, key_states, value_states)
        return delegate(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = update
    return cache, previous


def _restore(patches: list[_Patch]) -> None:
    for cache, previous in reversed(patches):
        if previous is None:
            vars(cache).pop("update", None)
        else:
            cache.update = previous


def _channels(name: str, states: Tensor) -> Tensor:
    """`[batch, kv_heads, seq, head_dim]` -> `[batch, seq, kv_heads*head_dim]` (head-major channels)."""
    if states.dim() != 4:
        raise CalibrationError(
            f"layer {name}: the cache was written a {states.dim()}-D tensor {tuple(states.shape)}, "
            f"expected [batch, kv_heads, seq, head_dim]; {_PROJ_HINT}"
        )
    batch, heads, seq, head_dim = states.shape
    return states.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class CacheTap:
    """Context manager that reports the keys/values each configured attention writes to its cache.

    While active, `callback(layer_name, tensor)` is called for every configured layer each time
    its attention module calls `cache.update`, with exactly the tensor written, detached and laid
    out `[batch, seq, kv_heads*head_dim]`. The tensor may share memory with the cache: the callback
    must not modify it in place. Everything is removed on exit, also when an error is raised.
    Call the model with `call_kwargs(...)` so that a cache is written at all.
    """

    def __init__(
        self,
        model: nn.Module,
        slots: Mapping[str, CacheSlot],
        callback: Callable[[str, Tensor], None],
    ) -> None:
        self._model = model
        self._callback = callback
        self._targets = _targets(slots)
        self._handles: list[RemovableHandle] = []
        self._frames: list[list[_Patch]] = []  # one frame per tapped attention call in progress

    def call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A copy of the model-call kwargs with `use_cache=True` (overriding False): the cache must be written."""
        return {**kwargs, "use_cache": True}

    def __enter__(self) -> CacheTap:
        if self._handles:
            raise RuntimeError("this CacheTap is already active")
        modules = dict(self._model.named_modules())
        try:
            for attention, target in self._targets.items():
                module = modules.get(attention)
                if module is None:
                    raise ConfigError(f"cache tap: no attention module named {attention} in the model")
                hook = partial(self._before, target)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after, always_call=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._frames:
            _restore(self._frames.pop())

    def _before(self, target: _Target, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        write = partial(self._write, target)
        self._frames.append([_patch(cache, write) for cache in _caches(args, kwargs)])

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._frames:
            _restore(self._frames.pop())

    def _write(self, target: _Target, layer_idx: int, key_states: Tensor, value_states: Tensor) -> None:
        if layer_idx != target.layer_idx:
            return
        for name, kind in target.outputs:
            states = key_states if kind == "key" else value_states
            self._callback(name, _channels(name, states.detach()))
