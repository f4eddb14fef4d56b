from __future__ import annotations

from pathlib import Path

import click

from ..export import export_onnx
from ..options import ExportOptions
from ..ui import console, err_console, note
from ._common import list_images_arg, options_of


@click.command("export")
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .onnx file.")
@options_of(ExportOptions)
def command(model, output, **options):
    """Export MODEL to a verified ONNX file, plus a <stem>.vitedge.json manifest.

    MODEL is a checkpoint (.safetensors/.pth/.pt/.bin, vitedge or timm layout), a Hugging Face
    save_pretrained folder, 'reference' (the shipped digits ViT) or a preset name (vit_tiny,
    vit_small, vit_base, vit_large, vit_huge: random weights, for trials).

    The file is checked with onnx.checker and run by ONNX Runtime on the same random and real
    images as PyTorch; it is written only if the outputs agree within tolerance.  With
    --merge-tokens the reference is the PyTorch model with the same merging; `vitedge validate`
    against an unmerged export measures what merging costs.
    """
    opts = ExportOptions(**options)
    with err_console.status("exporting", spinner="dots") as status:
        path, man = export_onnx(model, output, **opts.export_kwargs(), images=list_images_arg(opts.calib), on_stage=lambda text: status.update(f"{text} ..."))
    for a in man.assumptions:
        note(a)
    for key, r in man.verification["checks"].items():
        console.print(
            f"verified on {key} inputs (batch {r['batch']}): max abs error {r['max_abs_error']:.2e} "
            f"(tolerance {r['tolerance']:.1e}), max rel error {r['max_rel_error']:.2e}, cosine {r['cosine_min']:.6f}"
        )
    sizes = man.dynamic_size
    if sizes is not None:
        console.print(f"dynamic size: any height and width from {sizes.min} to {sizes.max}, multiples of {sizes.multiple} (images keep their aspect ratio)")
    merging = man.model.get("graph", {}).get("token_merging")
    if merging:
        _report_merging(merging)
    size = sum((path.parent / f).stat().st_size for f in man.files) / 1e6
    extra = f" + {len(man.files) - 1} external data file" if len(man.files) > 1 else ""
    console.print(f"[green]wrote[/] {path}{extra} ({size:.1f} MB) and {man.sidecar_path(path)}")


def _report_merging(merging: dict) -> None:
    search = merging.get("search")
    every = merging.get("every", 1)
    if search:
        for t in search["trials"]:
            console.print(
                f"  merge r={t['r']:<3d} every {t.get('every', 1)} block(s)  tokens in last block {t['tokens_last_block']:<4d} "
                f"top-1 loss {t['top1_loss_pp']:5.2f} points (95% CI {t['top1_loss_ci95_pp'][0]:.1f} to {t['top1_loss_ci95_pp'][1]:.1f})"
                f"{'' if t['within_budget'] else '  over budget'}"
            )
        speed = search.get("speed") or {}
        for t in speed.get("engines", []):
            what = f"{t['ms']:.2f} ms, {t['speedup']:.2f}x the unmerged engine" if t["status"] == "timed" else t["status"]
            console.print(f"  {speed['backend']} engine r={t['r']:<3d} every {t['every']} block(s): {what}")
        why = (search.get("chosen") or {}).get("why") or f"the largest within {search['max_drop_pp']:g} points"
        console.print(
            f"token merging: r={merging['r']}"
            + (f" every {every} blocks" if every > 1 else "")
            + f" chosen: {why} ({search['measure']}, {search['images']} images)"
        )
    counts = merging["tokens_per_block"]
    if merging["r"]:
        console.print(
            f"token merging r={merging['r']}"
            + (f" every {every} blocks" if every > 1 else "")
            + f": tokens per block {counts[0]} -> {counts[-1]} (lossy: validate against an unmerged export)"
        )
