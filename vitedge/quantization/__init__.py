"""``vitedge quantize``: INT8 (calibrated) and FP16 artifacts for ONNX Runtime, OpenVINO and TensorRT.

Defaults are ViT-aware: only the matrix work (MatMul/Gemm/Conv) is quantized, LayerNorm, Softmax
and GELU stay in float; weights are per-channel.  Every artifact is measured against the FP32 model
on held-out images and the numbers go into its manifest.  See ``docs/quantize.md``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .. import attention, distributed
from .._io import json_safe
from .._onnx import onnx_precision, quantized_ops
from ..artifact import Artifact, changed_file, check_files, check_output, writing
from ..backends import registry
from ..errors import FileProblem, GateFailed, ModelNotSupported, VitedgeError, first_line
from ..export import embed_metadata
from ..foreign import ensure_manifest
from ..manifest import Manifest
from ..options import DEFAULT_BUDGET_S, METHODS, PRECISIONS, Target
from ..runtime import load
from ..ui import note
from . import fidelity as fid
from .calibration import MIN_CALIB, EvalSet, plan_data, size_key, size_mix
from .strategies import Job
from .worker import Worker

log = logging.getLogger("vitedge")

__all__ = ["quantize", "Target", "FidelityNotMet", "PRECISIONS", "METHODS"]


def _reference_model(reference, parent: Manifest, src: Path) -> Path:
    """``--reference``: an FP32 ONNX file that takes the same input and gives the same outputs as the model."""
    path, man = _open_model(reference)
    if path.resolve() == src.resolve():
        return src
    same_in = [list(i.shape[1:]) for i in man.inputs] == [list(i.shape[1:]) for i in parent.inputs]
    same_out = [(o.name, list(o.shape[1:])) for o in man.outputs] == [(o.name, list(o.shape[1:])) for o in parent.outputs]
    if not (same_in and same_out):
        raise VitedgeError(
            f"--reference {path.name} does not take the same input and give the same outputs as {src.name}",
            "give the FP32 export of the same model (e.g. without --merge-tokens)",
        )
    if man.preprocessing != parent.preprocessing:
        raise VitedgeError(f"--reference {path.name} preprocesses images differently from {src.name}", "export both from the same model")
    return path


def _open_model(model, preprocessing=None, labels=None) -> tuple[Path, Manifest]:
    import onnx

    path = Path(model)
    if not path.exists():
        raise FileProblem(f"model {path} does not exist", "give the .onnx file written by `vitedge export`")
    if path.is_dir() or path.suffix.lower() != ".onnx":
        raise FileProblem(f"{path} is not an ONNX file", "quantize takes a .onnx file from `vitedge export`")
    _, recorded = Manifest.find(path)
    if recorded is not None:
        check_files(path, recorded)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        problem = changed_file(path, recorded, exc) if recorded is not None else None
        raise problem or FileProblem(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it with `vitedge export`") from None
    if not proto.graph.node:
        raise FileProblem(f"{path} is not a readable ONNX file (empty graph)", "re-export it with `vitedge export`")
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
        raise VitedgeError(f"--calib-samples {samples} must be >= 1")
    want = spec.quantized_suffix
    if output.suffix.lower() != want:
        raise VitedgeError(
            f"output {output} must end in {want} for backend {backend}",
            "; ".join(f"{b.name} writes {b.quantized_suffix}" for b in registry.backends("quantize")),
        )
    if output.resolve() == model.resolve():
        raise VitedgeError("output would overwrite the input model", "choose another -o path")
    check_output(output)


def quantize(
    model,
    output,
    *,
    precision: str = "int8",
    backend: str = "onnxruntime",
    calib=None,
    samples: int | None = None,
    method: str | None = None,
    max_drop: float | None = None,
    val=None,
    seed: int = 0,
    preprocessing=None,
    labels: list[str] | None = None,
    target: Target | None = None,
    search_budget: float = DEFAULT_BUDGET_S,
    min_calib: int = MIN_CALIB,
    reference=None,
    ray=None,
) -> Artifact:
    """Quantize an FP32 ONNX export to INT8 or FP16 for a backend, measure it against FP32, write it with its manifest.

    ``model``: a ``.onnx`` file with its ``.vitedge.json`` sidecar.  ``output``: ``.onnx``
    (onnxruntime, tensorrt) or ``.xml`` (openvino).  ``calib``: folder of images / ``.npy`` /
    ``.npz`` (INT8; optional for the reference model, whose digits images ship with vitedge).
    ``val``: held-out images for the agreement numbers and the fidelity search (default: a seeded
    held-out part of ``calib``, never used for calibration).  ``min_calib``: fewest calibration images
    accepted (default 16).  ``reference``: another FP32 ONNX model (same input, same outputs) that the target and
    the agreement are measured against instead of ``model``, e.g. the unmerged export of a token-merged ``model``,
    so that the target covers merging's loss as well as quantization's.  ``ray``: ``"auto"``, a cluster address or a
    :class:`~vitedge.distributed.RayOptions`: the INT8 search's independent evaluations (its ranking of the groups,
    the whole-model settings) run as Ray tasks (``pip install "vitedge[ray]"``; see ``docs/distributed.md``).

    INT8 for onnxruntime/openvino is made by NNCF and must meet ``target`` (a :class:`Target`; default:
    top-1 agreement with FP32 >= 98 % for classifiers, minimum output cosine >= 0.995 otherwise;
    ``max_drop`` adds a bound on the top-1 points lost).  When the default configuration misses it,
    a ladder of configurations is tried for up to ``search_budget`` seconds (0: the default only); every
    try goes into ``<output>.fidelity.md/.json`` and the fastest that meets the target is written.
    If none does, the most faithful is written and :class:`FidelityNotMet` (exit code 1) is raised after
    the files are in place.  TensorRT's QDQ file comes from ONNX Runtime's quantizer; there ``max_drop``
    keeps the most sensitive layers in float (``<output>.sensitivity.md``).  ``preprocessing`` / ``labels``: for an ONNX
    file vitedge did not export (no manifest) - a
    :class:`~vitedge.preprocess.Preprocessing`, a dict of options (``img_size, mean, std, resize, crop,
    interpolation, json_path``) or a JSON file; see ``docs/foreign.md``.  Models that are not
    classifiers (e.g. a dense token map, several outputs) are measured per output.
    Returns the :class:`~vitedge.artifact.Artifact` (it unpacks as ``path, manifest``).
    """
    output = Path(output)
    precision, backend = str(precision).lower(), str(backend).lower()
    strategy = registry.get(backend, "quantize").quantization()
    method = str(method or strategy.default_method).lower()
    src_path = Path(model)
    target = target or Target()
    if max_drop is not None:  # the keyword is a shorthand for Target(max_drop=...): one value, never two
        if target.max_drop is not None and target.max_drop != max_drop:
            raise VitedgeError(f"max_drop={max_drop} contradicts the target's max_drop={target.max_drop}", "give it once")
        target = replace(target, max_drop=max_drop)
    _check_args(precision, backend, method, target.max_drop, samples, output, src_path)
    ray_options = distributed.RayOptions.of(ray)
    if ray_options is not None and not (precision in ("int8", "auto") and strategy.uses_worker):
        raise VitedgeError(f"--ray runs the INT8 search's evaluations on Ray; {precision} for {backend} has no search", "drop --ray")
    # the INT8 search's worker process imports NNCF and the runtimes while this one opens the model and reads the images
    worker = Worker.early() if precision in ("int8", "auto") and strategy.uses_worker else None
    try:
        src, parent = _open_model(src_path, preprocessing, labels)
        if target.max_drop is not None and parent.task != "classification":
            raise VitedgeError(
                f"--max-drop needs class logits, but {src.name} is a {parent.task} model",
                "drop --max-drop: agreement per output (cosine, SNR) is reported instead",
            )
        pre = parent.preprocessing_obj
        fixed = parent.inputs[0].shape[0] if parent.inputs[0].shape else None
        fixed = fixed if isinstance(fixed, int) and fixed > 0 else None  # a fixed-batch model is fed batches of exactly that size
        plan = plan_data(parent, pre, precision=precision, calib=calib, val=val, samples=samples, seed=seed, min_calib=min_calib)
        enforce = True
        if precision in ("int8", "auto") and str((parent.model or {}).get("source", "")).startswith("preset:"):
            note("random-weight preset: its predictions mean nothing, so no INT8 search is run (the fidelity target is still measured)")
            search_budget, enforce = 0.0, False
        for n in plan.notes:
            note(n)

        sizes = size_mix(pre)  # a dynamic-size model: calibrated and held to the target at each of these sizes
        if sizes and len(sizes) > 1:
            arrays = [s for s in (plan.calib, plan.eval) if s is not None and s.arrays is not None]
            if arrays:
                raise ModelNotSupported(
                    f"{src.name} is a dynamic-size export, but {arrays[0].source} holds preprocessed arrays of one size",
                    "give folders of images: vitedge preprocesses them at each size the engine serves",
                )
            calibrated = "calibrated on a mix of" if precision != "fp16" else "checked at"
            note(f"dynamic size: {calibrated} {', '.join(map(size_key, sizes))} and held to the target at each size")
        ev = EvalSet(plan.eval, pre, plan.eval_source, parent.labels, parent.inputs[0].shape, seed, sizes=sizes)
        if parent.task != "classification":
            ev.labels = None  # folder names are not classes of a non-classifier
        ref_backend, ref_options = strategy.reference  # e.g. OpenVINO at f32: the same FP32 math, faster than ONNX Runtime on a CPU
        ref_path = _reference_model(reference, parent, src) if reference is not None else src
        if ref_path == src and ((parent.model or {}).get("graph", {}).get("token_merging") or {}).get("r"):
            note(f"{src.name} merges tokens: the target covers quantization only; pass --reference UNMERGED.onnx to cover merging too")
        # computed when first needed: the INT8 search runs it while its worker calibrates
        ev.defer_reference(lambda: load(ref_path, backend=ref_backend, **ref_options))

        fmt = strategy.format
        with writing(output) as draft:
            job = Job(
                src,
                parent,
                draft.path,
                output,
                draft.scratch,
                backend,
                precision,
                method,
                plan,
                ev,
                target,
                search_budget,
                enforce,
                samples,
                fixed,
                worker,
                ray_options,
            )
            done = strategy.quantize(job)
            qinfo = {"precision": precision, "backend": backend, **done.info}
            if done.stream is not None:
                stream = done.stream
                qinfo["calibration"] = {
                    "source": plan.calib_source,
                    "fingerprint": job.calib.fingerprint(),
                    "size": len(job.calib) - stream.skipped,
                    "requested": len(job.calib),
                    "skipped_unreadable": stream.skipped,
                    "seed": seed,
                    **({"sizes": [size_key(hw) for hw in stream.sizes]} if stream.sizes else {}),
                }
                if stream.skipped:
                    note(f"{stream.skipped} unreadable calibration images skipped")

            # embed the essentials in ONNX outputs, as export does (so the file is self-describing)
            if fmt == "onnx":
                import onnx

                proto = onnx.load(str(draft.path), load_external_data=False)
                embed_metadata(proto, parent.derive(output.name, fmt, precision=done.precision, backend=backend))
                strategy.finish_onnx(proto)
                onnx.save(proto, str(draft.path))

            man = parent.derive(output.name, fmt, precision=done.precision, backend=backend, quantization=json_safe(qinfo))
            metrics, engine = done.measured, done.measured_as  # the search measured the file it wrote on these images
            if metrics is None:
                with registry.open_engine(strategy.measured_by, draft.path, man, **strategy.engine_options(qinfo)) as eng:
                    metrics, engine = ev.measure_outputs(ev.outputs(eng)), strategy.measured_by
            man.verification = json_safe(
                {
                    "reference": f"fp32 onnx ({ref_path.name}, {ref_backend}{' f32' if ref_options else ''})",
                    "engine": engine,
                    "eval_set": ev.source,
                    "images": len(ev),
                    "random_inputs": ev.random,
                    "agreement": metrics,
                    "drop_pp": ev.drop_pp(metrics) if not ev.random else None,
                    "drop_kind": ev.drop_kind,
                }
            )
            if strategy.verification_note:
                man.verification["note"] = strategy.verification_note
            maps = _attention_agreement(
                lambda: registry.open_engine(strategy.measured_by, draft.path, man, **strategy.engine_options(qinfo)),
                lambda: load(ref_path, backend=ref_backend, **ref_options),
                ev,
            )
            man.verification["attention"] = maps
            if "fidelity" in (man.quantization or {}):  # the search's chosen try: its table records where it looks
                man.quantization["fidelity"]["attention"] = {k: v for k, v in maps.items() if k != "per_image"}
                table = draft.scratch / man.quantization["fidelity"]["table"]
                fid.add_attention(table.with_suffix(".json"), table, maps)
            artifact = draft.commit(man, extra=done.report_files)
    finally:
        if worker is not None:
            worker.close()  # (the search closes it when it ran; this is for the errors before it)
    fidelity = done.fidelity
    if fidelity is not None and not fidelity.met and not (precision == "auto" and fidelity.float_wins):
        # the README's rule holds for random-weight presets too: a missed target exits 1, whatever the reason
        raise FidelityNotMet(
            ("" if enforce else "random-weight preset (no search run): ")
            + f"{fidelity.summary()}; wrote it anyway to {output} (table: {output.parent / qinfo['fidelity']['table']})",
            "give more or more typical calibration images, raise --search-budget, lower the target "
            "(--target-agreement/--target-cosine), try --auto, or use --fp16"
            if enforce
            else "random weights make near-tied predictions that INT8 flips: quantize a trained checkpoint to judge INT8",
            output=output,
            manifest=man,
            random_weights=not enforce,
        )
    return artifact


ATTENTION_IMAGES = 32  # held-out images whose attention maps are compared with the FP32 model's


def _attention_agreement(open_engine, open_reference, ev: EvalSet) -> dict:
    """Where the written file looks against where the FP32 reference looks (attention rollout) on the first
    :data:`ATTENTION_IMAGES` held-out images (at the model's own size): :func:`vitedge.attention.compare_maps`'s
    summary and per-image numbers, or ``{"available": False, "reason": ...}`` for a model without maps (a
    token-merged graph, an ONNX file whose attention vitedge cannot find) or without images."""
    if ev.random:
        return {"available": False, "reason": "no images: maps of random inputs say nothing"}
    x = next(iter(ev.parts(ATTENTION_IMAGES)[0]))
    try:
        with open_engine() as eng, open_reference() as ref:
            ours, theirs = eng.attention(x, "rollout"), ref.attention(x, "rollout")
    except VitedgeError as exc:
        return {"available": False, "reason": first_line(exc)}
    res = attention.compare_maps(ours, theirs, [f"held-out image {i}" for i in range(len(x))], moved=0)
    del res["moved"]
    note(
        f"attention maps (rollout) on {len(x)} held-out images: correlation with FP32 median {res['correlation']['median']:.4f}, "
        f"min {res['correlation']['min']:.4f}; top-10 % patches shared, median {100 * res['top10_overlap']['median']:.0f} %"
    )
    return {"kind": "rollout", "size": size_key(x.shape[2:]), **res}


class FidelityNotMet(GateFailed):
    """INT8 missed the fidelity target; the most faithful try was written anyway (``output``, ``manifest``).
    ``random_weights``: the model is a random-weight preset (a trial: no search was run)."""

    def __init__(self, message: str, hint: str | None = None, *, output: Path | None = None, manifest: Manifest | None = None, random_weights: bool = False):
        super().__init__(message, hint)
        self.output, self.manifest, self.random_weights = output, manifest, random_weights
