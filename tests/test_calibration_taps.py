"""The observer feed shared by every tap: padding removed, completion, samples."""

from __future__ import annotations

import pytest
import torch

from kvcal.calibration.taps import ObserverFeed, select_unmasked
from kvcal.errors import CalibrationError
from kvcal.observers import make_observer
from kvcal.params import HfmgParams, IfmrParams, QuantSettings
from kvcal.quant import Granularity, clipped_fraction


def settings(algo: str, granularity: Granularity) -> QuantSettings:
    params = HfmgParams(1024) if algo == "hfmg" else IfmrParams()
    return QuantSettings(params, granularity, asymmetric=True, batch_num=2)


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
@pytest.mark.parametrize("granularity", list(Granularity))
def test_padded_positions_with_extreme_values_change_nothing(algo: str, granularity: Granularity) -> None:
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(2, 6, 8, generator=gen) for _ in range(2)]
    masks = [torch.ones(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)]
    masks[0][1, :2] = 0  # left padding
    masks[1][0, 4:] = 0  # right padding
    padded = [x.clone() for x in real]
    for x, mask in zip(padded, masks):
        x[mask == 0] = 1e6  # padding that would dominate any range it entered

    feed = ObserverFeed({"k": make_observer(settings(algo, granularity), "k")})
    for x, mask in zip(padded, masks):
        feed.mask = mask
        feed.feed("k", x)
    expected = make_observer(settings(algo, granularity), "k")
    for x, mask in zip(real, masks):
        expected.update(x[mask != 0])
    assert feed.complete
    got, want = feed.observers["k"].compute(), expected.compute()
    assert torch.equal(got.scale, want.scale) and torch.equal(got.offset, want.offset)
    unmasked = ObserverFeed({"k": make_observer(settings(algo, granularity), "k")})
    for x in padded:
        unmasked.feed("k", x)
    assert not torch.equal(unmasked.observers["k"].compute().scale, want.scale)


def test_a_mask_that_does_not_fit_is_an_error_naming_the_layer() -> None:
    with pytest.raises(CalibrationError, match=r"layer 'k': attention_mask of shape \(2, 5\) does not match"):
        select_unmasked(torch.zeros(2, 6, 8), torch.ones(2, 5), "k")


def test_an_all_ones_mask_keeps_the_tensor_itself() -> None:
    x = torch.randn(2, 3, 4)
    assert select_unmasked(x, torch.ones(2, 3), "k") is x


def test_clipped_fraction_counts_codes_outside_the_range() -> None:
    from kvcal.quant import QParams

    qparams = QParams(torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32))
    x = torch.tensor([[-129.0, -128.4, 0.0, 127.4, 127.6, 300.0]])
    # -129 and 127.6 (rounds to 128) and 300 fall outside [-128, 127]; -128.4 rounds to -128.
    assert clipped_fraction(x, qparams) == pytest.approx(3 / 6)


def test_settings_keep_granularity_as_the_enum() -> None:
    for value in (1, "1", "per_channel", Granularity.PER_CHANNEL):
        s = QuantSettings(IfmrParams(), value)  # type: ignore[arg-type]
        assert s.granularity is Granularity.PER_CHANNEL
    observer = make_observer(QuantSettings(IfmrParams(), "per_channel"), "v")  # type: ignore[arg-type]
    observer.update(torch.randn(4, 5))
    assert observer.channels == 5 and observer.compute().channels == 5
