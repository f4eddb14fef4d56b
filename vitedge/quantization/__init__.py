"""``vitedge quantize``: INT8 (calibrated) and FP16 artifacts for ONNX Runtime, OpenVINO and TensorRT.

Defaults are ViT-aware: only the matrix work (MatMul/Gemm/Conv) is quantized, LayerNorm, Softmax
and GELU stay in float; weights are per-channel.  Every artifact is measured against the FP32 model
on held-out images and the numbers go into its manifest.  See ``docs/quantize.md``.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

from .._onnx import onnx_precision, quantized_ops
from .._io import commit_files
from ..artifact import Artifact, writing
from ..backends import registry
from ..errors import FileProblem, GateFailed, VitedgeError
from ..export import embed_metadata
from ..manifest import Manifest
from ..options import METHODS, PRECISIONS
from ..runtime import load
from ..ui import note
from .calibration import MIN_CALIB, EvalSet, StreamingBatches, plan_data
from .fidelity import DEFAULT_BUDGET_S, Target

log = logging.getLogger("vitedge")

TENSORRT_DEFAULT_METHOD = "entropy"  # calibration of the TensorRT INT8 path when none is given (modelopt's INT8 default)

__all__ = ["quantize", "Target", "FidelityNotMet", "PRECISIONS", "METHODS"]


def _clean(obj):
    """JSON-safe numbers (inf/nan -> None)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _open_model(model, preprocessing=None, labels=None) -> tuple[Path, Manifest]:
    import onnx

    path = Path(model)
    if not path.exists():
        raise FileProblem(f"model {path} does not exist", "give the .onnx file written by `vitedge export`")
    if path.is_dir() or path.suffix.lower() != ".onnx":
        raise FileProblem(f"{path} is not an ONNX file", "quantize takes a .onnx file from `vitedge export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise FileProblem(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it with `vitedge export`") from None
    if not proto.graph.node:
        raise FileProblem(f"{path} is not a readable ONNX file (empty graph)", "re-export it with `vitedge export`")
    from ..foreign import ensure_manifest

    # a file vitedge did not export gets a manifest built from the file (what was assumed is printed)
    _, man = ensure_manifest(path, preprocessing, labels, announce=True)
    if man.precision not in ("fp32", None):
        raise VitedgeError(f"{path.name} is already {man.precision} (manifest)", "quantize the FP32 export instead")
    if quantized := quantized_ops(proto):
        raise VitedgeError(f"{path.name} is already quantized (it contains {sorted(quantized)[0]})", "quantize the FP32 export instead")
    if onnx_precision(proto) == "fp16":
        raise VitedgeError(f"{path.name} is already FP16 (half-precision weights)", "quantize the FP32 export instead")
    if not man.inputs:
        raise VitedgeError(f"{path.name} declares no inputs")
    return path, man


def _check_args(precision, backend, method, max_drop, samples, output: Path, model: Path):
    if precision not in PRECISIONS:
        raise VitedgeError(f"precision {precision!r} is not supported", "use int8, fp16 or auto")
    spec = registry.get(backend, "quantize")
    if precision not in spec.quantize:
        raise VitedgeError(f"backend {backend} has no {precision} quantization", f"it offers {', '.join(spec.quantize)}")
    if method not in METHODS:
        raise VitedgeError(f"calibration method {method!r} is not supported", f"use one of {', '.join(METHODS)}")
    if max_drop is not None:
        if precision == "fp16":
            raise VitedgeError("--max-drop applies to INT8 only", "drop --max-drop, or use --int8")
        if not (max_drop >= 0):
            raise VitedgeError(f"--max-drop {max_drop} must be >= 0 (top-1 percentage points)")
    if samples is not None and samples < 1:
        raise VitedgeError(f"--samples {samples} must be >= 1")
    want = spec.quantized_suffix
    if output.suffix.lower() != want:
        raise VitedgeError(f"output {output} must end in {want} for backend {backend}",
                           "; ".join(f"{b.name} writes {b.quantized_suffix}" for b in registry.backends("quantize")))
    if output.resolve() == model.resolve():
        raise VitedgeError("output would overwrite the input model", "choose another -o path")


