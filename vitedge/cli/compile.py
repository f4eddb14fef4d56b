from __future__ import annotations

from pathlib import Path

import click

from ..compilation import compile_model, engine_summary
from ..options import CompileOptions
from ..ui import console, err_console
from ._common import options_of, preprocessing_from_cli, preprocessing_options


@click.command("compile")
@click.argument("model")
@options_of(CompileOptions)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="beside MODEL: model.ort.onnx, model.ov.xml, model.engine",
    help="Engine file (.onnx / .xml / .engine).",
)
@preprocessing_options(img_size=False)
def command(model, output, **options):
    """Compile MODEL (ONNX from export/quantize, OpenVINO IR, or a model name) into an engine for --backend.

    The engine is checked against MODEL on random and real inputs before it is written; its
    manifest records every setting, and `vitedge.load` / `vitedge predict` open it directly.
    An ONNX file exported elsewhere (no vitedge manifest) takes its preprocessing from --img-size,
    --mean, --std, ... or --preprocessing FILE; whatever is assumed is printed and kept in the manifest.
    """
    opts = CompileOptions.take(options)  # what remains are the preprocessing flags
    with err_console.status(f"compiling for {opts.backend}..."):
        path, man = compile_model(model, output, **opts.compile_kwargs(), preprocessing=preprocessing_from_cli(**options))
    for line in engine_summary(path, man):
        console.print(line)
    console.print(f"[green]wrote[/] {path} and {man.sidecar_path(path)} in {man.compile_record.compile_seconds or 0:.1f} s")
