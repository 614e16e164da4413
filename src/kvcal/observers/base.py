"""The observer contract shared by IFMR and HFMG."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from kvcal.errors import CalibrationError
from kvcal.params import QuantSettings
from kvcal.quant import QParams, to_channels

__all__ = ["Observer"]

_ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Observer(ABC):
    """Accumulates one layer's activations and computes its INT8 factors.

    `update(x)` only accumulates (extra batches past `batch_num` are ignored);
    `compute()` is pure and idempotent; `merge(other)` folds in another observer of the
    same layer (data-parallel runs).
    """

    def __init__(self, settings: QuantSettings, name: str = "") -> None:
        self.settings = settings
        self.name = name
        self.batches_seen = 0
        self.channels: int | None = None

    @property
    def complete(self) -> bool:
        """True once `batch_num` batches have been accumulated."""
        return self.batches_seen >= self.settings.batch_num

    def _where(self) -> str:
        return f"layer {self.name!r}" if self.name else "observer"

    def update(self, x: Tensor) -> None:
        """Accumulate one batch. float16/bfloat16/float32 only; NaN/inf is an error."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._where()}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _ACCEPTED_DTYPES:
            raise TypeError(
                f"{self._where()}: activations must be float32, float16 or bfloat16, got {x.dtype}"
            )
        if self.complete:
            return
        if x.numel() == 0:
            raise CalibrationError(f"{self._where()}: received an empty tensor (shape {tuple(x.shape)})")
        if self.settings.granularity == 1:
            if x.dim() == 0:
                raise CalibrationError(f"{self._where()}: per-channel calibration needs a tensor with a last dimension")
            channels = int(x.shape[-1])
            if self.channels is not None and channels != self.channels:
                raise CalibrationError(
                    f"{self._where()}: batch {self.batches_seen + 1} has {channels} channels in its last "
                    f"dimension, earlier batches had {self.channels}"
                )
        else:
            channels = 1
        view = to_channels(x.detach(), self.settings.granularity)
        # min and max propagate NaN and carry any inf: one cheap reduction instead of isfinite(x).
        low, high = self._extrema(view)
        if not bool(torch.isfinite(torch.stack((low, high))).all()):
            raise CalibrationError(f"{self._where()}: batch {self.batches_seen + 1} contains NaN or inf values")
        self.channels = channels
        self._accumulate(view, low, high)
        self.batches_seen += 1

    def compute(self) -> QParams:
        """The factors of everything accumulated; an error before `batch_num` batches."""
        if not self.complete:
            raise CalibrationError(
                f"{self._where()}: saw {self.batches_seen} of the {self.settings.batch_num} batches "
                "batch_num asks for; no result"
            )
        return self._compute()

    def merge(self, other: Observer) -> None:
        """Fold `other` (same layer, same settings) into this observer."""
        if type(other) is not type(self) or other.settings != self.settings:
            raise ValueError(f"{self._where()}: cannot merge observers with different settings")
        if other.batches_seen == 0:
            return
        if self.channels is not None and other.channels != self.channels:
            raise CalibrationError(
                f"{self._where()}: cannot merge {other.channels} channels into {self.channels}"
            )
        if self.batches_seen == 0:
            self.channels = other.channels
        self._merge(other)
        self.batches_seen += other.batches_seen

    def _extrema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Minimum and maximum of the batch `x` [channels, values]; NaN must propagate.

        Here over the whole batch (0-d), which is all the NaN/inf check needs; an
        algorithm that needs per-channel extrema overrides this, so that each batch is
        reduced once, and receives them in `_accumulate`.
        """
        return torch.aminmax(x)

    @abstractmethod
    def _accumulate(self, x: Tensor, low: Tensor, high: Tensor) -> None:
        """Add one validated batch laid out as [channels, values], in its original dtype.

        `low` and `high` are what `_extrema(x)` returned (all finite).
        """

    @abstractmethod
    def _compute(self) -> QParams:
        """The factors, from at least `batch_num` batches; must not change the state."""

    @abstractmethod
    def _merge(self, other: Observer) -> None:
        """Fold another observer's state (non-empty, same channels) into this one."""
