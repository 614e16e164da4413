"""The reference for what a calibration hook sees: each named module's outputs, by plain forward hooks.

Importable by every test (tests/ is on sys.path): `from reference_capture import capture_outputs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["capture_outputs"]


def capture_outputs(
    model: nn.Module, names: Sequence[str], batches: Sequence[Tensor | Mapping[str, Tensor]]
) -> dict[str, list[Tensor]]:
    """Each named module's outputs over `batches`, by plain hooks (the reference).

    A tensor batch is the model's one argument; a mapping (a Hugging Face model's
    `input_ids`, `attention_mask`) is passed as keyword arguments.
    """
    outputs: dict[str, list[Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach().clone()))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**batch)
            else:
                model(batch)
    for handle in handles:
        handle.remove()
    return outputs
