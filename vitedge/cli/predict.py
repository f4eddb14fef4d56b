from __future__ import annotations

import json
from pathlib import Path

import click

from ..data import image_paths
from ..foreign import ensure_manifest
from ..manifest import Manifest
from ..options import parse_size
from ..runtime import load, opens_as_pytorch, predict_files
from ..ui import console, note
from ._common import BackendChoice, _Parsed, preprocessing_from_cli, preprocessing_options


@click.command("predict")
@click.argument("engine", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Labels shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: [{image, top: [{label, index, prob}]}].")
@click.option(
    "--backend",
    type=BackendChoice("run"),
    default=None,
    show_default="the engine's own",
    help="Run with another backend than the engine's own (e.g. an ONNX file with OpenVINO).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per inference call.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image (exit 2, nothing printed) instead of skipping it with a warning.")
@click.option(
    "--size",
    type=_Parsed(parse_size, "text"),
    metavar="HxW",
    show_default="each image at its own aspect ratio on a dynamic-size engine, else the engine's size",
    help="Feed every image at HEIGHTxWIDTH (a dynamic-size engine takes any size in its bounds; by default it sees each image at its own aspect ratio).",
)
@preprocessing_options
def command(engine, images, top_k, as_json, backend, batch_size, strict, size, **pre_flags):
    """Classify IMAGE files (or folders of images) with ENGINE (any artifact, its manifest or a bundle folder).

    An ONNX classifier exported elsewhere (no vitedge manifest) works too: its preprocessing comes from
    --img-size/--mean/--std/... or --preprocessing FILE, and what is assumed is printed.

    An unreadable image is skipped with a warning; the exit code is 2 only when none could be read.
    """
    paths = image_paths(images)
    pre = preprocessing_from_cli(**pre_flags)
    artifact, man = (engine, Manifest(engine.name, "pytorch")) if opens_as_pytorch(engine, backend) else Manifest.find(engine)
    if man is None:
        ensure_manifest(artifact, pre, announce=True, hash_file=False)  # the one-line error / the assumptions, up front
    elif pre is not None:
        note(f"{artifact.name} has a vitedge manifest: its own preprocessing is used, not the flags")
        pre = None
    with load(engine, backend=backend, preprocessing=pre) as eng:
        results, skipped = predict_files(eng, paths, top_k=top_k, batch_size=batch_size, strict=strict, size=size)
    if skipped:
        note(f"{len(skipped)} of {len(paths)} images could not be read and were skipped (--strict stops at the first)")
    if as_json:
        click.echo(json.dumps([{"image": str(p), **pred.to_dict()} for p, pred in results], indent=2))
        return
    for p, pred in results:
        tops = ", ".join(f"{lbl} {prob:.1%}" for lbl, prob in zip(pred.labels, pred.probs, strict=True))
        console.print(f"{p}: {tops}", soft_wrap=True)
