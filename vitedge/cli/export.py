from __future__ import annotations

from pathlib import Path

import click

from ..export import DEFAULT_OPSET, export_onnx
from ..ui import console, note
from ._common import batch_option, images_option, list_images_arg


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .onnx file.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (13-21; <17 uses the TorchScript exporter).")
@batch_option
@click.option("--img-size", type=int, default=None, help="Input resolution (position embeddings are interpolated).")
@images_option
def command(model, output, opset, batch, img_size, images):
    """Export MODEL (checkpoint file, Hugging Face folder or preset name) to a verified ONNX file."""
    path, man = export_onnx(model, output, opset=opset, batch=batch, img_size=img_size, images=list_images_arg(images))
    for a in man.assumptions:
        note(a)
    for key, r in man.verification["checks"].items():
        console.print(
            f"verified on {key} inputs (batch {r['batch']}): max abs error {r['max_abs_error']:.2e} "
            f"(tolerance {r['tolerance']:.1e}), max rel error {r['max_rel_error']:.2e}, cosine {r['cosine_min']:.6f}"
        )
    console.print(f"[green]wrote[/] {path} ({path.stat().st_size / 1e6:.1f} MB) and {man.sidecar_path(path)}")
