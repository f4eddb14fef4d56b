"""`vitedge validate`: accuracy drop and measured speed-up of engines against the FP32 reference."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import GateFailed, VitedgeError
from ._common import BackendChoice, preprocessing_from_cli, preprocessing_options


def parse_batch_sizes(ctx, param, value) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter("use comma-separated positive integers, e.g. 1,4,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter("use comma-separated positive integers, e.g. 1,4,8")
    return sizes


def timing_options(f):
    f = click.option("--batch-sizes", default="1,4,8", show_default=True, callback=parse_batch_sizes,
                     help="Batch sizes of the throughput sweep.")(f)
    f = click.option("--time-budget", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
                     help="Seconds of timed runs per model at batch 1 (extended up to 2x until the median is stable).")(f)
    f = click.option("--runs", type=click.IntRange(min=1), default=None, help="Exact number of timed runs at batch 1 (instead of the time budget).")(f)
    f = click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Interleaved timing rounds (reference, engine 1, ..., reference, ...); the speed-up is the "
                          "median of the per-round ratios reference/engine.")(f)
    f = click.option("--samples", type=click.IntRange(min=1), default=None, help="Use a seeded sample of N validation images (default: all).")(f)
    return f


def print_report(rep, out_dir: Path | None) -> None:
    from rich.console import Console

    from ..ui import console, err_console, note

    out = console if console.is_terminal else Console(width=max(console.width, 140), highlight=False)
    out.print(rep.rich_table())
    busy = (rep.data["machine"].get("load") or {}).get("warning")
    if busy:
        err_console.print(f"[bold yellow]warning:[/] {busy}", soft_wrap=True)
    for f in rep.data["findings"]:
        if f != busy:
            note(f)
    if out_dir is not None:
        console.print(f"[green]wrote[/] {out_dir / 'report.json'}, report.md, report.html")


@click.command("validate")
@click.argument("engines", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-r", "--reference", default=None,
              help="FP32 reference: checkpoint, preset, 'reference' or HF folder (timed as PyTorch eager), or an FP32 .onnx "
                   "(timed with ONNX Runtime). Default: the model source in the engine's manifest.")
@click.option("-d", "--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Validation images: class/image folders give top-1/top-5; plain images give agreement with FP32; .npy/.npz.")
@click.option("--max-drop", type=float, default=None, help="Gate: max top-1 drop in percentage points (exit 1 if exceeded).")
@click.option("--min-speedup", type=float, default=None, help="Gate: min batch-1 speed-up over the FP32 reference (exit 1 if missed).")
@click.option("--reference-threads", type=click.IntRange(min=1), default=None,
              help="Threads of the FP32 reference (PyTorch intra-op, or ONNX Runtime for an .onnx reference). "
                   "Default: every usable core, as the ONNX Runtime and OpenVINO engines use.")
@click.option("--strict", is_flag=True, help="Gate on the upper end of the drop's 95% confidence interval, not the estimate.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("validation-report"), show_default=True,
              help="Folder for report.json, report.md and report.html.")
@click.option("--backend", type=BackendChoice("run"), default=None,
              help="Run the engines with this backend (e.g. an ONNX file with OpenVINO).")
@click.option("--precision-hint", type=click.Choice(["f32", "bf16", "f16"]), default=None,
              help="OpenVINO inference precision for the engines (INFERENCE_PRECISION_HINT).")
@click.option("--ci-method", type=click.Choice(["agresti-min", "bootstrap"]), default="agresti-min", show_default=True,
              help="Paired confidence interval of the accuracy drop.")
@click.option("--worst", type=click.IntRange(min=0), default=10, show_default=True, help="How many worst images to list per engine.")
@timing_options
@preprocessing_options
def command(engines, reference, data, max_drop, min_speedup, reference_threads, strict, out_dir, backend, precision_hint, ci_method, worst,
            batch_sizes, time_budget, runs, rounds, samples, **pre_flags):
    """Validate ENGINES (one or more artifacts) against the FP32 reference: accuracy drop with a confidence
    interval, logit cosine/SNR, worst images, latency p50/p90/p99, throughput and the speed-up measured in the same run.

    ONNX files without a vitedge manifest (engines or --reference) are fed with --img-size/--mean/--std/...
    or --preprocessing FILE (a manifest-less reference otherwise takes the engine's preprocessing).
    Models that are not classifiers are compared per output (cosine, max abs error, SNR).

    Exits 1 when a gate (--max-drop, --min-speedup) is missed, after writing the report.
    """
    from ..sysinfo import print_machine
    from ..validation import EngineSpec, validate

    options = {}
    if precision_hint:
        if backend != "openvino" and any(e.suffix not in (".xml", ".blob") for e in engines):
            raise VitedgeError("--precision-hint is an OpenVINO option", "use it with OpenVINO engines (.xml) or --backend openvino")
        options["config"] = {"INFERENCE_PRECISION_HINT": precision_hint}
    print_machine()
    specs = [EngineSpec(e, backend, dict(options)) for e in engines]
    try:
        rep = validate(specs, reference, data=data, max_drop=max_drop, min_speedup=min_speedup, out_dir=out_dir,
                       batch_sizes=batch_sizes, runs=runs, samples=samples, time_budget=time_budget, rounds=rounds,
                       reference_threads=reference_threads, strict=strict, ci_method=ci_method, worst=worst, preprocessing=preprocessing_from_cli(**pre_flags))
    except GateFailed as exc:
        if getattr(exc, "report", None) is not None:
            print_report(exc.report, out_dir)
        raise
    print_report(rep, out_dir)
    if max_drop is not None or min_speedup is not None:
        from ..ui import console

        console.print("[green]all gates passed[/]")
