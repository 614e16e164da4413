"""The record files under tests/data/records and the layer keys they hold.

Importable by every test (tests/ is on sys.path): `from record_files import FULL, K0`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CORRUPT", "FULL", "K0", "K1", "PER_CHANNEL", "RECORDS", "V0"]

RECORDS = Path(__file__).parent / "data" / "records"
FULL = RECORDS / "amct_full.txt"
PER_CHANNEL = RECORDS / "per_channel.txt"
CORRUPT = RECORDS / "corrupt.txt"

K0 = "model.layers.0.self_attn.k_proj"
V0 = "model.layers.0.self_attn.v_proj"
K1 = "model.layers.1.self_attn.k_proj"