def quantize(model, output, *, precision: str = "int8", backend: str = "onnxruntime", calib=None, samples: int | None = None,
             method: str | None = None, max_drop: float | None = None, val=None, seed: int = 0, preprocessing=None,
             labels: list[str] | None = None, target: "Target | None" = None, search_budget: float = DEFAULT_BUDGET_S,
             min_calib: int = MIN_CALIB) -> Artifact:
    """Quantize an FP32 ONNX export to INT8 or FP16 for a backend, measure it against FP32, write it with its manifest.

    ``model``: a ``.onnx`` file with its ``.vitedge.json`` sidecar.  ``output``: ``.onnx``
    (onnxruntime, tensorrt) or ``.xml`` (openvino).  ``calib``: folder of images / ``.npy`` /
    ``.npz`` (INT8; optional for the reference model, whose digits images ship with vitedge).
    ``val``: held-out images for the agreement numbers and the fidelity search (default: a seeded
    held-out part of ``calib``, never used for calibration).  ``min_calib``: fewest calibration images
    accepted (default 16).

    INT8 for onnxruntime/openvino is made by NNCF and must meet ``target`` (a :class:`Target`; default:
    top-1 agreement with FP32 >= 98 % for classifiers, minimum output cosine >= 0.995 otherwise;
    ``max_drop`` adds a bound on the top-1 points lost).  When the default configuration misses it,
    a ladder of configurations is tried for up to ``search_budget`` seconds (0: the default only); every
    try goes into ``<output>.fidelity.md/.json`` and the fastest that meets the target is written.
    If none does, the most faithful is written and :class:`FidelityNotMet` (exit code 1) is raised after
    the files are in place.  TensorRT's QDQ file comes from ONNX Runtime's quantizer; there ``max_drop``
    keeps the most sensitive layers in float (``<output>.sensitivity.md``).  ``preprocessing`` / ``labels``: for an ONNX file vitedge did not export (no manifest) - a
    :class:`~vitedge.preprocess.Preprocessing`, a dict of options (``img_size, mean, std, resize, crop,
    interpolation, json_path``) or a JSON file; see ``docs/foreign.md``.  Models that are not
    classifiers (e.g. a dense token map, several outputs) are measured per output.
    Returns the :class:`~vitedge.artifact.Artifact` (it unpacks as ``path, manifest``).
    """
    output = Path(output)
    precision, backend = str(precision).lower(), str(backend).lower()
    # TensorRT's INT8 path calibrates with entropy by default (NVIDIA's Model Optimizer does); NNCF's with min/max
    method = str(method or (TENSORRT_DEFAULT_METHOD if backend == "tensorrt" else "minmax")).lower()
    src_path = Path(model)
    target = target or Target()
    if max_drop is not None:  # the keyword is a shorthand for Target(max_drop=...): one value, never two
        if target.max_drop is not None and target.max_drop != max_drop:
            raise VitedgeError(f"max_drop={max_drop} contradicts the target's max_drop={target.max_drop}", "give it once")
        target = replace(target, max_drop=max_drop)
    max_drop = target.max_drop
    _check_args(precision, backend, method, max_drop, samples, output, src_path)
    src, parent = _open_model(src_path, preprocessing, labels)
    if max_drop is not None and parent.task != "classification":
        raise VitedgeError(f"--max-drop needs class logits, but {src.name} is a {parent.task} model",
                           "drop --max-drop: agreement per output (cosine, SNR) is reported instead")
    pre = parent.preprocessing_obj
    fixed = parent.inputs[0].shape[0] if parent.inputs[0].shape else None
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None  # a fixed-batch model is fed batches of exactly that size
    asked = precision
    plan = plan_data(parent, pre, precision=precision, calib=calib, val=val, samples=samples, seed=seed, min_calib=min_calib)
    enforce = True
    if precision in ("int8", "auto") and str((parent.model or {}).get("source", "")).startswith("preset:"):
        note("random-weight preset: its predictions mean nothing, so the INT8 fidelity target is measured and reported "
             "but not enforced, and no search is run")
        search_budget, enforce = 0.0, False
    for n in plan.notes:
        note(n)

    ev = EvalSet(plan.eval, pre, plan.eval_source, parent.labels, parent.inputs[0].shape, seed)
    if parent.task != "classification":
        ev.labels = None  # folder names are not classes of a non-classifier
    with load(src, backend="onnxruntime") as ref_engine:
        ev.set_reference(ref_engine)

    fmt = "openvino" if backend == "openvino" else "onnx"
    qinfo: dict = {"precision": precision, "backend": backend}
    fidelity = None
    report_files: list[str] = []
    with writing(output) as draft:
        scratch, tmp_out = draft.scratch, draft.path
        if precision == "fp16":
            from .fp16 import convert_onnx_fp16, openvino_fp16

            if backend == "openvino":  # overflow check: FP32 scan marks what FP16 cannot hold; compiled CPU output checked
                guard = openvino_fp16(src, tmp_out, ev)
                qinfo.update(tool="openvino.save_model(compress_to_fp16=True)", excluded_nodes=[],
                             overflow_guard=dict(guard, checked_on=ev.source),
                             notes=["weights stored as FP16; the CPU plugin decides the compute precision"])
            else:
                from .fp16 import FP16_KEEP_FLOAT

                res = convert_onnx_fp16(src, tmp_out, ev)  # overflow guard: nodes whose tensors overflow FP16 stay FP32
                qinfo.update(tool="onnxruntime.transformers.float16 (keep_io_types)", io="float32", excluded_nodes=res.kept,
                             kept_float_op_types=FP16_KEEP_FLOAT, overflow_guard=dict(res.guard, checked_on=ev.source))
            n_over = len(qinfo["overflow_guard"].get("kept_fp32_for_overflow", []))
            if qinfo["overflow_guard"].get("fp16_compute_safe") is False:
                note(f"activations exceed FP16 ({qinfo['overflow_guard']['hot_tensor_count']} tensors): {qinfo['overflow_guard']['advice']}")
            note(f"FP16 for {backend}: inputs/outputs FP32" + ("" if backend == "openvino" else f", {len(qinfo['excluded_nodes'])} nodes kept in FP32")
                 + (f" ({n_over} of them because their activations overflow FP16)" if n_over else ""))
        else:
            if backend == "tensorrt":  # ONNX Runtime's quantizer writes TensorRT's symmetric Q/DQ placement
                stream = StreamingBatches(plan.calib, pre, fixed or 8, min_count=min(samples or 1, len(plan.calib)), pad=fixed is not None)
                qinfo.update(method=method, per_channel=True, op_types=["MatMul", "Gemm", "Conv"])
                _ort_int8(src, tmp_out, scratch, backend, method, stream, parent, ev, max_drop, qinfo, output, report_files)
            else:
                stream = StreamingBatches(plan.calib, pre, 32, min_count=min(samples or 1, len(plan.calib)), label="preparing calibration images")
                fidelity = _int8_search(src, tmp_out, scratch, backend, method, stream, ev, fixed, target, search_budget,
                                        output, qinfo, report_files, classifier=parent.task == "classification",
                                        auto=precision == "auto", enforce=enforce)
                if precision == "auto":
                    precision = _auto_choice(fidelity, src, tmp_out, backend, qinfo)
            qinfo["calibration"] = {
                "source": plan.calib_source, "fingerprint": plan.calib.fingerprint(), "size": len(plan.calib) - stream.skipped,
                "requested": len(plan.calib), "skipped_unreadable": stream.skipped, "seed": seed,
            }
            if stream.skipped:
                note(f"{stream.skipped} unreadable calibration images skipped")

        # embed the essentials in ONNX outputs, as export does (so the file is self-describing)
        if fmt == "onnx":
            import onnx

            proto = onnx.load(str(tmp_out), load_external_data=False)
            tmp_man = parent.derive(output.name, fmt, precision=precision, backend=backend)
            embed_metadata(proto, tmp_man)
            if backend == "tensorrt":  # TensorRT parses this file as typed: no stale value_info types on weights
                from ..backends.tensorrt import drop_stale_value_info

                drop_stale_value_info(proto)
            onnx.save(proto, str(tmp_out))

        man = parent.derive(output.name, fmt, precision=precision, backend=backend, quantization=_clean(qinfo))
        run_cfg = {"config": {"INFERENCE_PRECISION_HINT": qinfo["float_precision"]}} if qinfo.get("float_precision") else {}
        # (the manifest's numbers are the IR at its dynamic batch; the table has the static batch-1 engine's too)
        with registry.open_engine("openvino" if backend == "openvino" else "onnxruntime", tmp_out, man, **run_cfg) as eng:
            metrics = ev.measure_outputs(ev.outputs(eng))
        man.verification = _clean({
            "reference": f"fp32 onnx ({src.name}, onnxruntime)", "engine": "openvino" if backend == "openvino" else "onnxruntime",
            "eval_set": ev.source, "images": len(ev), "random_inputs": ev.random, "agreement": metrics,
            "drop_pp": ev.drop_pp(metrics) if not ev.random else None, "drop_kind": ev.drop_kind,
        })
        if backend == "tensorrt":
            man.verification["note"] = "TensorRT is not installed here: the QDQ file was executed by ONNX Runtime (same Q/DQ arithmetic); build the engine with `vitedge compile -t tensorrt` on the GPU machine"
        artifact = draft.commit(man, extra=report_files)
    if fidelity is not None and not fidelity.met and enforce and not (asked == "auto" and fidelity.float_wins):
        raise FidelityNotMet(f"{fidelity.summary()}; wrote it anyway to {output} (table: {output.parent / qinfo['fidelity']['table']})",
                             "give more or more typical calibration images, raise --search-budget, lower the target "
                             "(--target-agreement/--target-cosine), or use --fp16", output=output, manifest=man)
    return artifact


