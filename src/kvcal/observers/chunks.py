"""Stored activation batches walked as float32 chunks (the IFMR search and its loss bounds)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["float32_chunks"]


def float32_chunks(parts: list[Tensor], rows: int, glue: bool = True) -> Iterator[Tensor]:
    """Walk `parts` ([n_b, C] each, any float dtype) as float32 chunks of at most `rows` rows.

    Small parts are concatenated so that many tiny batches do not mean many tiny chunks;
    with `glue` False each part is cut on its own (no copy where it is already float32).
    """
    if not glue:
        for part in parts:
            for start in range(0, int(part.shape[0]), rows):
                yield part[start : start + rows].to(torch.float32)
        return
    pending: list[Tensor] = []
    pending_rows = 0
    for part in parts:
        start = 0
        total = int(part.shape[0])
        while start < total:
            take = min(rows - pending_rows, total - start)
            piece = part[start : start + take].to(torch.float32)
            start += take
            if not pending and take == rows:
                yield piece
                continue
            pending.append(piece)
            pending_rows += take
            if pending_rows == rows:
                yield torch.cat(pending)
                pending, pending_rows = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)
