from __future__ import annotations

from pathlib import Path

import click

from ..ui import console
from ._common import BackendChoice, preprocessing_from_cli, preprocessing_options


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--int8", "precision", flag_value="int8", help="INT8 with calibration (MatMul/Gemm/Conv; LayerNorm/Softmax/GELU stay float).")
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 weights/math, FP32 inputs/outputs.")
@click.option("--auto", "precision", flag_value="auto",
              help="INT8 where it pays: run the INT8 search, measure the FP32 model at this CPU's fastest float precision "
                   "(bf16 on AVX-512 BF16/AMX CPUs) the same way, and write the faster one that meets the fidelity target.")
@click.option("--backend", type=BackendChoice("quantize"), default="onnxruntime", show_default=True,
              help="Target runtime: onnxruntime/tensorrt write .onnx (QDQ), openvino writes IR .xml+.bin.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration images: folder (recursive, class sub-folders allowed) or preprocessed .npy/.npz. "
                   "Required for INT8 except for the reference model.")
@click.option("--samples", type=int, default=None, help="Calibration images to use (default: all, up to 300; sampled with --seed).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="Activation range calibration (default: minmax; entropy for --backend tensorrt, as NVIDIA's tools do).")
@click.option("--target-agreement", type=float, default=0.98, show_default=True,
              help="INT8 fidelity target for classifiers: top-1 agreement with FP32 on held-out images.")
@click.option("--target-cosine", type=float, default=0.995, show_default=True,
              help="INT8 fidelity target for other outputs (features, dense maps): minimum per-image output cosine.")
@click.option("--search-budget", type=float, default=900, show_default=True, metavar="SECONDS",
              help="When the default INT8 misses the target, time allowed for trying other configurations (0: default only). "
                   "Every try is written to <out>.fidelity.md/.json.")
@click.option("--max-drop", type=float, default=None,
              help="Also bound the top-1 points INT8 may lose (on --val labels, else vs FP32 predictions). "
                   "TensorRT: the most sensitive layers are kept in float until it fits (<out>.sensitivity.md/.json).")
@click.option("--min-calib", type=int, default=16, show_default=True,
              help="Fewest calibration images accepted; lower it only if you know the ranges will still be representative.")
@click.option("--val", type=click.Path(path_type=Path), default=None,
              help="Held-out images for the agreement numbers and --max-drop (default: a held-out part of --calib).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and the held-out split.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .onnx (onnxruntime, tensorrt) or .xml (openvino).")
@preprocessing_options
def command(model, precision, backend, calib, samples, method, target_agreement, target_cosine, search_budget, max_drop, min_calib,
            val, seed, output, **pre_flags):
    """Quantize an FP32 ONNX model to INT8 or FP16 and measure it against FP32.

    MODEL is an ONNX file from `vitedge export`, or one exported elsewhere (transformers, timm, torch.onnx):
    without a vitedge manifest its preprocessing comes from --img-size/--mean/--std/... or --preprocessing
    FILE, and whatever is assumed is printed and recorded in the new manifest.

    INT8 must keep the model's predictions (--target-agreement / --target-cosine, measured on held-out
    images). If the default configuration misses the target, vitedge tries a bounded ladder of others
    and writes the fastest that meets it. Exit code 1: no configuration met the target; the most
    faithful one was written anyway, with the table of every try.
    """
    from ..errors import VitedgeError
    from ..quantization import FidelityNotMet, Target, quantize

    if precision is None:
        raise VitedgeError("choose a precision", "pass --int8, --fp16 or --auto")
    if search_budget < 0:
        raise VitedgeError(f"--search-budget {search_budget} must be >= 0 seconds")
    try:
        path, man = quantize(model, output, precision=precision, backend=backend, calib=calib, samples=samples, method=method,
                             max_drop=max_drop, val=val, seed=seed, preprocessing=preprocessing_from_cli(**pre_flags),
                             target=Target(target_agreement, target_cosine, max_drop), search_budget=search_budget, min_calib=min_calib)
    except FidelityNotMet as exc:
        _describe(model, exc.output, exc.manifest, exc.manifest.precision, backend, method, seed)
        raise
    _describe(model, path, man, man.precision, backend, method, seed)


def _describe(model, path, man, precision, backend, method, seed) -> None:
    q, v = man.quantization, man.verification
    if precision == "int8":
        cal = q.get("calibration", {})
        scheme = q.get("config", {}).get("scheme") or ", ".join(x for x in (q.get("scheme"), q.get("configuration")) if x)
        console.print(f"INT8 for {backend}: {scheme}, method {q.get('method') or method or 'minmax'}, per-channel weights, "
                      f"calibrated on {cal.get('size')} images of {cal.get('source')} (seed {seed})")
        if q.get("excluded_nodes"):
            kept = q["excluded_nodes"]
            console.print(f"kept in float: {len(kept)} matrix ops" + (f" ({', '.join(kept)})" if len(kept) <= 6 else ""))
    elif precision == "fp32":
        console.print(f"not quantized: FP32 weights, run at {q.get('float_precision') or 'fp32'} ({q['choice']['why']})")
    else:
        console.print(f"FP16 for {backend}" + (f": {len(q.get('excluded_nodes', []))} LayerNorm/Softmax nodes kept in FP32" if backend != "openvino" else ": FP16-compressed weights"))
    a = v["agreement"]
    if man.task == "classification":
        line = (f"agreement with FP32 on {v['images']} images ({v['eval_set']}): top-1 {100 * a.get('top1_agreement', 1):.2f}%, "
                f"cosine min {a['cosine_min']:.5f} mean {a['cosine_mean']:.6f}, SNR {_db(a['snr_db'])} dB")
        if "top1" in a:
            line += f"; top-1 accuracy {100 * a['top1']:.2f}% vs FP32 {100 * a['top1_fp32']:.2f}%"
        console.print(line)
    else:
        console.print(f"agreement with FP32 on {v['images']} images ({v['eval_set']}), per output:")
    for name, o in (a.get("outputs") or {}).items():
        console.print(f"  {name} {tuple(o['shape'])}: cosine min {o['cosine_min']:.5f} mean {o['cosine_mean']:.6f}, "
                      f"max abs error {o['max_abs_error']:.3g}, SNR {_db(o['snr_db'])} dB")
    if v.get("note"):
        console.print(v["note"])
    size_in = Path(model).stat().st_size
    size_out = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
    console.print(f"[green]wrote[/] {path} ({size_out / 1e6:.2f} MB, {size_in / max(size_out, 1):.1f}x smaller than FP32) and {man.sidecar_path(path)}")
    if q.get("max_drop", {}).get("report"):
        console.print(f"sensitivity table: {path.parent / q['max_drop']['report']}")
    if q.get("fidelity"):
        console.print(q["fidelity"]["summary"])
        if q.get("choice"):
            console.print(f"--auto chose {q['choice']['why']}")
        console.print(f"fidelity table: {path.parent / q['fidelity']['table']}")


def _db(v) -> str:
    return "inf" if v is None else f"{v:.1f}"