class FidelityNotMet(GateFailed):
    """INT8 missed the fidelity target; the most faithful try was written anyway (``output``, ``manifest``)."""

    def __init__(self, message: str, hint: str | None = None, *, output: Path | None = None, manifest: Manifest | None = None):
        super().__init__(message, hint)
        self.output, self.manifest = output, manifest


def _auto_choice(res, src: Path, tmp_out: Path, backend: str, qinfo: dict) -> str:
    """``--auto``: keep the INT8 file, or write the FP32 model (run at the CPU's float precision) when it meets
    the target and INT8 is no faster here.  Returns the precision written (``int8`` / ``fp32``)."""
    from ..sysinfo import isa_summary

    why = res.choice()
    qinfo["choice"] = {"asked": "auto", "chosen": (res.reference.float_precision or "fp32") if res.float_wins else "int8",
                       "why": why, "cpu": isa_summary()}
    log.info("--auto chose %s", why)
    if not res.float_wins:
        return "int8"
    for f in (tmp_out, tmp_out.with_suffix(".bin"), tmp_out.parent / f"{tmp_out.name}.data"):  # the INT8 files
        f.unlink(missing_ok=True)
    if backend == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(src)), str(tmp_out), compress_to_fp16=False)  # the file that was measured
    else:
        import onnx

        from .._io import save_onnx

        save_onnx(onnx.load(str(src)), tmp_out, f"{tmp_out.name}.data")
    qinfo.update(float_precision=res.reference.float_precision, excluded_nodes=[],
                 tool=f"none: FP32 weights, run at {res.reference.float_precision or 'fp32'}")
    return "fp32"


