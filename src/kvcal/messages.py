"""Small helpers for error messages: an exception in one line, "did you mean" suggestions."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["first_line", "describe", "close_matches", "did_you_mean"]


# Terminal colour codes some libraries put in their messages (torch.load does).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` (just `Type` when the message is empty), colour codes removed."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def describe(exc: BaseException) -> str:
    """`Type: whole message` (just `Type` when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def close_matches(name: str, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The candidates closest to `name`, best first (difflib's ratio at least `cutoff`)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)


def did_you_mean(name: str, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.6) -> str:
    """`"; did you mean 'a', 'b'?"` with the closest candidates, or "" when none is close."""
    close = close_matches(name, candidates, n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
