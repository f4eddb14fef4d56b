"""Terminal output: one console for results (stdout), one for messages (stderr), progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