def _int8_search(src, tmp_out, scratch, backend, method, stream, ev, fixed, target, budget, output, qinfo, report_files, classifier,
                 auto: bool = False, enforce: bool = True):
    """NNCF INT8 for OpenVINO / ONNX Runtime through the fidelity search; the chosen try lands at ``tmp_out``."""
    import nncf

    from . import fidelity as fid
    from .nncf_int8 import ESTIMATORS

    if ev.random:
        raise VitedgeError("INT8 needs held-out images to measure against FP32", "pass --val DIR or more --calib images")
    work = scratch / "search"
    work.mkdir()
    res = fid.search(src, backend, stream, ev, work, target=target, budget_s=budget, fixed_batch=fixed, method=method,
                     final_name=output.name, classifier=classifier, float_candidate=auto, enforce=enforce)
    fid.copy_chosen(res, tmp_out, backend)
    stem = output.name
    tj, tm = f"{stem}.fidelity.json", f"{stem}.fidelity.md"
    fid.write_table(res, scratch / tj, scratch / tm, model=src.name, backend=backend, eval_source=ev.source, images=len(ev))
    report_files += [tj, tm]
    c = res.chosen
    if backend == "onnxruntime":
        import onnx

        from .nncf_int8 import qdq_scheme

        qinfo["scheme"] = qdq_scheme(onnx.load(str(tmp_out), load_external_data=False))
    qinfo.update(tool=f"nncf {nncf.__version__}" + (" (OpenVINO IR)" if backend == "openvino" else " (QDQ ONNX for ONNX Runtime)"),
                 model_type="TRANSFORMER", preset="MIXED", method=method, per_channel=True, config=c.config.to_dict(),
                 configuration=c.describe(), range_estimator=ESTIMATORS[c.config.estimator], kept_float_groups=list(c.kept),
                 float_mac_share=c.float_share, excluded_nodes=fid.kept_float(res), float_precision=c.float_precision,
                 engine_batch=c.engine_batch,
                 fidelity={"target": target.describe(res.classifier), "met": res.met, "verdict": c.verdict,
                           "agreement_interval": c.interval, "images": c.metrics.get("images"), "chosen_candidate": c.no,
                           "candidates": len({r.no for r in res.rows}), "table": tm, "summary": res.summary()})
    shutil.rmtree(work, ignore_errors=True)
    return res


