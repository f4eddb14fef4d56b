"""`vitedge compile`: turn an exported / quantized model into a deployable engine.

Inputs: the FP32 ONNX written by ``vitedge export``, or the FP16 ONNX, INT8 QDQ ONNX or OpenVINO IR
written by ``vitedge quantize`` (a model name or checkpoint is exported first).  Targets:

* ``onnxruntime`` - the graph optimised once and saved (``SessionOptions.optimized_model_filepath``)
  so a process starts without re-optimising; portable "extended" level, CPU provider;
* ``openvino`` - an IR (``.xml``/``.bin``) with the performance hint, threads/streams and inference
  precision recorded for the runtime; optionally the compiled blob (``.blob``) for a fast cold start;
* ``tensorrt`` - a serialized ``.engine`` for NVIDIA GPUs (see :mod:`vitedge.backends.tensorrt`).

Every engine is run on random and real inputs against the model it was compiled from before it is
written, and the agreement goes into its manifest.  As everywhere in vitedge, files are produced in
a scratch folder and moved into place only when every step passed.

Default shape (``batch="auto"``): a *latency* engine is made static at batch 1 - measured faster
than a dynamic-batch engine for single-frame inference on both CPU backends (see docs/runtime.md);
the runtime still accepts any batch by running it in chunks.  A *throughput* engine keeps the
dynamic batch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import compare, token_merging
from ._onnx import onnx_precision
from .artifact import Artifact, changed_file, check_files, check_output, writing
from .backends import registry
from .backends.base import Engine
from .backends.onnxruntime import OnnxRuntimeEngine, session
from .backends.openvino import OpenVINOEngine, compiled_model, default_precision_hint, openvino_config  # noqa: F401  (public here since 0.1)
from .data import default_check_images
from .errors import FileProblem, VitedgeError, first_line
from .export import export_onnx
from .foreign import ensure_manifest
from .manifest import Manifest, TensorSpec
from .models.loading import ModelSpec
from .options import HINTS, PRECISION_HINTS  # declared with the compile options
from .timing import Slot, interleaved, paired_speedup
from .ui import note

log = logging.getLogger("vitedge")

_MIN_COSINE = 0.99  # an engine this far from its source is broken, not merely lower precision


# -- inputs -------------------------------------------------------------------------------------
def _source(model, img_size, scratch: Path, preprocessing=None) -> tuple[Path, Manifest]:
    """The artifact to compile and its manifest (exporting a model name/checkpoint first).

    An ONNX file without a vitedge manifest gets one from the file and ``preprocessing`` (see
    :func:`vitedge.foreign.ensure_manifest`); ``img_size`` stands in for a dynamic-size file's size."""
    if isinstance(model, (str, Path)) and not isinstance(model, ModelSpec):
        p = Path(model)
        if p.suffix in (".onnx", ".xml") or p.name.endswith(".vitedge.json"):
            artifact, man = Manifest.find(p)
            if not artifact.exists():
                raise FileProblem(f"artifact {artifact} named by the manifest does not exist")
            if man is None and artifact.suffix != ".onnx":
                raise VitedgeError(f"{artifact} has no vitedge manifest", "compile the ONNX file, or re-create the IR with vitedge quantize")
            if man is None or preprocessing is not None:
                if man is None and isinstance(img_size, int):  # --img-size also sizes a manifest-less file
                    if preprocessing is None:
                        preprocessing = {"img_size": img_size}
                    elif isinstance(preprocessing, dict) and preprocessing.get("img_size") is None:
                        preprocessing = {**preprocessing, "img_size": img_size}
                _, man = ensure_manifest(p, preprocessing, announce=True)
            if img_size is not None and not _size_matches(man, img_size):
                raise VitedgeError(
                    f"{artifact} takes {tuple(man.inputs[0].shape[2:])} inputs, not {img_size}: a compiled engine cannot change the resolution",
                    "re-export the model with --img-size (position embeddings are interpolated there)",
                )
            if artifact.suffix not in (".onnx", ".xml"):
                raise VitedgeError(f"{artifact} cannot be compiled", "compile an ONNX file or OpenVINO IR (.xml)")
            return artifact, man
        if p.suffix in (".engine", ".plan", ".blob"):
            raise VitedgeError(f"{p} is already a compiled engine", "compile the ONNX file it came from")

    out = scratch / "exported.onnx"
    _, man = export_onnx(model, out, img_size=img_size)
    return out, man


