"""`QuantCalibrationOp`: the AMCT-style in-model calibration operator."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from kvcal.errors import RecordOverwriteWarning
from kvcal.observers import Observer, make_observer
from kvcal.params import settings_from_params
from kvcal.quant import QParams
from kvcal.record.changes import OverwriteReport
from kvcal.record.store import merge_kv_cache

__all__ = ["QuantCalibrationOp", "write_layer"]

_QUANT_METHODS = ("kv_cache_quant",)


def warn_overwrites(report: OverwriteReport, record_file: str | os.PathLike[str]) -> None:
    """One `RecordOverwriteWarning` per layer of `report` whose old factors were replaced."""
    from kvcal.output import describe_change

    for change in report.layers:
        if change.status == "changed":
            warnings.warn(
                f"{os.fspath(record_file)}: overwrote the factors of {describe_change(change)}",
                RecordOverwriteWarning,
                stacklevel=4,
            )


def write_layer(record_file: str | os.PathLike[str], name: str, qparams: QParams) -> None:
    """Merge one layer's factors into the record; warn about replaced old factors."""
    report = merge_kv_cache(record_file, {name: qparams.cpu()})
    warn_overwrites(report, record_file)



class QuantCalibrationOp(nn.Module):
    """Observe tensors by layer name and write their INT8 KV-cache factors to a record.

    `forward(layer_name, x)` returns `x` itself and accumulates it under `layer_name`
    (one observer per name). When a name reaches `batch_num` calls its factors are
    merged into `record_file` (incremental, atomic, locked); different old factors are
    reported as a `kvcal.errors.RecordOverwriteWarning` with old -> new. Later calls
    for that name pass through untouched.

    Args:
        record_file: the record (FORMATS.md §4) to merge results into.
        quant_algo_params: FORMATS.md §3 parameters; None means IFMR defaults.
        quant_method: only "kv_cache_quant".

    Raises:
        TypeError: a parameter of the wrong type.
        ValueError: a bad parameter value, or another quant_method.
    """

    def __init__(
        self,
        record_file: str | os.PathLike[str],
        quant_algo_params: Mapping[str, Any] | None = None,
        quant_method: str = "kv_cache_quant",
    ) -> None:
        super().__init__()
        if not isinstance(record_file, (str, os.PathLike)):
            raise TypeError(f"record_file must be a path (str or os.PathLike), got {type(record_file).__name__}")
        if quant_method not in _QUANT_METHODS:
            raise ValueError(f"quant_method must be 'kv_cache_quant', got {quant_method!r}")
        if quant_algo_params is not None and not isinstance(quant_algo_params, Mapping):
            raise TypeError(f"quant_algo_params must be a dict or None, got {type(quant_algo_params).__name__}")
        self.record_file = os.fspath(record_file)
        self.quant_method = quant_method
        self.settings = settings_from_params(quant_algo_params)
        self._observers: dict[str, Observer] = {}

    def observer(self, layer_name: str) -> Observer | None:
        """The observer of `layer_name`, once it has been called."""
        return self._observers.get(layer_name)

    def forward(self, layer_name: str, x: Tensor) -> Tensor:
        """Accumulate `x` under `layer_name`; return `x` unchanged (the same object)."""
        if not isinstance(layer_name, str):
            raise TypeError(f"layer_name must be a str, got {layer_name!r} ({type(layer_name).__name__})")
        if not layer_name:
            raise ValueError("layer_name must be a non-empty string, got ''")
        observer = self._observers.get(layer_name)
        if observer is None:
            observer = self._observers[layer_name] = make_observer(self.settings, layer_name)
        if observer.complete:
            return x
        observer.update(x)
        if observer.complete:
            write_layer(self.record_file, layer_name, observer.compute())
        return x

    def extra_repr(self) -> str:
        params = self.settings.params
        return (
            f"record_file={self.record_file!r}, act_algo={params.algo!r}, "
            f"quant_granularity={self.settings.granularity.label}, asymmetric={self.settings.asymmetric}, "
            f"batch_num={self.settings.batch_num}"
        )
