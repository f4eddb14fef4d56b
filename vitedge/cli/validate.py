"""`vitedge validate`: accuracy drop and measured speed-up of engines against the FP32 reference."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import GateFailed, VitedgeError
from ..options import ValidateOptions
from ..sysinfo import print_machine
from ..ui import console, err_console, note
from ..validation import EngineSpec, validate, validate_sizes
from ._common import options_of, preprocessing_from_cli, preprocessing_options, renamed


def print_report(rep, out_dir: Path | None) -> None:
    from rich.console import Console

    out = console if console.is_terminal else Console(width=max(console.width, 140), highlight=False)
    out.print(rep.rich_table())
    warnings = rep.warnings  # also among the findings: printed once, here
    for w in warnings:
        err_console.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
    for f in rep.data["findings"]:
        if f not in warnings:
            note(f)
    if out_dir is not None:
        console.print(f"[green]wrote[/] {out_dir / 'report.json'}, report.md, report.html")


@click.command("validate")
@click.argument("engines", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-r",
    "--reference",
    default=None,
    help="FP32 reference: checkpoint, preset, 'reference' or HF folder (timed as PyTorch eager), or an FP32 .onnx (timed with ONNX Runtime).",
    show_default="the model source in the engine's manifest",
)
@click.option(
    "--val",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    show_default="the shipped digits' held-out images",
    help="Validation images: class/image folders give top-1/top-5; plain images give agreement with FP32; .npy/.npz.",
)
@renamed("--data", "-d", to="--val")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("validation-report"),
    show_default=True,
    help="Folder for report.json, report.md and report.html.",
)
@renamed("--out-dir", to="--output")
@options_of(ValidateOptions)
@preprocessing_options
def command(engines, reference, val, output, **options):
    """Validate ENGINES (one or more artifacts) against the FP32 reference: accuracy drop with a confidence
    interval, logit cosine/SNR, worst images, latency p50/p90/p99, throughput and the speed-up measured in the same run.

    ONNX files without a vitedge manifest (engines or --reference) are fed with --img-size/--mean/--std/...
    or --preprocessing FILE (a manifest-less reference otherwise takes the engine's preprocessing).
    Models that are not classifiers are compared per output (cosine, max abs error, SNR).

    Exits 1 when a gate (--max-drop, --min-speedup) is missed, after writing the report. The reference and the
    engines run with as many threads as other processes leave cores free; when none fit (a busy machine), the
    speed-up is withheld ("speed-up not measurable here: ...") and --min-speedup fails closed with exit 3.
    """
    opts = ValidateOptions.take(options)  # what remains are the preprocessing flags
    run_options = {}
    if opts.precision_hint:
        if opts.backend != "openvino" and any(e.suffix not in (".xml", ".blob") for e in engines):
            raise VitedgeError("--precision-hint is an OpenVINO option", "use it with OpenVINO engines (.xml) or --backend openvino")
        run_options["config"] = {"INFERENCE_PRECISION_HINT": opts.precision_hint}
    print_machine()
    specs = [EngineSpec(e, opts.backend, dict(run_options)) for e in engines]
    kwargs = {**opts.validate_kwargs(), "preprocessing": preprocessing_from_cli(**options)}
    if opts.size and "," in opts.size:  # several sizes: one report each, and a summary
        _validate_sizes(specs, reference, val, output, kwargs)
        return
    try:
        rep = validate(specs, reference, data=val, out_dir=output, **kwargs)
    except GateFailed as exc:
        if getattr(exc, "report", None) is not None:
            print_report(exc.report, output)
        raise
    print_report(rep, output)
    if opts.max_drop is not None or opts.min_speedup is not None:
        console.print("[green]all gates passed[/]")


def _validate_sizes(specs, reference, val, output: Path, kwargs: dict) -> None:
    sizes = kwargs.pop("size")
    try:
        reports = validate_sizes(specs, reference, sizes=sizes, data=val, out_dir=output, **kwargs)
    except GateFailed as exc:
        if getattr(exc, "report", None) is not None:
            print_report(exc.report, None)
        raise
    for key, rep in reports.items():
        console.print(f"[bold]{key}[/]")
        print_report(rep, None)
    console.print(f"[green]wrote[/] {output / 'sizes.md'}, sizes.json and a report per size ({', '.join(f'{k}/' for k in reports)})")
