"""The kvcal exception tree: the CLI prints a KvcalError as one `error:` line and exits 1."""

from __future__ import annotations

__all__ = [
    "KvcalError",
    "ConfigError",
    "DatasetError",
    "ModelLoadError",
    "RecordError",
    "CalibrationError",
    "DeviceError",
    "ExportError",
    "RecordOverwriteWarning",
]


class KvcalError(Exception):
    """Base of every error kvcal reports to a user."""


class ConfigError(KvcalError):
    """A .cfg, JSON config or parameter set that is malformed or does not match the model."""


class DatasetError(KvcalError):
    """A dataset directory or data file that cannot be used."""


class ModelLoadError(KvcalError):
    """An entry point or checkpoint that does not give a usable model."""


class RecordError(KvcalError):
    """A record file that cannot be read, locked or written."""


class CalibrationError(KvcalError):
    """Calibration data that cannot give a result (NaN/inf, too few batches, a layer that never ran)."""


class DeviceError(KvcalError):
    """A device that was asked for and is not available."""


class ExportError(KvcalError):
    """A record, model directory or output directory that cannot give a serving-engine export."""


class RecordOverwriteWarning(UserWarning):
    """A record entry's old KV-cache factors were replaced by different ones (old -> new in the message)."""
