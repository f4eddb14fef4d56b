"""`vitedge backends`: what each registered backend can do, and whether this machine can use it."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from ..backends import registry
from ..ui import console


@click.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List the backends: files they run, what they compile and quantize, and availability here."""
    rows: list[dict[str, Any]] = []
    for b in registry.backends():
        why = b.unavailable()
        rows.append(
            {
                "name": b.name,
                "available": why is None,
                "reason": why,
                "runs": list(b.runs),
                "compiles_to": b.engine_suffix,
                "quantize": list(b.quantize),
                "benchmark": list(b.benchmark),
                "summary": b.summary,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(show_lines=False)
    for col in ("backend", "usable here", "runs", "compiles to", "quantizes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], "yes" if r["available"] else f"no: {r['reason']}", " ".join(r["runs"]), r["compiles_to"] or "–", ", ".join(r["quantize"]) or "–"
        )
    console.print(table)
    for r in rows:
        console.print(f"[bold]{r['name']}[/]: {r['summary']}", highlight=False)
