from __future__ import annotations

from pathlib import Path

import click

from ..attention import KINDS
from ..explain import explain
from ..ui import console, err_console
from ._common import BackendChoice


@click.command("explain")
@click.argument("engine", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the PNGs and attention.json.")
@click.option(
    "--reference",
    default=None,
    show_default="none: the engine's maps only",
    help="FP32 model to compare with: the FP32 ONNX file, a checkpoint / model folder, or any artifact.",
)
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="rollout",
    show_default=True,
    help="rollout: attention rollout over all blocks; cls: the last block's attention from the CLS token (heads averaged in the picture).",
)
@click.option("--backend", type=BackendChoice("run"), default=None, show_default="the engine's own", help="Run ENGINE with another backend.")
def command(engine, images, output, reference, kind, backend):
    """Draw where ENGINE looks on IMAGES (files or folders), from the engine's own attention, beside the reference's.

    Writes one PNG per image (the image, the engine's map over it, the reference's map on the same colour scale)
    and attention.json: per image the Pearson correlation of the two maps (`correlation`) and the share of the
    engine's top-10 % patches that are also the reference's (`top10_overlap`).  Token-merged engines have no map.
    """
    with err_console.status("computing attention maps..."):
        result = explain(engine, list(images), output, reference=reference, kind=kind, backend=backend)
    s = result.get("summary")
    if s:
        c, o = s["correlation"], s["top10_overlap"]
        console.print(
            f"attention vs {result['reference']} on {s['images']} images: correlation mean {c['mean']:.4f} (min {c['min']:.4f}), "
            f"top-10 % overlap mean {o['mean']:.2f} (min {o['min']:.2f})",
            soft_wrap=True,
        )
    console.print(f"[green]wrote[/] {len(result['images'])} PNGs and attention.json to {output}")
