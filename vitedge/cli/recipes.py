from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape

from ..recipes import RECIPES_DIR, BrokenRecipe, scan_recipes
from ..recipes import schema as recipe_schema
from ..ui import console


@click.command("recipes")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--schema", is_flag=True, help="Print the recipe JSON schema instead.")
def command(folder, schema):
    """List the shipped recipes, or those in FOLDER (run one with `vitedge run NAME`).

    A recipe that does not load is listed with its error (exit code 1); the others are listed anyway.
    """
    if schema:
        console.print_json(json.dumps(recipe_schema()))
        return
    folder = folder or RECIPES_DIR
    found = scan_recipes(folder)
    broken = [r for r in found if isinstance(r, BrokenRecipe)]
    for r in found:
        if isinstance(r, BrokenRecipe):
            console.print(f"[bold red]{escape(f'{r.name:<32}')}[/] [red]broken:[/] {escape(r.error)}", soft_wrap=True, highlight=False)
        else:
            console.print(f"[bold]{escape(f'{r.name:<32}')}[/] {escape(r.description)}", soft_wrap=True, highlight=False)
    console.print(f"[dim]({escape(str(folder))})[/]", soft_wrap=True, highlight=False)
    if not found:
        console.print("no recipes (*.yaml) in this folder")
    if broken:
        sys.exit(1)
