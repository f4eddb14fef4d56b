from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import GateFailed
from ..parity import check_parity
from ..ui import console
from ._common import renamed


@click.group("check")
def command():
    """Deployment checks: catch what breaks models between the lab and the device."""


@command.command("parity")
@click.argument("engine", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--reference",
    required=True,
    help="Reference preprocessing: timm data config JSON, Hugging Face preprocessor_config.json (or its folder), "
    "vitedge checkpoint/manifest, preset or 'reference'.",
)
@click.option("--val", type=click.Path(exists=True, path_type=Path), required=True, help="Folder of raw images.")
@renamed("--data", to="--val")
@click.option("--val-samples", type=click.IntRange(min=1), default=64, show_default=True, help="Images used.")
@renamed("--samples", to="--val-samples")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def parity(engine, reference, val, val_samples, as_json):
    """Compare ENGINE's bundled preprocessing with the reference's on real images.

    Exits 1 when they differ, listing each mismatch and the top-1 agreement it costs.
    """
    rep = check_parity(engine, reference, val, samples=val_samples)
    if as_json:
        console.print_json(json.dumps(rep.to_dict()))
    else:
        console.print(f"reference preprocessing: {rep.reference_source}; {rep.images} images")
        if rep.differences:
            t = Table(title="preprocessing mismatches")
            for c in ("field", "reference", "engine", "top-1 agreement with only this difference"):
                t.add_column(c)
            for d in rep.differences:
                t.add_row(d.field, str(d.reference), str(d.engine), "n/a" if d.top1_agreement is None else f"{d.top1_agreement:.1%}")
            console.print(t)
        if rep.max_abs_input_diff is not None:
            console.print(f"largest input difference: {rep.max_abs_input_diff:.3g}")
        if rep.top1_agreement is not None:
            console.print(f"top-1 agreement, engine preprocessing vs reference preprocessing: {rep.top1_agreement:.1%}")
        for n in rep.notes:
            console.print(f"note: {n}")
    if not rep.ok:
        fields = ", ".join(d.field for d in rep.differences) or "pixel values"
        raise GateFailed(
            f"preprocessing differs from the reference in: {fields}",
            "fix the engine manifest's preprocessing (re-export with the right --mean/--std/--img-size ...)",
        )
    console.print("[green]preprocessing matches the reference[/]")
