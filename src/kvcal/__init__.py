"""kvcal: INT8 KV-cache calibration (IFMR / HFMG) for PyTorch models, AMCT-compatible.

The AMCT-style API: `create_quant_cali_config`, `create_quant_cali_model`,
`QuantCalibrationOp`, and for whole-network PTQ `create_quant_config` and
`create_ptq_cali_model`. They are imported on first use, so `import kvcal` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvcal.errors import CalibrationError, ConfigError, DatasetError, DeviceError, KvcalError, ModelLoadError
from kvcal.errors import ExportError, RecordError, RecordOverwriteWarning

__version__ = "0.1.0"

_LAZY = {
    "QuantCalibrationOp": "kvcal.kv.ops",
    "create_quant_cali_model": "kvcal.kv.api",
    "create_quant_cali_config": "kvcal.kv.api",
    "create_quant_config": "kvcal.ptq.api",
    "create_ptq_cali_model": "kvcal.ptq.api",
}

__all__ = ["__version__", "QuantCalibrationOp", "create_quant_cali_config", "create_quant_cali_model"]
__all__ += ["KvcalError", "ConfigError", "DatasetError", "ModelLoadError", "RecordError", "CalibrationError"]
__all__ += ["DeviceError", "ExportError", "RecordOverwriteWarning"]
__all__ += ["create_quant_config", "create_ptq_cali_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcal' has no attribute {name!r}")