def _size_matches(man: Manifest, img_size) -> bool:
    hw = man.inputs[0].shape[2:] if man.inputs else []
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return all(not isinstance(d, int) or d <= 0 or d == s for d, s in zip(hw, size, strict=False))


def _dims(man: Manifest) -> list:
    if not man.inputs:
        raise VitedgeError(f"{man.artifact}: the manifest lists no input", "re-create it with vitedge export")
    return list(man.inputs[0].shape)


def resolve_batch(batch, hint: str) -> int | None:
    """``'auto'`` -> 1 for latency engines, dynamic (None) for throughput; 'dynamic' -> None."""
    if batch is None or (isinstance(batch, str) and batch.lower() == "dynamic"):
        return None
    if isinstance(batch, str) and batch.lower() == "auto":
        return 1 if hint == "latency" else None
    try:
        b = int(batch)
    except (TypeError, ValueError):
        raise VitedgeError(f"batch {batch!r} is not 'auto', 'dynamic' or a positive integer") from None
    if b < 1:
        raise VitedgeError(f"batch {b} must be >= 1 (or 'dynamic' / 'auto')")
    return b


def _check_options(hint, precision_hint, threads):
    if hint not in HINTS:
        raise VitedgeError(f"unknown performance hint {hint!r}", "use latency or throughput")
    if precision_hint is not None and precision_hint not in PRECISION_HINTS:
        raise VitedgeError(f"unknown precision hint {precision_hint!r}", f"use one of {', '.join(PRECISION_HINTS)}")
    if threads is not None and int(threads) < 1:
        raise VitedgeError(f"threads {threads} must be >= 1")


# -- ONNX helpers -------------------------------------------------------------------------------
def _specs_with_batch(specs: list[TensorSpec], batch: int | None) -> list[TensorSpec]:
    if batch is None:
        return [TensorSpec(s.name, list(s.shape), s.dtype) for s in specs]
    return [TensorSpec(s.name, [batch] + list(s.shape[1:]), s.dtype) for s in specs]


