"""No run writes over its own inputs: one check for every command that writes files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

from kvcal.errors import KvcalError

__all__ = ["PathArg", "same_file", "check_distinct_paths"]

PathArg = Union[str, "os.PathLike[str]"]


def same_file(a: PathArg, b: PathArg) -> bool:
    """Whether two paths name one file (the same resolved path, a hard link or a bind mount)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_paths(
    outputs: Mapping[str, PathArg], inputs: Iterable[tuple[str, PathArg]], *, error: type[KvcalError] = KvcalError
) -> None:
    """No output may be another output or an input of the same run.

    Args:
        outputs: role → path of each file the run writes (e.g. "record", "report").
        inputs: (role, path) of each file it reads.
        error: the exception class to raise.

    Raises:
        error: naming both roles and the path.
    """
    named = list(outputs.items())
    for index, (role, path) in enumerate(named):
        for other, other_path in [*named[index + 1 :], *inputs]:
            if same_file(path, other_path):
                raise error(
                    f"the {role} {os.fspath(path)} is also the {other} of this run; "
                    f"writing it would destroy the {other}: choose another path"
                )