def _ort_int8(src, tmp_out, scratch, backend, method, stream, parent, ev, max_drop, qinfo, output, report_files):
    from . import ort_int8, sensitivity

    prepared = ort_int8.prepare(src, scratch / "prepared.onnx")
    cfg = ort_int8.tensorrt_config(prepared)  # NVIDIA's placement: attention core and GEMVs stay float
    note(f"INT8 {cfg.label} for {backend} ({method} calibration): {cfg.reason} "
         f"({len(cfg.float_roles.get('attention', []))} attention MatMuls, {len(cfg.float_roles.get('gemv', []))} GEMVs, "
         f"{len(cfg.float_roles.get('small', []))} small MatMuls in float)")
    cache = ort_int8.calibrate(prepared, stream, parent.inputs[0].name, method, scratch, symmetric=cfg.activation_symmetric)
    ort_int8.quantize_qdq(prepared, tmp_out, cache, cfg, method)
    qinfo.update(tool="onnxruntime.quantization.quantize_static (QDQ)", config=cfg.to_dict(), excluded_nodes=[],
                 float_by_placement=cfg.float_roles,
                 placement="NVIDIA (modelopt INT8 rules): MHA core and GEMVs in float, one shared Q/DQ pair per tensor")
    if max_drop is None:
        return
    full = sensitivity._run(tmp_out, ev)
    nodes = ort_int8.quantizable_nodes(prepared, cfg)
    report = {"model": src.name, "backend": backend, "method": method, "scheme": cfg.label, "eval_set": ev.source, "images": len(ev),
              "drop_kind": ev.drop_kind, "max_drop": max_drop, "full_int8_drop_pp": full["drop_pp"], "kept_float": [], "steps": []}
    rj, rm = f"{output.name}.sensitivity.json", f"{output.name}.sensitivity.md"
    note(f"all layers INT8: {ev.drop_kind} {full['drop_pp']:.2f} pp on {ev.source} (budget {max_drop} pp); ranking {len(nodes)} layers")
    ranking = sensitivity.rank_layers(prepared, cache, cfg, method, nodes, ev, scratch)
    report["layers"] = ranking
    if full["drop_pp"] <= max_drop + 1e-9:
        report["result"] = "budget met with every layer in INT8"
        met, keep = True, []
    else:
        keep, best, steps, met = sensitivity.search(prepared, tmp_out, cache, cfg, method, ranking, ev, max_drop, full, scratch)
        report.update(kept_float=keep if met else [], steps=steps)
        report["result"] = (f"budget met keeping {len(keep)} of {len(nodes)} layers in float" if met else
                            f"budget NOT met: keeping {len(keep)} of {len(nodes)} layers in float still loses {best['drop_pp']:.2f} pp")
    sensitivity.write_report(scratch / rj, scratch / rm, _clean(report))
    if not met:  # the report is useful on its own: keep it, but write no model
        commit_files(scratch, {rj: output.parent / rj, rm: output.parent / rm})
        raise GateFailed(f"--max-drop {max_drop} pp cannot be met: {report['result']} on {ev.source} (sensitivity table: {output.parent / rm})",
                         "raise --max-drop, give more or better calibration images, or try --method percentile/entropy")
    qinfo["excluded_nodes"] = keep  # on top of the placement's float nodes (float_by_placement)
    qinfo["max_drop"] = {"budget_pp": max_drop, "full_int8_drop_pp": full["drop_pp"], "kept_float": keep, "report": rm,
                         "measured_on": ev.source, "metric": ev.drop_kind}
    note(f"kept {len(keep)} most sensitive layers in float: {', '.join(keep) or 'none'}")
    report_files += [rj, rm]
