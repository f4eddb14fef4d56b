from __future__ import annotations

import json

import click

from ..recipes import RECIPES_DIR, SCHEMA, list_recipes
from ..ui import console


@click.command("recipes")
@click.option("--schema", is_flag=True, help="Print the recipe JSON schema instead.")
def command(schema):
    """List the shipped recipes (run one with `vitedge run NAME`)."""
    if schema:
        console.print_json(json.dumps(SCHEMA))
        return
    for r in list_recipes():
        console.print(f"[bold]{r.name:<32}[/] {r.description}")
    console.print(f"[dim]({RECIPES_DIR})[/]")
