"""Atomic file replacement, shared by every file kvcal writes (config, record, report)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["atomic_write", "existing_mode"]


def existing_mode(target: Path) -> int | None:
    """The permission bits of `target`, or None when it does not exist yet."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort, the rename itself has already happened."""
    if os.name != "posix":  # pragma: no cover - Windows cannot open a directory to fsync it
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to a temp file beside `target`, fsync, rename over it.

    On any exception (KeyboardInterrupt included) the temp file is removed and `target`
    is untouched. `mode` None: an existing file keeps its mode, a new one gets the umask's.
    """
    if mode is None:
        mode = existing_mode(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 lets the umask decide a new file's mode, as for any file the user creates.
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(target.parent)
