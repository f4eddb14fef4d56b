from __future__ import annotations

from pathlib import Path

import click

from ..export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx
from ..ui import console, err_console, note
from ._common import batch_option, images_option, list_images_arg


@click.command("export")
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .onnx file.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET}; below 17 uses the TorchScript exporter, LayerNorm decomposed).")
@batch_option
@click.option("--img-size", type=int, default=None, help="Input resolution (position embeddings are interpolated).")
@images_option
def command(model, output, opset, batch, img_size, images):
    """Export MODEL to a verified ONNX file, plus a <stem>.vitedge.json manifest.

    MODEL is a checkpoint (.safetensors/.pth/.pt/.bin, vitedge or timm layout), a Hugging Face
    save_pretrained folder, 'reference' (the shipped digits ViT) or a preset name (vit_tiny,
    vit_small, vit_base, vit_large, vit_huge: random weights, for trials).

    The file is checked with onnx.checker and run by ONNX Runtime on the same random and real
    images as PyTorch; it is written only if the outputs agree within tolerance.
    """
    with err_console.status("exporting", spinner="dots") as status:
        path, man = export_onnx(model, output, opset=opset, batch=batch, img_size=img_size, images=list_images_arg(images),
                                on_stage=lambda text: status.update(f"{text} ..."))
    for a in man.assumptions:
        note(a)
    for key, r in man.verification["checks"].items():
        console.print(
            f"verified on {key} inputs (batch {r['batch']}): max abs error {r['max_abs_error']:.2e} "
            f"(tolerance {r['tolerance']:.1e}), max rel error {r['max_rel_error']:.2e}, cosine {r['cosine_min']:.6f}"
        )
    size = sum((path.parent / f).stat().st_size for f in man.files) / 1e6
    extra = f" + {len(man.files) - 1} external data file" if len(man.files) > 1 else ""
    console.print(f"[green]wrote[/] {path}{extra} ({size:.1f} MB) and {man.sidecar_path(path)}")
