from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitedgeError
from ..manifest import Manifest
from ..options import QuantizeOptions
from ..quantization import FidelityNotMet, quantize
from ..ui import console, size_change
from ..validation import artifact_size
from ._common import options_of, preprocessing_from_cli, preprocessing_options


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@options_of(QuantizeOptions)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .onnx (onnxruntime, tensorrt) or .xml (openvino).")
@preprocessing_options
def command(model, output, **options):
    """Quantize an FP32 ONNX model to INT8 or FP16 and measure it against FP32.

    MODEL is an ONNX file from `vitedge export`, or one exported elsewhere (transformers, timm, torch.onnx):
    without a vitedge manifest its preprocessing comes from --img-size/--mean/--std/... or --preprocessing
    FILE, and whatever is assumed is printed and recorded in the new manifest.

    INT8 must keep the model's predictions (--target-agreement / --target-cosine, measured on held-out
    images, with a 95 % interval). If the default misses the target, vitedge ranks the model's blocks
    and groups by what keeping each in float buys, reverts the most harmful ones by graph edits of the
    one quantized model (at most 25 % of the multiply-adds in float), tries whole-model settings, and
    writes the fastest candidate that meets it. Exit code 1: none met the target; the most faithful
    was written anyway, with the table of every candidate.
    """
    opts = QuantizeOptions.take(options)  # what remains are the preprocessing flags
    if opts.precision is None:
        raise VitedgeError("choose a precision", "pass --int8, --fp16 or --auto")
    if opts.search_budget < 0:
        raise VitedgeError(f"--search-budget {opts.search_budget} must be >= 0 seconds")
    try:
        path, man = quantize(model, output, preprocessing=preprocessing_from_cli(**options), **opts.quantize_kwargs())
    except FidelityNotMet as exc:
        _describe(model, exc.output, exc.manifest, opts)
        raise
    _describe(model, path, man, opts)


def _describe(model, path, man, opts: QuantizeOptions) -> None:
    q, rec, v, backend = man.quantization, man.quantization_record, man.verification, opts.backend
    if man.precision == "int8":
        cal = rec.calibration
        scheme = q.get("config", {}).get("scheme") or ", ".join(x for x in (q.get("scheme"), rec.configuration) if x)
        console.print(
            f"INT8 for {backend}: {scheme}, method {rec.method or opts.method or 'minmax'}, per-channel weights, "
            f"calibrated on {cal.get('size')} images of {cal.get('source')} (seed {opts.seed})"
        )
        if rec.excluded_nodes:
            kept = rec.excluded_nodes
            console.print(f"kept in float: {len(kept)} matrix ops" + (f" ({', '.join(kept)})" if len(kept) <= 6 else ""))
    elif man.precision == "fp32":
        console.print(f"not quantized: FP32 weights, run at {rec.float_precision or 'fp32'} ({rec.choice['why']})")
    else:
        detail = "FP16-compressed weights" if man.format == "openvino" else f"{len(rec.excluded_nodes)} LayerNorm/Softmax nodes kept in FP32"
        console.print(f"FP16 for {backend}: {detail}")
    a = v["agreement"]
    if man.task == "classification":
        line = (
            f"agreement with FP32 on {v['images']} images ({v['eval_set']}): top-1 {100 * a.get('top1_agreement', 1):.2f}%, "
            f"cosine min {a['cosine_min']:.5f} mean {a['cosine_mean']:.6f}, SNR {_db(a['snr_db'])} dB"
        )
        if "top1" in a:
            line += f"; top-1 accuracy {100 * a['top1']:.2f}% vs FP32 {100 * a['top1_fp32']:.2f}%"
        console.print(line)
    else:
        console.print(f"agreement with FP32 on {v['images']} images ({v['eval_set']}), per output:")
    for name, o in (a.get("outputs") or {}).items():
        console.print(
            f"  {name} {tuple(o['shape'])}: cosine min {o['cosine_min']:.5f} mean {o['cosine_mean']:.6f}, "
            f"max abs error {o['max_abs_error']:.3g}, SNR {_db(o['snr_db'])} dB"
        )
    if v.get("note"):
        console.print(v["note"])
    size_in, size_out = artifact_size(model, Manifest.find(model)[1]), artifact_size(path, man)  # with external data / .bin
    console.print(f"[green]wrote[/] {path} ({size_out / 1e6:.2f} MB, {size_change(size_out, size_in, 'FP32')}) and {man.sidecar_path(path)}")
    if (rec.max_drop or {}).get("report"):
        console.print(f"sensitivity table: {path.parent / rec.max_drop['report']}")
    if rec.fidelity:
        console.print(rec.fidelity["summary"])
        if rec.choice:
            console.print(f"--auto chose {rec.choice['why']}")
        console.print(f"fidelity table: {path.parent / rec.fidelity['table']}")


def _db(v) -> str:
    return "inf" if v is None else f"{v:.1f}"
