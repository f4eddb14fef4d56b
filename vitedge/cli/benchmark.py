"""`vitedge benchmark`: build every backend x precision available here, validate all in one run, rank them."""

from __future__ import annotations

from pathlib import Path

import click

from ..benchmarking import benchmark
from ..options import TimingOptions
from ..ui import note
from ._common import options_of, renamed
from .validate import print_report


def _csv(ctx, param, value):
    if value is None:
        return None
    return tuple(v.strip().lower() for v in value.split(",") if v.strip()) or None


@click.command("benchmark")
@click.argument("model")
@click.option(
    "--calib",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    show_default="the shipped images, reference model only",
    help="Calibration images for INT8.",
)
@click.option(
    "--val",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    show_default="the shipped digits' held-out images",
    help="Validation images (class/image folders give top-1/top-5).",
)
@renamed("--data", to="--val")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("vitedge-benchmark"),
    show_default=True,
    help="Folder for the engines (artifacts/) and report.json/md/html.",
)
@renamed("--out-dir", to="--output")
@click.option("--backends", callback=_csv, default=None, show_default="all", help="Comma-separated subset of onnxruntime,openvino,tensorrt.")
@click.option("--precisions", callback=_csv, default=None, show_default="all", help="Comma-separated subset of fp32,fp16,bf16,int8.")
@click.option(
    "--max-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Accuracy budget in top-1 percentage points for the recommendation (engines over it are still listed).",
)
@click.option("--strict", is_flag=True, help="Judge the budget on the upper end of the drop's 95% confidence interval.")
@click.option("--img-size", type=int, default=None, show_default="the model's", help="Input resolution (presets and checkpoints).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None, show_default="all, up to 300", help="Calibration images used for INT8.")
@options_of(TimingOptions)
def command(model, calib, val, output, backends, precisions, max_drop, strict, img_size, calib_samples, batch_sizes, time_budget, runs, rounds, val_samples):
    """Sweep the backends x precisions this machine can run for MODEL (checkpoint, preset, 'reference' or FP32 .onnx):
    build each engine, validate all of them against PyTorch eager FP32 in one run, print a ranked table with the
    Pareto front and write report.json/md/html. Candidates that cannot run here are listed with the reason.
    """
    rep = benchmark(
        model,
        calib=calib,
        data=val,
        out_dir=output,
        backends=backends,
        precisions=precisions,
        max_drop=max_drop,
        strict=strict,
        img_size=img_size,
        samples=val_samples,
        calib_samples=calib_samples,
        batch_sizes=batch_sizes,
        time_budget=time_budget,
        rounds=rounds,
        runs=runs,
    )
    print_report(rep, output)
    for s in rep.data.get("skipped", []):
        note(f"not benchmarked: {s['name']}: {s['reason']}")
