"""Strict JSON reading for config files: duplicated keys and NaN/Infinity are errors."""

from __future__ import annotations

import json
import os
from typing import Any

from kvcal.errors import ConfigError
from kvcal.textproto import read_text

__all__ = ["load_json"]


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def load_json(path: str | os.PathLike[str]) -> Any:
    """A JSON config parsed strictly.

    Raises:
        ConfigError: unreadable, not UTF-8, invalid JSON (with line:column), a duplicated
            key or a NaN/Infinity constant, naming the file.
    """
    source = os.fspath(path)
    text = read_text(source, error=ConfigError, what="config")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: duplicated key {exc.args[0]!r} in a JSON object") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid JSON: {exc}") from None
