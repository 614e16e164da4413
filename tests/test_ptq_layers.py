"""PTQ layer discovery (kvcal.ptq.layers): every exclusion of PTQ.md §2, the input forms, and a
model left exactly as it was — also when its forward pass raises."""

from __future__ import annotations

import pytest
import torch
from ptq_helpers import (
    one_torch_thread,  # noqa: F401
    ptq_models,
)
from torch import Tensor, nn

from kvcal.errors import ConfigError
from kvcal.ptq.layers import discover_layers, split_input

pm = ptq_models()


def test_quantizable_layers_in_model_order() -> None:
    found = discover_layers(pm.build(), pm.sample())
    assert dict(found.layers) == pm.QUANTIZABLE
    assert list(found.layers) == ["conv", "deconv", "pool", "conv3d", "layer2", "layer10"]
    assert [m.name for m in found.excluded] == list(pm.EXCLUDED)


@pytest.mark.parametrize(
    ("name", "type_name", "reason"),
    [
        ("reused", "Linear", "runs 2 times in one forward pass (a reused module)"),
        ("unused", "Linear", "never runs in the forward pass of the sample input"),
        ("shared_a", "Linear", "its weight is shared with 'shared_b'"),
        ("shared_b", "Linear", "its weight is shared with 'shared_a'"),
        ("reflect", "Conv2d", "padding_mode 'reflect' (only 'zeros' is quantizable)"),
        ("dilated", "Conv3d", "dilation (2, 1, 1) (a Conv3d needs dilation[0] == 1)"),
        ("unbatched", "Conv2d", "unbatched input: 3-D, a Conv2d needs 4-D"),
        ("sub", "SubLinear", "a subclass of torch.nn.Linear (only the exact class is quantizable)"),
    ],
)
def test_each_exclusion_is_reported_with_its_reason(name: str, type_name: str, reason: str) -> None:
    found = discover_layers(pm.build(), pm.sample())
    excluded = {m.name: m for m in found.excluded}
    assert excluded[name].type_name == type_name
    assert excluded[name].reason == reason
    assert name not in found.layers
    assert found.why_not_quantizable(name) == f"is a {type_name} that is not quantizable: {reason}"


def test_several_reasons_and_other_conv_types() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.both = nn.Conv2d(2, 2, 1, padding_mode="circular")  # also never run
            self.conv1d = nn.Conv1d(2, 2, 1)
            self.relu = nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.relu(self.conv1d(x))

    found = discover_layers(Net(), torch.zeros(1, 2, 3))
    assert {m.name: m.reason for m in found.excluded} == {
        "both": "padding_mode 'circular' (only 'zeros' is quantizable); never runs in the forward pass of the "
        "sample input",
        "conv1d": "Conv1d is not a quantizable type (only Linear, Conv2d, Conv3d, ConvTranspose2d, AvgPool2d)",
    }
    assert found.why_not_quantizable("relu").startswith("is a ReLU, not one of the quantizable types")
    assert found.missing("rleu") == "'rleu' does not exist in the model; did you mean 'relu'?"


class KwargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.a(x)
        return out if y is None else out + self.b(y)


@pytest.mark.parametrize(
    ("make_input", "layers"),
    [
        (lambda x: x, ["a"]),
        (lambda x: (x,), ["a"]),
        (lambda x: (x, x), ["a", "b"]),
        (lambda x: {"x": x, "y": x}, ["a", "b"]),
        (lambda x: {"x": x}, ["a"]),
    ],
    ids=["tensor", "tuple-1", "tuple-2", "dict", "dict-1"],
)
def test_input_forms(make_input, layers: list[str]) -> None:  # type: ignore[no-untyped-def]
    found = discover_layers(KwargsNet(), make_input(torch.zeros(2, 4)))
    assert list(found.layers) == layers


@pytest.mark.parametrize("bad", [[torch.zeros(1)], 3, None, {1: torch.zeros(1)}])
def test_other_input_types_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="input_data"):
        split_input(bad)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        discover_layers("model", torch.zeros(1))  # type: ignore[arg-type]


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": {k: id(v) for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": [
            (list(m._forward_pre_hooks), list(m._forward_hooks), list(m._forward_pre_hooks_with_kwargs))
            for m in model.modules()
        ],
    }


def _assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = _snapshot(model)
    assert after["params"] == before["params"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    state_before, state_after = before["state"], after["state"]
    assert state_before.keys() == state_after.keys()  # type: ignore[union-attr]
    for key, value in state_before.items():  # type: ignore[union-attr]
        assert torch.equal(value, state_after[key]), key  # type: ignore[index]


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = pm.build().train()
    model.bn.eval()  # a mixed mode must come back mixed
    calls: list[str] = []
    model.conv.register_forward_hook(lambda module, args, out: calls.append("user hook"))
    before = _snapshot(model)
    rng = torch.get_rng_state()
    found = discover_layers(model, pm.sample())
    _assert_unchanged(model, before)
    assert int(model.counter.calls) == 0  # the forward pass changed the buffer; it was restored
    assert calls == ["user hook"]  # the user's hook ran, and is still there
    assert torch.equal(torch.get_rng_state(), rng)
    assert "conv" in found.layers  # the pass ran in eval mode: BatchNorm statistics untouched


def test_a_raising_forward_is_a_clear_error_and_changes_nothing() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.view(3, 7))

    model = Broken().train()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"^sample\.pt: the model's forward pass raised RuntimeError: "):
        discover_layers(model, torch.zeros(2, 4), source="sample.pt")
    _assert_unchanged(model, before)
