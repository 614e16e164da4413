"""Which Linear layers of a model are key/value projections, and which are fused query/key/value ones.

Fused detection is structural: a layer whose parent looks like an attention module, which has no
separate `k_proj`/`v_proj` (or `key`/`value`) children, and whose output width equals the
query+key+value width read from the parent or its `config` (GPT-NeoX and Falcon
`query_key_value`, Phi-3 `qkv_proj`, GPT-2 `c_attn`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from kvcal.errors import ConfigError

__all__ = ["LinearInfo", "Role", "fused_qkv_reason", "linear_layers"]

Role = Literal["key", "value", "fused_qkv", "other"]

_ROLES: dict[str, Role] = {"k_proj": "key", "key": "key", "v_proj": "value", "value": "value"}


@dataclass(frozen=True)
class LinearInfo:
    """One nn.Linear of a model.

    Attributes:
        name: Qualified module name.
        in_features: Input width.
        out_features: Output width.
        role: "key"/"value" for a k_proj/v_proj (or BERT-style key/value) child of an attention
            module, "fused_qkv" for a fused query/key/value projection, else "other".
    """

    name: str
    in_features: int
    out_features: int
    role: Role


def linear_layers(model: nn.Module) -> list[LinearInfo]:
    """Every nn.Linear (subclasses included) of the model, in `named_modules()` order, with its role.

    Only nn.Linear modules are listed: transformers' GPT-2 style `Conv1D` (e.g. GPT-2 `c_attn`)
    is not an nn.Linear and is left out, though `fused_qkv_reason` still recognises it.
    """
    modules = dict(model.named_modules())
    return [
        LinearInfo(name, module.in_features, module.out_features, _role(modules, name))
        for name, module in modules.items()
        if isinstance(module, nn.Linear)
    ]


def fused_qkv_reason(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> str | None:
    """None, or a message for a layer that is a fused query/key/value projection.

    `modules` is `dict(model.named_modules())` when the caller already has it.

    Raises:
        ConfigError: The model has no module called `name`.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    if name not in modules:
        raise ConfigError(f"layer {name}: no module of that name in the model")
    if not _is_fused(modules, name):
        return None
    return (
        f"layer {name} is a fused query/key/value projection ({_out_width(modules[name])} output channels): "
        "its output mixes queries, keys and values, so one INT8 scale/offset entry would mix them. "
        "Calibrate a model/architecture with separate k_proj/v_proj layers, or split the output into "
        "key and value tensors and calibrate those with the QuantCalibrationOp API."
    )


def _role(modules: Mapping[str, nn.Module], name: str) -> Role:
    parent_name, _, child = name.rpartition(".")
    if child in _ROLES and _looks_like_attention(parent_name, modules[parent_name]):
        return _ROLES[child]
    return "fused_qkv" if _is_fused(modules, name) else "other"


def _looks_like_attention(name: str, module: nn.Module) -> bool:
    """Whether the module's class name or own name says attention (`...Attention`, `self_attn`, ...)."""
    text = f"{type(module).__name__} {name.rpartition('.')[2]}".lower()
    return "attn" in text or "attention" in text


def _out_width(module: nn.Module) -> int | None:
    """Output width of an nn.Linear (`out_features`) or a transformers Conv1D (`nf`)."""
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_fused(modules: Mapping[str, nn.Module], name: str) -> bool:
    width = _out_width(modules[name])
    parent_name = name.rpartition(".")[0]
    parent = modules[parent_name]
    if width is None or not parent_name or not _looks_like_attention(parent_name, parent):
        return False
    if any(isinstance(getattr(parent, child, None), nn.Module) for child in _ROLES):
        return False
    return width in _qkv_widths(parent, modules[name])


def _first_int(sources: tuple[Any, ...], *names: str) -> int | None:
    """The first positive int attribute among `names`, looked up on each source in turn."""
    for source in sources:
        for attr in names:
            value = getattr(source, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _qkv_widths(attention: nn.Module, layer: nn.Module) -> set[int]:
    """Possible query+key+value output widths of the attention's fused projection."""
    sources = (attention, getattr(attention, "config", None))
    hidden = _first_int(sources, "hidden_size", "embed_dim", "n_embd") or _first_int((layer,), "in_features", "nx")
    heads = _first_int(sources, "num_heads", "num_attention_heads", "n_head")
    if heads is None:
        return {3 * hidden} if hidden else set()
    head_dim = _first_int(sources, "head_dim", "head_size") or (hidden // heads if hidden else None)
    if head_dim is None:
        return set()
    kv_heads = {heads, _first_int(sources, "num_key_value_heads", "num_kv_heads", "n_kv_heads") or heads}
    if any(getattr(source, "multi_query", False) is True for source in sources):
        kv_heads.add(1)  # Falcon multi-query: one shared key/value head
    return {(heads + 2 * kv) * head_dim for kv in kv_heads}
