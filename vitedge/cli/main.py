from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click
from rich.markup import escape

from ..errors import VitedgeError
from ..ui import err_console

# sub-command modules; each defines a click command called ``command``
_COMMANDS = ["export", "quantize", "compile", "predict", "explain", "validate", "benchmark", "run", "recipes", "check", "backends"]


class _Group(click.Group):
    """Turns every :class:`VitedgeError` into a one-line message and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VitedgeError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing half-written was kept")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True})
@click.version_option(package_name="vitedge")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def main(verbose: bool) -> None:
    """vitedge: make a trained Vision Transformer fast and small for edge devices, with proof it still works."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for _name in _COMMANDS:
    if importlib.util.find_spec(f"{__package__}.{_name}") is not None:
        main.add_command(importlib.import_module(f"{__package__}.{_name}").command)