# -- verification -------------------------------------------------------------------------------
def _check_inputs(man: Manifest, batch: int | None) -> dict[str, np.ndarray]:
    dims = _dims(man)
    c, h, w = ([d if isinstance(d, int) and d > 0 else 0 for d in dims[1:4]] + [0, 0, 0])[:3]
    pre = man.preprocessing_obj
    if pre is not None:
        h, w = pre.img_size
        c = c or 3
    if not (c and h and w):
        return {}
    n = batch or 3  # an odd count exercises the runtime's chunking on fixed-batch engines too
    rng = np.random.default_rng(0)
    sets = {"random": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    sizes = man.dynamic_size  # a dynamic-size engine is checked at the sizes its export was verified at
    for sh, sw in sizes.check_sizes(h)[1:] if sizes else []:
        sets[f"random {sh}x{sw}"] = rng.standard_normal((n, c, sh, sw)).astype(np.float32)
    images = default_check_images()
    if images and pre is not None:
        sets["images"] = pre.fixed().batch(images)  # one batch: a dynamic-size model's images at its own size
    return sets


def _reference_outputs(src: Path, man: Manifest, inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    eng: Engine
    if src.suffix == ".onnx":
        eng = OnnxRuntimeEngine(src, man, providers=["CPUExecutionProvider"], opt_level="basic")
    else:
        # f32, except for an INT8 IR whose float parts the fidelity search measured and chose in bf16 on held-out
        # images: then the check is about what compiling changed, not about that precision again
        eng = OpenVINOEngine(src, man, device="CPU", config={"INFERENCE_PRECISION_HINT": man.searched("float_precision") or "f32"}, use_blob=False)
    with eng:
        return {k: eng.infer_all(x) for k, x in inputs.items()}


def _picks(man: Manifest) -> list[str]:
    """The tensors of a token-merged graph that hold each merge's picks (``vitedge.models.tome.Matching``)."""
    return list(((man.model or {}).get("graph", {}).get("token_merging") or {}).get("picks") or [])


def _engine_picks(src: Path, child: Manifest, names: list[str], inputs: dict[str, np.ndarray], scratch: Path) -> dict[str, list[np.ndarray]] | None:
    """The picks the compiled engine makes on ``inputs``, from its twin: the source graph with the pick tensors as
    extra outputs, run by the same backend with the engine's settings (precision, batch).  ``None`` where the
    backend has no such twin (TensorRT here) or it fails."""
    if child.backend not in ("openvino", "onnxruntime"):
        return None
    import onnx

    try:
        proto = onnx.load(str(src))
        proto.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
        twin = scratch / "picks_twin.onnx"
        onnx.save(proto, str(twin))
        fixed = child.inputs[0].shape[0] if child.inputs and child.inputs[0].shape else None
        b = fixed if isinstance(fixed, int) and fixed > 0 else None
        got: dict[str, list[np.ndarray]] = {}
        if child.backend == "openvino":
            settings = child.compile or {}
            cfg = {"PERFORMANCE_HINT": "LATENCY", **settings.get("openvino_config", {})}
            first = next(iter(inputs.values()))
            compiled = compiled_model(twin, settings.get("device") or "CPU", cfg, shape=[b, *first.shape[1:]] if b else None)
            req = compiled.create_infer_request()
            outs = [o for o in compiled.outputs if o.get_names() & set(names)]
            outs.sort(key=lambda o: names.index(next(iter(o.get_names() & set(names)))))
            for key, x in inputs.items():
                step = b or len(x)
                parts = [req.infer({0: x[i : i + step]}) for i in range(0, len(x), step)]
                got[key] = [np.concatenate([np.array(p[o]) for p in parts]) for o in outs]
        else:
            sess = session(twin, opt_level=(child.compile or {}).get("runtime_opt_level"))
            name = sess.get_inputs()[0].name
            for key, x in inputs.items():
                step = b or len(x)
                parts = [sess.run(names, {name: x[i : i + step]}) for i in range(0, len(x), step)]
                got[key] = [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        twin.unlink(missing_ok=True)
        return got
    except Exception as exc:  # the usual check then, which a near-tie can fail
        log.info("token merging: the engine's picks could not be read (%s)", exc)
        return None


def _forced_reference(src: Path, names: list[str], inputs: dict[str, np.ndarray], picks: dict[str, list[np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """The source graph run by ONNX Runtime with the merges' picks imposed: each pick tensor becomes an input."""
    import onnx

    proto = onnx.load(str(src))
    for node in proto.graph.node:
        node.output[:] = [f"{o}/computed" if o in names else o for o in node.output]
    proto.graph.input.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in names])
    sess = session(proto.SerializeToString())
    first = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    return {key: dict(zip(outs, sess.run(outs, {first: x, **dict(zip(names, picks[key], strict=True))}), strict=True)) for key, x in inputs.items()}


def _verify(engine, refs: dict[str, dict[str, np.ndarray]], inputs: dict[str, np.ndarray]) -> dict:
    """Agreement of every output with the source model; the first output's numbers at the top level,
    and per output under ``outputs`` for models with several outputs or non-classifier outputs."""
    checks = {}
    for key, x in inputs.items():
        ref = refs[key]
        outs = compare.match_outputs(ref, engine.infer_all(x), "the compiled engine")
        first = next(iter(ref))
        r = compare.output_metrics(ref[first], outs[first])
        r["batch"] = int(len(x))
        if len(ref) > 1 or ref[first].ndim != 2:
            r["outputs"] = compare.per_output(ref, outs, shape=False)
        checks[key] = r
    for key, r in checks.items():
        every = list((r.get("outputs") or {}).values()) or [r]
        finite, cos = all(o["finite"] for o in every), min(o["cosine_min"] for o in every)
        if not finite or cos < _MIN_COSINE:
            raise VitedgeError(
                f"the compiled engine disagrees with its source on {key} inputs (cosine {cos:.4f}, finite={finite})",
                "try --precision-hint f32 or another target; report the model if it persists",
            )
    return checks


# -- what the INT8 search chose ----------------------------------------------------------------
# -- public API ---------------------------------------------------------------------------------
def default_output(src_name: str, target: str, folder: Path) -> Path:
    stem = src_name
    for suffix in (".onnx", ".xml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return folder / registry.get(target, "compile").default_engine_name(stem)


def _backend_options(backend: registry.Backend, given: dict) -> dict:
    """The backend-specific options that were given, refused when ``backend`` does not take them."""
    out = {}
    for key, value in given.items():
        if value is None or value is False:
            continue
        if key not in backend.compile_options:
            owners = [b.name for b in registry.backends("compile") if key in b.compile_options]
            flag = "--" + key.replace("_", "-").replace("export-blob", "blob")
            raise VitedgeError(
                f"{flag} is an option of {' and '.join(owners) or 'no backend'}, not {backend.name}",
                f"use --backend {owners[0]}, or drop {flag}" if owners else f"drop {flag}",
            )
        out[key] = value
    return out


def compile_model(
    model: str | Path | Any,
    output: str | Path | None = None,
    *,
    target: str = "onnxruntime",
    batch: int | str | None = "auto",
    img_size: int | None = None,
    threads: int | None = None,
    hint: str = "latency",
    precision_hint: str | None = None,
    device: str | None = None,
    streams: int | str | None = None,
    export_blob: bool = False,
    workspace_mb: int | None = None,
    profile: str | tuple | None = None,
    timing_cache: str | Path | None = None,
    verify: bool = True,
    preprocessing=None,
    **backend_options,
) -> Artifact:
    """Compile ``model`` for ``target``; returns the engine :class:`~vitedge.artifact.Artifact` (``path, manifest``).

    ``model``: an ONNX file (FP32 from export, FP16/INT8 from quantize), an OpenVINO IR ``.xml``,
    or a model name/checkpoint (exported first).  ``batch``: ``"auto"`` (static 1 for latency,
    dynamic for throughput), ``None``/``"dynamic"`` or a fixed size.  ``threads``: intra-op threads
    (default: all cores).  ``hint``: ``latency`` or ``throughput``.  ``precision_hint``: ``f32``,
    ``bf16`` or ``f16`` for the ops computed in float (OpenVINO: inference precision; TensorRT:
    the float type written into the strongly typed network, default f16).  ``device``: OpenVINO device (CPU, GPU, AUTO, ...).  ``streams``:
    OpenVINO streams.  ``export_blob``: also write the OpenVINO compiled blob (fast cold start).
    ``workspace_mb``, ``profile`` (``"min,opt,max"`` batch sizes), ``timing_cache``: TensorRT.
    ``preprocessing``: for an ONNX file without a vitedge manifest (a Preprocessing, a dict of options
    or a JSON file; see ``docs/foreign.md``).  A fixed-batch model keeps its batch with ``batch="auto"``.
    ``backend_options``: options of a backend registered outside vitedge (its ``compile_options``).
    """
    backend = registry.get(target, "compile")
    _check_options(hint, precision_hint, threads)
    extra = _backend_options(
        backend,
        {"streams": streams, "export_blob": export_blob, "workspace_mb": workspace_mb, "profile": profile, "timing_cache": timing_cache, **backend_options},
    )
    auto_batch = isinstance(batch, str) and batch.lower() == "auto"
    batch = resolve_batch(batch, hint)
    t0 = time.perf_counter()
    if output is not None:
        check_output(output)
    parent = Path(output).parent if output is not None else Path(model).parent if isinstance(model, (str, Path)) and Path(model).suffix else Path.cwd()
    with writing(output if output is not None else parent / "engine") as draft:
        scratch = draft.scratch
        src, man = _source(model, img_size, scratch, preprocessing)
        fixed = man.inputs[0].shape[0] if man.inputs and man.inputs[0].shape else None
        if auto_batch and isinstance(fixed, int) and fixed > 0 and batch != fixed:
            batch = fixed  # the model was exported with a fixed batch: keep it
            note(f"{src.name} has a fixed batch of {fixed}: compiling at batch {fixed}")
        elif auto_batch and man.searched("engine_batch") == "dynamic":
            # the INT8 fidelity search measured both engine shapes and chose the dynamic one (its table says why)
            batch = None
            note(f"{src.name}: dynamic batch, the engine shape the INT8 fidelity search chose (see its .fidelity.md)")
        output = Path(output) if output is not None else default_output(src.name if src.parent != scratch else "model.onnx", target, parent)
        if output.suffix != backend.engine_suffix:
            raise VitedgeError(f"output {output} must end in {backend.engine_suffix} for target {target}")
        if output.resolve() == src.resolve():
            raise VitedgeError(f"output {output} would overwrite its input", "choose another -o")
        check_files(src, man)
        assert backend.compiler is not None  # registry.get(target, "compile") refuses a backend without one
        try:
            if src.suffix == ".onnx" and man.precision == "fp32" and man.format == "onnx" and not man.quantization:
                man.precision = onnx_precision(src)  # foreign/quantized files without a precise manifest
            options = {"batch": batch, "threads": threads, "hint": hint, "precision_hint": precision_hint, "device": device, "img_size": img_size}
            files, settings, precision = backend.compiler(src, man, scratch, output.name, **options, **extra)
        except Exception as exc:
            problem = changed_file(src, man, exc)
            if problem is None:
                raise
            raise problem from None
        settings = {
            "target": target,
            "batch": batch if batch is not None else "dynamic",
            "hint": hint,
            "precision_hint": precision_hint,
            "source": src.name if src.parent != scratch else str(model),
            **settings,
        }
        child = man.derive(
            output.name,
            backend.engine_format,
            backend=backend.name,
            precision=precision,
            inputs=_specs_with_batch(man.inputs, batch),
            outputs=_specs_with_batch(man.outputs, batch),
        )
        child.compile = settings
        if verify:
            inputs = _check_inputs(man, batch)
            if inputs:
                names = _picks(man)
                picks = _engine_picks(src, child, names, inputs, scratch) if names else None
                # a token-merged model: the source runs with the engine's own picks, so a near-tie that the engine's
                # precision breaks the other way does not fail the check (what it costs is accuracy: validate measures it)
                refs = _forced_reference(src, names, inputs, picks) if picks else _reference_outputs(src, man, inputs)
                with backend.engine(scratch / output.name, child) as eng:
                    child.verification = {"reference": settings["source"], "checks": _verify(eng, refs, inputs)}
                if picks:
                    child.verification["token_merging"] = "reference run with the engine's own picks"
        settings["compile_seconds"] = round(time.perf_counter() - t0, 2)
        draft.output = output
        artifact = draft.commit(child, files)
    return artifact


def engine_summary(path: Path, man: Manifest) -> list[str]:
    """Human-readable lines describing a compiled engine (used by the CLI)."""
    c = man.compile
    size = sum((path.parent / f).stat().st_size for f in man.files if (path.parent / f).exists()) / 1e6
    lines = [f"{c.get('target')} engine, {man.precision}, batch {c.get('batch')}, hint {c.get('hint')}, {size:.1f} MB"]
    sizes = man.dynamic_size
    if sizes is not None:
        lines.append(f"dynamic size: height and width from {sizes.min} to {sizes.max}, multiples of {sizes.multiple}")
    if c.get("openvino_config"):
        lines.append(
            "OpenVINO config: "
            + ", ".join(f"{k}={v}" for k, v in c["openvino_config"].items())
            + (f" (runs in {c['inference_precision']})" if c.get("inference_precision") else "")
        )
    if c.get("blob"):
        lines.append(f"compiled blob {c['blob']['file']} for {c['blob']['device']} (OpenVINO {c['blob']['openvino']})")
    for key, r in man.verification.get("checks", {}).items():
        lines.append(
            f"checked on {key} inputs (batch {r['batch']}) vs {man.verification['reference']}: "
            f"cosine {r['cosine_min']:.6f}, max abs error {r['max_abs_error']:.2e}"
            + (f", top-1 agreement {r['top1_agreement']:.0%}" if "top1_agreement" in r and man.task == "classification" else "")
        )
        for name, o in (r.get("outputs") or {}).items():
            lines.append(
                f"  output {name}: cosine {o['cosine_min']:.6f}, max abs error {o['max_abs_error']:.2e}, "
                f"SNR {'inf' if o['snr_db'] == float('inf') else format(o['snr_db'], '.1f')} dB"
            )
    return lines


# -- token merging's auto: the speed of the engines this module builds ------------------------------
def time_merge_settings(spec, settings: list[tuple[int, int]], backend: str, stage: Callable[[str], None]) -> list[token_merging.MergeTiming]:
    """Export and compile every ``(r, every)`` (and the unmerged model) for ``backend`` as ``vitedge compile`` does by
    default, then time the engines at batch 1 in interleaved rounds; the speed-up is paired per round."""
    out: list[token_merging.MergeTiming] = []
    engines: list[tuple[tuple[int, int], Engine]] = []
    with tempfile.TemporaryDirectory(prefix="vitedge-merge-") as tmp:
        for r, every in [(0, 1), *settings]:
            stage(f"building the {backend} engine for token merging r={r} every {every} block(s)")
            onnx_path = Path(tmp) / f"r{r}_every{every}.onnx"
            try:
                export_onnx(spec, onnx_path, merge_tokens=r, merge_every=every)
                eng_path, man = compile_model(onnx_path, Path(tmp) / f"r{r}_every{every}.engine{'.xml' if backend == 'openvino' else '.onnx'}", target=backend)
            except VitedgeError as exc:
                if r == 0:
                    raise
                out.append(token_merging.MergeTiming(r, every, f"no engine: {first_line(exc, 160)}"))
                continue
            engines.append(((r, every), registry.open_engine(backend, eng_path, man)))
            out.append(token_merging.MergeTiming(r, every, "timed", precision=man.precision))
        try:
            h, w = spec.preprocessing.img_size
            x = np.random.default_rng(0).standard_normal((1, spec.model.config.in_channels, h, w)).astype(np.float32)
            fns = [(lambda e=e: e.infer(x)) for _, e in engines]
            slot = Slot(token_merging.TIMING_SECONDS / token_merging.TIMING_ROUNDS / len(fns), 3, 200)
            stage(f"timing {len(fns)} {backend} engines (batch 1, {token_merging.TIMING_ROUNDS} interleaved rounds)")
            rounds = interleaved(fns, token_merging.TIMING_ROUNDS, slot, warmup=Slot(0.0, 3, 3), alternate=True, wake=True, pause_s=0.1)
        finally:
            for _, e in engines:
                e.close()
    timed = {key: rounds[i] for i, (key, _) in enumerate(engines)}
    for i, t in enumerate(out):
        if t.status != "timed":
            continue
        samples = timed[(t.r, t.every)]
        ms = float(np.median([v for rnd in samples for v in rnd]))
        pair = paired_speedup(timed[(0, 1)], samples)
        out[i] = token_merging.MergeTiming(
            t.r, t.every, "timed", round(ms, 3), round(pair["speedup"], 3), [round(v, 3) for v in pair["ratio_iqr"]], t.precision
        )
    return out


token_merging.register_timer(time_merge_settings)
