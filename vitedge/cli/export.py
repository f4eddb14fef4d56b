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
@click.option("--merge-tokens", "merge_tokens", default="0", metavar="R|auto",
              help="Token merging (ToMe; lossy, opt-in): merge R tokens in every block but the last, so later blocks run "
                   "on fewer tokens.  'auto' picks the largest R whose top-1 drop on --val-images stays within --max-drop.  [default: 0, off]")
@click.option("--val-images", type=click.Path(exists=True, path_type=Path), default=None,
              help="Held-out images for --merge-tokens auto (class sub-folders give labels; without labels, top-1 changes are counted).")
@click.option("--max-drop", type=float, default=None,
              help="Top-1 points --merge-tokens auto may lose on --val-images.  [default: 1.0]")
def command(model, output, opset, batch, img_size, images, merge_tokens, val_images, max_drop):
    """Export MODEL to a verified ONNX file, plus a <stem>.vitedge.json manifest.

    MODEL is a checkpoint (.safetensors/.pth/.pt/.bin, vitedge or timm layout), a Hugging Face
    save_pretrained folder, 'reference' (the shipped digits ViT) or a preset name (vit_tiny,
    vit_small, vit_base, vit_large, vit_huge: random weights, for trials).

    The file is checked with onnx.checker and run by ONNX Runtime on the same random and real
    images as PyTorch; it is written only if the outputs agree within tolerance.  With
    --merge-tokens the reference is the PyTorch model with the same merging; `vitedge validate`
    against an unmerged export measures what merging costs.
    """
    with err_console.status("exporting", spinner="dots") as status:
        path, man = export_onnx(model, output, opset=opset, batch=batch, img_size=img_size, images=list_images_arg(images),
                                merge_tokens=merge_tokens, val_images=val_images, max_drop=max_drop, on_stage=lambda text: status.update(f"{text} ..."))
    for a in man.assumptions:
        note(a)
    for key, r in man.verification["checks"].items():
        console.print(
            f"verified on {key} inputs (batch {r['batch']}): max abs error {r['max_abs_error']:.2e} "
            f"(tolerance {r['tolerance']:.1e}), max rel error {r['max_rel_error']:.2e}, cosine {r['cosine_min']:.6f}"
        )
    merging = man.model.get("graph", {}).get("token_merging")
    if merging:
        _report_merging(merging)
    size = sum((path.parent / f).stat().st_size for f in man.files) / 1e6
    extra = f" + {len(man.files) - 1} external data file" if len(man.files) > 1 else ""
    console.print(f"[green]wrote[/] {path}{extra} ({size:.1f} MB) and {man.sidecar_path(path)}")


def _report_merging(merging: dict) -> None:
    search = merging.get("search")
    if search:
        for t in search["trials"]:
            console.print(f"  merge r={t['r']:<3d} tokens in last block {t['tokens_last_block']:<4d} top-1 loss {t['top1_loss_pp']:5.2f} points "
                          f"(95% CI {t['top1_loss_ci95_pp'][0]:.1f} to {t['top1_loss_ci95_pp'][1]:.1f})"
                          f"{'' if t['within_budget'] else '  over budget'}")
        console.print(f"token merging: r={merging['r']} chosen, the largest within {search['max_drop_pp']:g} points "
                      f"({search['measure']}, {search['images']} images)")
    counts = merging["tokens_per_block"]
    if merging["r"]:
        console.print(f"token merging r={merging['r']}: tokens per block {counts[0]} -> {counts[-1]} (lossy: validate against an unmerged export)")
