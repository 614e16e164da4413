"""Export calibrated KV-cache factors to what a serving engine loads: one module per format."""

from __future__ import annotations

from kvcal.export.vllm_ascend import ExportResult, KvLayerExport, export_vllm_ascend

__all__ = ["ExportResult", "KvLayerExport", "export_vllm_ascend"]
