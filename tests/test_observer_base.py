"""The Observer contract shared by all algorithms: validation, batch counting, merge."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from kvcal.errors import CalibrationError
from kvcal.observers.base import Observer
from kvcal.observers.ifmr import IfmrObserver
from kvcal.params import IfmrParams, QuantSettings
from kvcal.quant import QParams


class RecordingObserver(Observer):
    """A test double: remembers exactly what the base class hands to the algorithm."""

    def __init__(self, settings: QuantSettings, name: str = "") -> None:
        super().__init__(settings, name)
        self.seen: list[Tensor] = []

    def _accumulate(self, x: Tensor, low: Tensor, high: Tensor) -> None:
        self.seen.append(x)

    def _compute(self) -> QParams:
        channels = self.channels or 0
        return QParams(torch.ones(channels), torch.zeros(channels, dtype=torch.int32))

    def _merge(self, other: Observer) -> None:
        assert isinstance(other, RecordingObserver)
        self.seen.extend(other.seen)


def make_settings(granularity: int = 0, batch_num: int = 1, asymmetric: bool = True) -> QuantSettings:
    return QuantSettings(IfmrParams(), granularity=granularity, asymmetric=asymmetric, batch_num=batch_num)


Factory = Callable[[QuantSettings, str], Observer]
FACTORIES: list[Factory] = [RecordingObserver, IfmrObserver]
FACTORY_IDS = ["recording", "ifmr"]


# --- what reaches the algorithm -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_tensor_layout_and_dtype(dtype: torch.dtype) -> None:
    observer = RecordingObserver(make_settings(0))
    x = torch.randn(2, 3, 4).to(dtype)
    assert observer.update(x) is None  # type: ignore[func-returns-value]
    (seen,) = observer.seen
    assert seen.shape == (1, 24)
    assert seen.dtype == dtype
    assert torch.equal(seen.reshape(-1), x.reshape(-1))
    assert observer.channels == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_channel_layout_and_dtype(dtype: torch.dtype) -> None:
    observer = RecordingObserver(make_settings(1))
    x = torch.randn(2, 3, 4).to(dtype)
    observer.update(x)
    (seen,) = observer.seen
    assert seen.shape == (4, 6)
    assert seen.dtype == dtype
    for c in range(4):
        assert torch.equal(seen[c], x[..., c].reshape(-1))
    assert observer.channels == 4


def test_update_detaches() -> None:
    observer = RecordingObserver(make_settings(0))
    observer.update(torch.randn(3, requires_grad=True))
    assert not observer.seen[0].requires_grad


def test_per_tensor_scalar_is_one_value() -> None:
    observer = RecordingObserver(make_settings(0))
    observer.update(torch.tensor(2.5))
    assert observer.seen[0].tolist() == [[2.5]]


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_rejects_dtype(factory: Factory, dtype: torch.dtype) -> None:
    observer = factory(make_settings(1), "layers.0.k_proj")
    with pytest.raises(TypeError, match=rf"'layers\.0\.k_proj'.*{dtype}"):
        observer.update(torch.zeros(2, 3, dtype=dtype))
    assert observer.batches_seen == 0
    assert observer.channels is None


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, None])
def test_rejects_non_tensor(factory: Factory, value: object) -> None:
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        factory(make_settings(), "v_proj").update(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rejects_non_finite(factory: Factory, bad: float, dtype: torch.dtype) -> None:
    observer = factory(make_settings(0, batch_num=2), "model.layers.1.self_attn.v_proj")
    observer.update(torch.ones(4, dtype=dtype))
    x = torch.ones(2, 4, dtype=dtype)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match=r"'model\.layers\.1\.self_attn\.v_proj': batch 2 .*NaN or inf"):
        observer.update(x)
    assert observer.batches_seen == 1


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
@pytest.mark.parametrize("granularity", [0, 1])
def test_rejects_empty(factory: Factory, granularity: int) -> None:
    observer = factory(make_settings(granularity), "k")
    with pytest.raises(CalibrationError, match=r"empty tensor \(shape \(0, 4\)\)"):
        observer.update(torch.zeros(0, 4))
    assert observer.batches_seen == 0


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_per_channel_rejects_scalar(factory: Factory) -> None:
    with pytest.raises(CalibrationError, match="last dimension"):
        factory(make_settings(1), "k").update(torch.tensor(1.0))


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_channel_mismatch_keeps_state(factory: Factory) -> None:
    observer = factory(make_settings(1, batch_num=2), "layers.2.k_proj")
    observer.update(torch.ones(3, 4))
    with pytest.raises(CalibrationError, match=r"'layers\.2\.k_proj': batch 2 has 5 channels.*had 4"):
        observer.update(torch.ones(3, 5))
    assert observer.batches_seen == 1
    assert observer.channels == 4
    observer.update(torch.ones(7, 4))
    assert observer.complete


def test_per_tensor_allows_any_shapes() -> None:
    observer = RecordingObserver(make_settings(0, batch_num=2))
    observer.update(torch.ones(3, 4))
    observer.update(torch.ones(5))
    assert [s.shape for s in observer.seen] == [(1, 12), (1, 5)]


def test_anonymous_observer_messages() -> None:
    with pytest.raises(TypeError, match="^observer: "):
        RecordingObserver(make_settings()).update(torch.zeros(2, dtype=torch.float64))


# --- batch counting -------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_compute_needs_batch_num_batches(factory: Factory) -> None:
    observer = factory(make_settings(0, batch_num=2), "layers.0.v_proj")
    with pytest.raises(CalibrationError, match=r"'layers\.0\.v_proj': saw 0 of the 2"):
        observer.compute()
    observer.update(torch.ones(3))
    assert not observer.complete
    with pytest.raises(CalibrationError, match="saw 1 of the 2"):
        observer.compute()
    observer.update(torch.ones(3))
    assert observer.complete
    assert observer.compute().channels == 1


def test_batches_past_batch_num_never_reach_the_algorithm() -> None:
    observer = RecordingObserver(make_settings(1, batch_num=1))
    observer.update(torch.ones(2, 3))
    observer.update(torch.ones(2, 3))
    # Past batch_num data passes through untouched: not even checked for NaN or shape...
    observer.update(torch.full((2, 5), math.nan))
    assert observer.batches_seen == 1
    assert len(observer.seen) == 1
    # ...but a dtype that could never be calibrated is still reported.
    with pytest.raises(TypeError):
        observer.update(torch.ones(2, 3, dtype=torch.float64))


# --- merge ----------------------------------------------------------------------------


def test_merge_appends_in_order() -> None:
    settings = make_settings(1, batch_num=3)
    left, right = RecordingObserver(settings), RecordingObserver(settings)
    a, b, c = torch.ones(2, 3), torch.zeros(4, 3), torch.full((1, 3), 2.0)
    left.update(a)
    right.update(b)
    right.update(c)
    left.merge(right)
    assert left.batches_seen == 3
    assert left.complete
    assert [s.shape[1] for s in left.seen] == [2, 4, 1]


def test_merge_into_empty_takes_channels() -> None:
    settings = make_settings(1)
    left, right = RecordingObserver(settings), RecordingObserver(settings)
    right.update(torch.ones(2, 6))
    left.merge(right)
    assert left.channels == 6
    assert left.batches_seen == 1


def test_merge_of_empty_is_a_no_op() -> None:
    settings = make_settings(1)
    left = RecordingObserver(settings)
    left.update(torch.ones(2, 6))
    left.merge(RecordingObserver(settings))
    assert left.batches_seen == 1
    assert len(left.seen) == 1


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_merge_rejects_other_settings(factory: Factory) -> None:
    left = factory(make_settings(1, asymmetric=True), "k")
    right = factory(make_settings(1, asymmetric=False), "k")
    right.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="different settings"):
        left.merge(right)
    assert left.batches_seen == 0


def test_merge_rejects_other_observer_type() -> None:
    settings = make_settings(0)
    ifmr = IfmrObserver(settings)
    ifmr.update(torch.ones(3))
    with pytest.raises(ValueError, match="different settings"):
        RecordingObserver(settings).merge(ifmr)


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_merge_rejects_other_channel_count(factory: Factory) -> None:
    settings = make_settings(1, batch_num=2)
    left, right = factory(settings, "k_proj"), factory(settings, "k_proj")
    left.update(torch.ones(2, 3))
    right.update(torch.ones(2, 4))
    with pytest.raises(CalibrationError, match="'k_proj': cannot merge 4 channels into 3"):
        left.merge(right)
    assert left.batches_seen == 1
