from __future__ import annotations

from pathlib import Path

import click

from ..compilation import HINTS, PRECISION_HINTS, compile_model, engine_summary
from ..ui import console, err_console
from ._common import BackendChoice, preprocessing_from_cli, preprocessing_options


@click.command("compile")
@click.argument("model")
@click.option("-t", "--target", type=BackendChoice("compile"), default="onnxruntime", show_default=True,
              help="Backend that builds the engine; `vitedge backends` lists them and what this machine can run.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Engine file (.onnx / .xml / .engine). Default: beside MODEL, e.g. model.ort.onnx, model.ov.xml, model.engine.")
@click.option("--batch", default="auto", show_default=True,
              help="'auto' (static 1 for --hint latency, dynamic for throughput), 'dynamic' or a fixed size.")
@click.option("--img-size", default=None,
              help="Resolution; for a model name/checkpoint (exported at that size), or TensorRT MIN,OPT,MAX for dynamic-size ONNX.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: all cores).")
@click.option("--hint", type=click.Choice(HINTS), default="latency", show_default=True,
              help="Optimise for one request at a time (latency) or many in parallel (throughput).")
@click.option("--precision-hint", type=click.Choice(PRECISION_HINTS), default=None,
              help="Precision of the ops computed in float. OpenVINO default: device default (bf16 on AVX-512 BF16 CPUs), f32 for INT8 models. TensorRT default: f16.")
@click.option("--device", default=None, help="OpenVINO device (CPU, GPU, NPU, AUTO, ...; default CPU).")
@click.option("--streams", default=None, help="OpenVINO streams (a number or AUTO; default from the hint).")
@click.option("--blob", "export_blob", is_flag=True, help="OpenVINO: also write the compiled blob (.blob) for a fast cold start.")
@click.option("--workspace-mb", type=int, default=None, help="TensorRT: builder workspace memory limit (default 1024).")
@click.option("--profile", default=None, help="TensorRT: MIN,OPT,MAX batch sizes of the optimisation profile (default 1,1,32 latency / 1,8,32 throughput).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT: timing cache file, read if it exists and updated (faster rebuilds).")
@preprocessing_options(img_size=False)
def command(model, target, output, batch, img_size, threads, hint, precision_hint, device, streams, export_blob, workspace_mb,
            profile, timing_cache, **pre_flags):
    """Compile MODEL (ONNX from export/quantize, OpenVINO IR, or a model name) into an engine for TARGET.

    The engine is checked against MODEL on random and real inputs before it is written; its
    manifest records every setting, and `vitedge.load` / `vitedge predict` open it directly.
    An ONNX file exported elsewhere (no vitedge manifest) takes its preprocessing from --img-size,
    --mean, --std, ... or --preprocessing FILE; whatever is assumed is printed and kept in the manifest.
    """
    size = None
    if img_size is not None:
        size = int(img_size) if str(img_size).isdigit() else img_size
    with err_console.status(f"compiling for {target}..."):
        path, man = compile_model(model, output, target=target, batch=batch, img_size=size, threads=threads, hint=hint,
                                  precision_hint=precision_hint, device=device, streams=streams, export_blob=export_blob,
                                  workspace_mb=workspace_mb, profile=profile, timing_cache=timing_cache,
                                  preprocessing=preprocessing_from_cli(**pre_flags))
    for line in engine_summary(path, man):
        console.print(line)
    console.print(f"[green]wrote[/] {path} and {man.sidecar_path(path)} in {man.compile.get('compile_seconds', 0):.1f} s")
