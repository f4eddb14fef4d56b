"""Terminal output: one console for results (stdout), one for messages (stderr), progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ._version import __version__

# deprecated option spellings and recipe keys are kept for one release: the next minor one drops them
REMOVED_IN = "{}.{}".format(__version__.split(".")[0], int(__version__.split(".")[1]) + 1)

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def progress() -> Progress:
    """A progress bar on stderr (hidden when stderr is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def note(message: str) -> None:
    """An informational line on stderr (assumptions, choices made for the user)."""
    err_console.print(f"[cyan]note:[/] {message}", soft_wrap=True)


def deprecated(old: str, new: str, where: str = "") -> None:
    """One line on stderr for a spelling that still works for one release (a renamed option or recipe key)."""
    prefix = f"{where}: " if where else ""
    err_console.print(f"[yellow]warning:[/] {escape(f'{prefix}{old} is deprecated, use {new}; it will be removed in {REMOVED_IN}')}", soft_wrap=True)
