"""Terminal output: one console for results (stdout), one for messages (stderr), progress bars."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ._version import __version__

# deprecated option spellings and recipe keys are kept for one release: the next minor one drops them
REMOVED_IN = "{}.{}".format(__version__.split(".")[0], int(__version__.split(".")[1]) + 1)

#: the width of output that is not a terminal (a file, a pipe, a CI log): wide enough that no line is wrapped
UNWRAPPED_WIDTH = 1000


class _Console(Console):
    """A console that never wraps when its output is not a terminal: rich would wrap at 80 columns there, cutting
    table cells and numbers in two ("cosine min" on one line, "0.9902" on the next) in logs and pipes.  Checked
    on every print, so output redirected after import (a test runner, ``| tee``) is caught too."""

    @Console.size.getter  # type: ignore[attr-defined]
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return size if self.is_terminal else ConsoleDimensions(max(size.width, UNWRAPPED_WIDTH), size.height)


console = _Console(highlight=False, soft_wrap=True)
err_console = _Console(stderr=True, highlight=False)


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


def size_change(new_bytes: int, old_bytes: int, reference: str) -> str:
    """``"3.6x smaller than FP32"``, ``"3.0x larger than FP32"`` or ``"about the size of FP32"`` (within 5 %): a file
    that grew is never called "0.3x smaller"."""
    if new_bytes <= 0 or old_bytes <= 0:
        return f"size not comparable with {reference}"
    ratio = old_bytes / new_bytes
    if ratio >= 1.05:
        return f"{ratio:.1f}x smaller than {reference}"
    if ratio <= 1 / 1.05:
        return f"{1 / ratio:.1f}x larger than {reference}"
    return f"about the size of {reference}"
