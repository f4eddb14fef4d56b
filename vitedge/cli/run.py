from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..recipes import load_recipe, run_recipe
from ..ui import console, err_console


@click.command("run")
@click.argument("recipe")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="runs/<recipe name>",
    help="Output folder.",
)
@click.option("--force", is_flag=True, help="Redo every step, even those whose inputs are unchanged.")
def command(recipe, out_dir, force):
    """Run RECIPE (a YAML file, or the name of a shipped recipe): export, quantize, compile, validate.

    Steps whose inputs and options are unchanged since the last run are skipped, so re-runs are
    cheap and an interrupted run resumes. The output folder is a deployable bundle:
    vitedge.load(OUTDIR) opens its engine.
    """
    rec = load_recipe(recipe)
    res = run_recipe(rec, out_dir, force=force, log=lambda m: err_console.print(f"[dim]{rec.name}[/] {m}"))
    table = Table(title=f"recipe {rec.name} -> {res.out_dir}")
    for col in ("step", "status", "seconds", "result"):
        table.add_column(col)
    for s in res.steps:
        table.add_row(s.step, s.status, f"{s.seconds:.1f}", s.summary)
    console.print(table)
    if res.engine is not None:
        console.print(f"engine: {res.engine}  (load with vitedge.load({str(res.out_dir)!r}))")
