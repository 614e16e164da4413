"""BN fusion on the calibration copy (PTQ.md §5): which pairs qualify, and the fused values."""

from __future__ import annotations

import torch
from ptq_helpers import one_torch_thread  # noqa: F401
from reference_ptq import fuse_reference
from torch import Tensor, nn

from kvcal.ptq.fusion import FusedPair, FusionWatch, fuse_pairs


def _bn(cls: type[nn.Module], n: int, **kwargs: object) -> nn.Module:
    bn = cls(n, **kwargs)
    if getattr(bn, "running_var", None) is not None:
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            if bn.weight is not None:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    return bn.eval()


class Pairs(nn.Module):
    """One conv→BN per case; `forward` returns a sum so every branch matters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Conv2d(3, 4, 3, padding=1)
        self.plain_bn = _bn(nn.BatchNorm2d, 4)
        self.no_bias = nn.Conv2d(3, 4, 1, bias=False)
        self.no_bias_bn = _bn(nn.BatchNorm2d, 4)
        self.twice = nn.Conv2d(3, 4, 1)  # its output also goes into an addition
        self.twice_bn = _bn(nn.BatchNorm2d, 4)
        self.module_consumer = nn.Conv2d(3, 4, 1)  # its output also goes into another module
        self.module_consumer_bn = _bn(nn.BatchNorm2d, 4)
        self.other = nn.ReLU()
        self.training_bn_conv = nn.Conv2d(3, 4, 1)
        self.training_bn = _bn(nn.BatchNorm2d, 4).train()
        self.no_affine_conv = nn.Conv2d(3, 4, 1)
        self.no_affine = _bn(nn.BatchNorm2d, 4, affine=False)
        self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.reflect_bn = _bn(nn.BatchNorm2d, 4)
        self.line = nn.Conv1d(3, 4, 1)
        self.line_bn = _bn(nn.BatchNorm1d, 4)
        self.volume = nn.Conv3d(1, 2, 1)
        self.volume_bn = _bn(nn.BatchNorm3d, 2)
        self.deconv = nn.ConvTranspose2d(3, 4, 1)  # ConvTranspose is not fused
        self.deconv_bn = _bn(nn.BatchNorm2d, 4)
        self.returned = nn.Conv2d(3, 4, 1)  # its output is also returned by the model
        self.returned_bn = _bn(nn.BatchNorm2d, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.plain_bn(self.plain(x)) + self.no_bias_bn(self.no_bias(x))
        y = self.twice(x)
        out = out + self.twice_bn(y) + y
        z = self.module_consumer(x)
        out = out + self.module_consumer_bn(z) + self.other(z)
        out = out + self.training_bn(self.training_bn_conv(x)) + self.no_affine(self.no_affine_conv(x))
        out = out + self.reflect_bn(self.reflect(x)) + self.deconv_bn(self.deconv(x))
        out = out + self.line_bn(self.line(x.flatten(2))).reshape(out.shape)
        out = out + self.volume_bn(self.volume(x[:, :1].unsqueeze(1))).mean()
        kept = self.returned(x)
        return out + self.returned_bn(kept), kept


FUSED = [("plain", "plain_bn"), ("no_bias", "no_bias_bn"), ("line", "line_bn"), ("volume", "volume_bn")]


def _model() -> Pairs:
    model = Pairs().eval()
    model.training_bn.train()
    return model


def _watch(model: nn.Module, channels: int = 3) -> FusionWatch:
    with torch.inference_mode(), FusionWatch(model) as watch:
        model(torch.randn(2, channels, 4, 4))
    return watch


def test_only_convolutions_whose_output_goes_only_into_an_eval_affine_bn_qualify() -> None:
    assert _watch(_model()).pairs() == FUSED


def test_the_same_bn_in_eval_mode_is_fused() -> None:
    pairs = _watch(Pairs().eval()).pairs()
    assert pairs == [*FUSED[:2], ("training_bn_conv", "training_bn"), *FUSED[2:]]


def test_skip_fusion_layers_are_not_fused() -> None:
    assert _watch(_model()).pairs(skip={"plain", "line"}) == [("no_bias", "no_bias_bn"), ("volume", "volume_bn")]


def test_fusion_keeps_the_output_and_uses_torch_formula() -> None:
    model = _model()
    model.training_bn = nn.Identity()  # a train-mode BN changes with every call
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = model(x)
        expected = {conv: fuse_reference(getattr(model, conv), getattr(model, bn)) for conv, bn in FUSED}
        watch = _watch(model)
        fused = fuse_pairs(model, watch.pairs())
        after = model(x)
    assert fused == tuple(FusedPair(conv, bn) for conv, bn in FUSED)
    for conv, bn in FUSED:
        assert isinstance(getattr(model, bn), nn.Identity)
        weight, bias = expected[conv]
        torch.testing.assert_close(getattr(model, conv).weight, weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(getattr(model, conv).bias, bias, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    assert isinstance(model.twice_bn, nn.BatchNorm2d) and isinstance(model.returned_bn, nn.BatchNorm2d)


def test_a_pair_whose_fused_values_are_not_finite_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), _bn(nn.BatchNorm2d, 2))
    with torch.no_grad():
        model[1].running_var.fill_(-1.0)  # rsqrt of a negative: NaN
        model[1].eps = 0.0
    pairs = _watch(model, 2).pairs()
    assert pairs == [("0", "1")]
    assert fuse_pairs(model, pairs) == ()
    assert isinstance(model[1], nn.BatchNorm2d)


def test_a_bn_that_runs_twice_is_not_fused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), _bn(nn.BatchNorm2d, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model = Shared().eval()
    with torch.inference_mode(), FusionWatch(model) as watch:
        model(torch.randn(1, 2, 3, 3))
    assert watch.pairs() == []


def test_shape_queries_are_not_uses() -> None:
    class Shapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), _bn(nn.BatchNorm2d, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            n, c = y.shape[0], y.size(1)
            return self.bn(y).reshape(n, c, -1) * y.dim()

    model = Shapes().eval()
    assert _watch(model, 2).pairs() == [("conv", "bn")]


def test_a_model_without_batchnorm_is_not_watched() -> None:
    watch = FusionWatch(nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert not watch.active
    with watch:
        pass
    assert watch.pairs() == []
