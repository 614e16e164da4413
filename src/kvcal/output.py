"""Rich consoles, tables and progress: everything the user sees on stderr.

The library returns data; only this module (called from the CLI and from the Python
API's warnings) turns it into text. Coloured on a terminal, plain otherwise.
"""

from __future__ import annotations

from rich.console import Console

__all__ = ["err_console", "print_error", "print_warning"]

err_console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One `error: ...` line on stderr, no markup interpretation of the message."""
    err_console.print(f"[bold red]error:[/] {_escape(message)}", soft_wrap=True)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {_escape(message)}", soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- gen-config rendering (owned by the config work) ---


# --- record / overwrite report / inspect rendering (owned by the record work) ---


# --- calibrate progress and summary rendering (owned by the runtime work) ---
