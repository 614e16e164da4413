"""kvcal: INT8 KV-cache calibration (IFMR / HFMG) for PyTorch models, AMCT-compatible."""

from __future__ import annotations

from kvcal.errors import (
    CalibrationError,
    ConfigError,
    DatasetError,
    DeviceError,
    KvcalError,
    ModelLoadError,
    RecordError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "KvcalError",
    "ConfigError",
    "DatasetError",
    "ModelLoadError",
    "RecordError",
    "CalibrationError",
    "DeviceError",
]
