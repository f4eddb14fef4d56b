"""`vitedge validate`: accuracy drop and speed-up of deployed engines against the FP32 reference.

Everything is measured in one process, in one run:

* **Accuracy.**  Every image goes through the FP32 reference and through each engine.  With
  labels (``class/image`` folders) the report gives top-1/top-5 of both and the *paired* drop in
  percentage points with a 95 % confidence interval (Agresti–Min adjusted interval for matched
  proportions, or a paired bootstrap).  Without labels it gives agreement with the reference's
  top-1/top-5.  Always: logit cosine similarity, SNR and the worst images.
* **Latency.**  Warm-up, then time-bounded runs at batch 1, *interleaved* in rounds (reference,
  engine 1, engine 2, ..., reference, ...) so that a change in machine load hits every model alike.
  The speed-up is the median over rounds of (reference time in the round / engine time in the
  round): paired ratios, each measured side by side (:func:`~vitedge.timing.paired_speedup`), with their spread.
  The budget is extended (up to twice) for a model whose median is not yet stable.  The reference
  runs with an explicit thread count (``reference_threads``), and the load average before and after
  timing is recorded; a busy machine is warned about (:func:`~vitedge.resources.busy_machine_warning`).  Then
  throughput over a batch sweep, load/compile time, size on disk and peak resident memory.
* **A busy machine.**  How many cores other processes leave free is read at the start and again before
  timing (:func:`~vitedge.resources.read_cpu`); the reference and the engines run with a thread count that
  fits them.  When none fits, or the PyTorch reference runs far slower with its threads than at 1 thread
  (its threads wait for cores), the speed-up is *withheld*: ``speedup`` is null, the report's
  ``speedup_verdict`` says why (:func:`~vitedge.resources.speedup_withheld`), and ``--min-speedup`` fails
  closed (:class:`~vitedge.errors.SpeedupNotMeasurable`, exit 3).
* **Gates.**  ``max_drop`` (pp) and ``min_speedup`` raise :class:`~vitedge.errors.GateFailed`
  *after* the report is written.

This module is the orchestration (open -> run -> compare -> time -> report); how things are timed is in
:mod:`vitedge.timing`, memory and machine load in :mod:`vitedge.resources`, comparisons in
:mod:`vitedge.compare` and which precision an engine's layers run in in its backend
(:meth:`~vitedge.backends.base.Engine.precision_breakdown`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import attention, compare, distributed, resources
from ._io import sha256_file, write_json_atomic
from ._version import __version__
from .artifact import check_output
from .backends import pytorch, registry
from .compare import CI_LEVEL, paired_drop, wilson_interval  # noqa: F401 - public names of this module
from .data import SHIPPED_CALIBRATION, ImageSet, label_indices
from .errors import FileProblem, GateFailed, InputError, ShapeMismatch, SpeedupNotMeasurable, VitedgeError
from .foreign import describe, ensure_manifest
from .manifest import Manifest
from .models.loading import REFERENCE_CHECKPOINT, ModelSpec
from .models.vit import PRESETS
from .options import parse_size
from .preprocess import Preprocessing
from .report import SCHEMA_ID, Report, now_iso
from .resources import (
    CpuReading,
    RssPeak,
    load_average,
    load_record,
    reference_thread_count,
    set_torch_threads,
    speedup_withheld,
    torch_threads,
    usable_cores,
)
from .runtime import load
from .sysinfo import isa_summary, machine_info
from .timing import Slot, flat_samples, interleaved, latency_stats, paired_speedup, run_for
from .ui import progress

#: per-output numbers in a report's ``vs_reference.outputs``, in this order
_OUTPUT_KEYS = ("cosine_mean", "cosine_min", "max_abs_error", "snr_db", "finite")
#: validation images whose attention maps are compared with the reference's (bounded: each engine builds and runs
#: a second, attention-exposing copy of itself), and how many of the most moved the report shows
ATTENTION_IMAGES = 32
ATTENTION_MOVED = 3


# ------------------------------------------------------------------------------------------
# what is compared
# ------------------------------------------------------------------------------------------
@dataclass
class EngineSpec:
    """An engine to validate: an artifact plus how to open it (``vitedge.load(path, backend, **options)``)."""

    path: str | Path
    backend: str | None = None
    options: dict = field(default_factory=dict)
    name: str | None = None
    precision: str | None = None  # label override (e.g. "bf16" for an OpenVINO precision hint)


@dataclass(eq=False)
class _Model:
    """One model in the run: an opened engine (the reference too: a PyTorch or ONNX Runtime engine) and the
    labels and measurements the report gives it besides latency and accuracy."""

    engine: Any  # a vitedge Engine
    name: str
    precision: str = "fp32"
    role: str = "engine"
    options: dict = field(default_factory=dict)
    load_s: float = 0.0
    peak_rss_mb: float | None = None
    rss_increase_mb: float | None = None
    rss_baseline_mb: float | None = None  # engines: RSS before loading, so the accuracy pass can raise the increase
    preprocessing: Any = None
    size_bytes: int | None = None

    def __post_init__(self):
        if self.preprocessing is None:
            try:
                self.preprocessing = self.engine.preprocessing
            except VitedgeError:
                self.preprocessing = None

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def artifact(self) -> str:
        return getattr(self.engine, "source", None) or str(self.engine.artifact)

    @property
    def fmt(self) -> str | None:
        return self.engine.manifest.format

    @property
    def labels(self) -> list[str] | None:
        return self.engine.manifest.labels

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.engine.infer(x)

    def close(self) -> None:
        self.engine.close()


def artifact_size(path: Path, manifest=None) -> int:
    """Bytes on disk of an artifact and its companion files (external data, OpenVINO .bin)."""
    path = Path(path)
    names = set(manifest.files) if manifest is not None and manifest.files else set()
    names.add(path.name)
    if path.suffix == ".xml":
        names.add(path.with_suffix(".bin").name)
    return int(sum((path.parent / n).stat().st_size for n in names if (path.parent / n).is_file()))


# ------------------------------------------------------------------------------------------
# opening things
# ------------------------------------------------------------------------------------------
def _as_specs(engine, backend: str | None) -> list[EngineSpec]:
    items = engine if isinstance(engine, (list, tuple)) else [engine]
    if not items:
        raise VitedgeError("no engine to validate", "give at least one engine file")
    out = []
    for it in items:
        if isinstance(it, EngineSpec):
            out.append(it)
        elif isinstance(it, (str, Path)):
            out.append(EngineSpec(Path(it), backend))
        else:
            raise VitedgeError(f"cannot validate {type(it).__name__}", "give an artifact path or an EngineSpec")
    return out


def _hint_precision(options: dict, manifest) -> str | None:
    cfg = {**(manifest.compile.get("openvino_config", {}) if manifest and isinstance(manifest.compile, dict) else {}), **(options.get("config") or {})}
    hint = cfg.get("INFERENCE_PRECISION_HINT")
    return {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}.get(str(hint).lower()) if hint else None


def _opened(open_engine: Callable[[], Any], *, loaded: bool = True) -> tuple[Any, dict]:
    """Open an engine, measuring the time (``loaded=False``: a model already in memory, load time 0) and memory it takes."""
    with RssPeak() as mem:
        t0 = time.perf_counter()
        eng = open_engine()
        load_s = time.perf_counter() - t0 if loaded else 0.0
    return eng, {"load_s": load_s, "peak_rss_mb": mem.peak_mb, "rss_increase_mb": mem.increase_mb}


def _backend_of(spec: EngineSpec) -> str | None:
    """The backend ``vitedge.load`` will open an engine with (as :meth:`vitedge.artifact.Artifact.load` picks it), or None."""
    if spec.backend:
        return spec.backend
    try:
        artifact, man = Manifest.find(spec.path)
    except VitedgeError:
        return None
    if man is not None and man.backend and artifact.suffix.lower() in registry.get(man.backend).runs:
        return man.backend
    found = registry.for_file(artifact)
    return found.name if found is not None else None


def _fitted(spec: EngineSpec, threads: int | None) -> EngineSpec:
    """``spec`` set to run with ``threads`` threads (None: as it is) - ONNX Runtime's ``threads``, OpenVINO's
    ``INFERENCE_NUM_THREADS`` - unless its options already set them; other backends (GPU) are left alone."""
    if threads is None:
        return spec
    backend, opts = _backend_of(spec), dict(spec.options)
    if backend == "onnxruntime" and "threads" not in opts:
        opts["threads"] = threads
    elif backend == "openvino" and "INFERENCE_NUM_THREADS" not in (opts.get("config") or {}):
        opts["config"] = {**(opts.get("config") or {}), "INFERENCE_NUM_THREADS": str(threads)}
    return replace(spec, options=opts)


def _open_engine(spec: EngineSpec, preprocessing=None, notes: list[str] | None = None) -> _Model:
    pre = _foreign_preprocessing(spec.path, preprocessing, notes)
    eng, measured = _opened(lambda: load(spec.path, backend=spec.backend, preprocessing=pre, **spec.options))
    baseline_mb = measured["peak_rss_mb"] - measured["rss_increase_mb"]
    man = eng.manifest
    precision = spec.precision
    hint = _hint_precision(spec.options, man)
    if precision is None:
        precision = man.precision or "fp32"
        if hint and hint != precision and precision in ("fp32", "fp16", "bf16"):
            precision = hint
    name = spec.name or f"{eng.backend} {precision}" + (f" ({hint} hint)" if hint else "")
    choice = ((man.quantization or {}).get("choice") or {}) if man else {}
    if choice and notes is not None:  # `vitedge quantize --auto` picked this engine's precision on this CPU: say why
        notes.append(f"{name}: precision chosen by `quantize --auto` on {choice.get('cpu', 'its CPU')}: {choice.get('why')}")
    return _Model(eng, name, precision, options=dict(spec.options), rss_baseline_mb=baseline_mb, size_bytes=artifact_size(eng.artifact, man), **measured)


def _fp32_parent(spec: EngineSpec) -> Path | None:
    """The FP32 ONNX file an engine was derived from, found by its manifest lineage and hash-checked."""
    try:
        artifact, man = Manifest.find(spec.path)
    except VitedgeError:
        return None
    if man is None:
        return None
    for entry in man.lineage:
        cand = artifact.parent / entry.get("artifact", "")
        if entry.get("precision") == "fp32" and entry.get("format") == "onnx" and cand.is_file():
            want = (entry.get("files") or {}).get(cand.name)
            if want is None or sha256_file(cand) == want:
                return cand
    return None


def _foreign_preprocessing(path, preprocessing, notes: list[str] | None, fallback: dict | None = None):
    """For an ONNX file without a vitedge manifest: the preprocessing to feed it (given, else ``fallback``,
    else assumed at its input size) - what was assumed goes into ``notes``.  None for files with a manifest."""
    try:
        artifact, man = Manifest.find(path)
    except VitedgeError:
        return None
    if man is not None or artifact.suffix != ".onnx":
        return None
    if preprocessing is None and fallback:
        preprocessing = Preprocessing.from_dict(fallback)
        preprocessing.assumed = []
        if notes is not None:
            notes.append(f"{artifact.name} has no vitedge manifest: fed with the engine's preprocessing")
    _, man = ensure_manifest(artifact, preprocessing, announce=False, hash_file=False)
    if notes is not None:
        notes += describe(man, artifact)
    return man.preprocessing_obj


def _engine_manifest(spec: EngineSpec):
    try:
        return Manifest.find(spec.path)[1]
    except VitedgeError:
        return None


def _reference_source(reference, specs: list[EngineSpec], notes: list[str]):
    """What to compare with: as given, else the model source recorded in the first engine's manifest."""
    if reference is not None:
        return reference
    man = _engine_manifest(specs[0])
    src = (man.model or {}).get("source") if man else None
    if src and (str(src).startswith("preset:") or Path(str(src)).exists()):
        reference = str(src).removeprefix("preset:")
        notes.append(f"reference taken from the engine's manifest: {reference}")
        return reference
    raise VitedgeError(f"no FP32 reference for {specs[0].path}", "pass --reference with the checkpoint, preset name or FP32 ONNX file the engine was made from")


def _open_reference(
    reference, specs: list[EngineSpec], notes: list[str], preprocessing=None, threads: int | None = None, size: tuple[int, int] | None = None
) -> tuple[_Model, _Model | None]:
    """(timing baseline, separate accuracy reference or None).  An FP32 ``.onnx`` file runs in ONNX Runtime;
    anything else (checkpoint, preset, ``ModelSpec``) in PyTorch eager (:class:`~vitedge.backends.pytorch.PyTorchEngine`),
    either with ``threads`` threads (None: the backend's default); a PyTorch reference takes inputs of ``size``."""
    reference = _reference_source(reference, specs, notes)
    if isinstance(reference, (str, Path)) and str(reference).endswith(".onnx"):
        path, eng_man = Path(reference), _engine_manifest(specs[0])
        pre = _foreign_preprocessing(path, preprocessing, notes, fallback=eng_man.preprocessing if eng_man else None)
        eng, measured = _opened(lambda: load(path, backend="onnxruntime", preprocessing=pre, threads=threads))
        if eng.manifest.precision not in (None, "fp32"):
            notes.append(f"reference {path.name} says precision {eng.manifest.precision!r}, not fp32")
        _note_merged_reference(eng.manifest, path.name, notes)
        return _Model(
            eng, "onnxruntime fp32", role="reference", options={"threads": eng.threads}, size_bytes=artifact_size(eng.artifact, eng.manifest), **measured
        ), None

    is_preset = isinstance(reference, str) and reference.replace("-", "_").lower() in PRESETS and not Path(reference).exists()
    img_size = None
    if is_preset:  # same input size as the engine (a preset's default is 224)
        man = _engine_manifest(specs[0])
        img_size = ((man.model or {}).get("config") or {}).get("img_size") if man else None
    eng, measured = _opened(
        lambda: pytorch.open(reference, img_size=int(img_size) if img_size else None, threads=threads, input_size=size),
        loaded=not isinstance(reference, ModelSpec),
    )
    base = _Model(eng, "pytorch fp32", role="reference", options=eng.options, size_bytes=eng.size_bytes(), **measured)
    if not is_preset:
        return base, None
    parent = _fp32_parent(specs[0])
    if parent is None:
        notes.append(
            f"preset {reference!r} has fresh random weights, unrelated to the engine's: accuracy and agreement "
            "figures are meaningless; pass the FP32 ONNX file as --reference"
        )
        return base, None
    notes.append(
        f"preset {reference!r} has random weights: accuracy is compared with the engine's FP32 parent "
        f"{parent.name} (found in its manifest lineage); PyTorch eager is used for timing only"
    )
    parent_engine = load(parent, backend="onnxruntime")
    _note_merged_reference(parent_engine.manifest, parent.name, notes)
    return base, _Model(parent_engine, "onnxruntime fp32 (parent)")


def _note_merged_reference(man, name: str, notes: list[str]) -> None:
    """An FP32 reference exported with token merging hides merging's own accuracy cost: say so."""
    merging = (((man.model if man else None) or {}).get("graph") or {}).get("token_merging") or {}
    if merging.get("lossy"):
        notes.append(
            f"reference {name} was exported with token merging (r={merging['r']}, lossy): these numbers leave out "
            "what merging costs; pass an unmerged FP32 export or the checkpoint as --reference to include it"
        )


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """How long to time.  ``budget_s`` is per model at batch 1; ``runs`` fixes the count instead."""

    budget_s: float = 5.0
    rounds: int = 10  # paired rounds: the speed-up is the median of their ratios
    warmup_runs: int = 5
    warmup_s: float = 0.5
    min_runs: int = 20
    max_runs: int = 100_000
    runs: int | None = None
    rel_tolerance: float = 0.02  # extend while the median's 95% CI is wider than this (relative)
    throughput_budget_s: float | None = None  # per model and batch size; default budget_s / 4

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _timed(
    models: list[_Model],
    inputs: dict[str, np.ndarray],
    timing: Timing,
    description: str,
    budget_s: float | None = None,
    min_runs: int | None = None,
    adaptive: bool = True,
) -> dict[str, list[list[float]]]:
    """Latency samples (ms) per model and round, timed with :func:`vitedge.timing.interleaved` after a warm-up.

    ``{name: [[ms, ...] of round 0, [ms, ...] of round 1, ...]}``.  Every round runs the models in the same
    order, the reference (first) included, so each pairs it with every engine timed back to back with it
    (:func:`~vitedge.timing.paired_speedup`).  With ``adaptive``, rounds are added (up to twice the budget) for
    models whose median is not yet stable; they time the reference and the unstable models only.
    """
    budget = timing.budget_s if budget_s is None else budget_s
    min_runs = timing.min_runs if min_runs is None else min_runs
    rounds = max(1, timing.rounds)
    if timing.runs:
        n = math.ceil(timing.runs / rounds)
        slot = Slot(0.0, n, n)
    else:
        slot = Slot(budget / rounds, math.ceil(min_runs / rounds), math.ceil(timing.max_runs / rounds))
    fns = [(lambda r=r, x=inputs[r.name]: r.infer(x)) for r in models]
    samples = interleaved(
        fns,
        rounds,
        slot,
        warmup=Slot(timing.warmup_s, timing.warmup_runs, max(timing.warmup_runs, 200)),
        alternate=False,
        until_stable=timing.rel_tolerance if adaptive and not timing.runs else None,
        description=description,
    )
    return {r.name: s for r, s in zip(models, samples, strict=True)}


# ------------------------------------------------------------------------------------------
# accuracy
# ------------------------------------------------------------------------------------------
def _pre_key(pre) -> str:
    if pre is None:
        return "none"
    d = pre.to_dict()
    d.pop("assumed", None)  # how a value was arrived at does not change the pixels
    return json.dumps(d, sort_keys=True)


class _Inputs:
    """Preprocessed validation images per preprocessing (computed once, shared by equal pipelines)."""

    def __init__(self, images, eval_batch: int):
        self.images = images
        self.eval_batch = eval_batch
        self._cache: dict[str, tuple[np.ndarray, list, list]] = {}

    def get(self, pre) -> tuple[np.ndarray, list, list]:
        key = _pre_key(pre)
        if key not in self._cache:
            xs, labels, names = [], [], []
            total = len(self.images)
            with progress() as bar:
                task = bar.add_task("preprocessing images", total=total)
                for b in self.images.batches(pre, self.eval_batch):
                    xs.append(b.x)
                    labels += b.labels
                    names += b.names
                    bar.advance(task, len(b.x))
            if not xs:
                raise VitedgeError(f"no usable images in {self.images.source}")
            self._cache[key] = (np.concatenate(xs), labels, names)
        return self._cache[key]


def _outputs(runner: _Model, x: np.ndarray, batch: int, what: str) -> dict[str, np.ndarray]:
    """Every output of a runner on the whole set, by name, in the runner's output order."""
    parts: list[dict[str, np.ndarray]] = []
    with progress() as bar:
        task = bar.add_task(f"{what}: {runner.name}", total=len(x))
        for i in range(0, len(x), batch):
            parts.append({k: np.asarray(v, np.float32) for k, v in runner.engine.infer_all(x[i : i + batch]).items()})
            bar.advance(task, len(next(iter(parts[-1].values()))))
    first = runner.engine.output_names[0] if runner.engine is not None and runner.engine.output_names else None
    names = sorted(parts[0], key=lambda k: k != first)  # the first declared output (the logits of a classifier) first
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


# ------------------------------------------------------------------------------------------
# which precision layers really ran in
# ------------------------------------------------------------------------------------------
def precision_breakdown(runner: _Model) -> dict | None:
    """What the model's engine reports about the precision its matrix layers run in
    (:meth:`~vitedge.backends.base.Engine.precision_breakdown`); a failure is reported in it, never raised."""
    if runner.engine is None:
        return None
    try:
        return runner.engine.precision_breakdown()
    except Exception as exc:  # a diagnostic: never fail validation because of it
        return {"source": f"unavailable ({type(exc).__name__}: {str(exc)[:120]})", "mac_share": {}, "int8_mac_share": 0.0, "layers": []}


# ------------------------------------------------------------------------------------------
# findings
# ------------------------------------------------------------------------------------------
def _findings(models: list[dict], machine: dict) -> list[str]:
    out = []
    engines = [m for m in models if m["role"] == "engine"]
    by_speed = sorted(engines, key=lambda m: m["latency"]["p50_ms"])
    int8 = [m for m in by_speed if m["precision"] == "int8"]
    if int8 and len(engines) > 1:
        fastest, best8 = by_speed[0], int8[0]
        if fastest["precision"] != "int8":
            out.append(
                f"INT8 is not the fastest choice on this machine: {fastest['name']} runs at "
                f"{fastest['latency']['p50_ms']:.3f} ms (p50, batch 1) and the fastest INT8 engine, {best8['name']}, at "
                f"{best8['latency']['p50_ms']:.3f} ms ({best8['latency']['p50_ms'] / fastest['latency']['p50_ms']:.2f}x slower)."
            )
        else:
            others = [m for m in by_speed if m["precision"] != "int8"]
            if others:
                out.append(
                    f"INT8 is the fastest: {best8['name']} at {best8['latency']['p50_ms']:.3f} ms vs "
                    f"{others[0]['latency']['p50_ms']:.3f} ms for the fastest non-INT8 engine ({others[0]['name']}), "
                    f"{others[0]['latency']['p50_ms'] / best8['latency']['p50_ms']:.2f}x."
                )
        for m in int8:
            same = [
                o
                for o in engines
                if o["backend"] == m["backend"] and o["precision"] in ("fp32", "fp16", "bf16") and o["latency"]["p50_ms"] < m["latency"]["p50_ms"]
            ]
            if same:
                faster = ", ".join(f"{o['name']} ({o['latency']['p50_ms']:.3f} ms)" for o in sorted(same, key=lambda o: o["latency"]["p50_ms"]))
                out.append(f"{m['name']} ({m['latency']['p50_ms']:.3f} ms) is slower than {faster} on the same backend: INT8 does not pay off there.")
    for m in engines:
        pb = m.get("precision_breakdown") or {}
        share = pb.get("mac_share") or {}
        if not share:
            continue
        if m["precision"] == "int8" and pb.get("int8_mac_share", 0) < 0.5:
            out.append(
                f"{m['name']}: only {100 * pb.get('int8_mac_share', 0):.0f} % of multiply-accumulates ran in INT8 "
                f"({', '.join(f'{k} {100 * v:.0f} %' for k, v in share.items())})."
            )
        top = max(share, key=lambda k: share[k])
        if m["precision"] == "fp32" and m["backend"] == "openvino" and top != "fp32":
            out.append(
                f"{m['name']}: OpenVINO actually ran {100 * share[top]:.0f} % of multiply-accumulates in {top} "
                "(its default inference precision on CPUs with AVX-512 BF16/AMX); set "
                "INFERENCE_PRECISION_HINT=f32 for true FP32."
            )
    for m in engines:
        vs = m["vs_reference"]
        if not vs.get("finite", True):
            out.append(f"{m['name']} produced NaN/inf logits.")
    isa = machine.get("instruction_sets", {})
    if int8 and isa.get("AVX-512 VNNI") is False and isa.get("AVX-VNNI") is False and isa.get("AMX-INT8") is False:
        out.append("this CPU has no VNNI/AMX instructions: INT8 engines use slow emulated dot products here.")
    return out


# ------------------------------------------------------------------------------------------
# the main entry point: open -> run -> compare -> time -> report
# ------------------------------------------------------------------------------------------
def validate(
    engine,
    reference=None,
    *,
    data=None,
    max_drop: float | None = None,
    min_speedup: float | None = None,
    out_dir: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 4, 8),
    runs: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    time_budget: float = 5.0,
    rounds: int = 10,
    warmup: int = 5,
    min_runs: int = 20,
    timing: Timing | None = None,
    reference_threads: int | None = None,
    strict: bool = False,
    ci_method: str = "agresti-min",
    worst: int = 10,
    eval_batch: int = 16,
    backend: str | None = None,
    kind: str = "validate",
    post: Callable[[Report], None] | None = None,
    preprocessing=None,
    ray: distributed.RayOptions | str | bool | None = None,
    latency_node: str | None = None,
    size: tuple[int, int] | str | None = None,
) -> Report:
    """Validate one or more engines against the FP32 reference; see the module docstring.

    ``engine``: artifact path(s) or :class:`EngineSpec` (several engines are timed in the same run).
    ``reference``: checkpoint / preset name / ``"reference"`` / :class:`~vitedge.ModelSpec` (timed as
    PyTorch eager), or an FP32 ``.onnx`` file (timed with ONNX Runtime).  ``None``: the model source
    recorded in the engine's manifest.
    ``data``: folder (``class/image`` for labels), ``.npy``/``.npz`` or an :class:`~vitedge.data.ImageSet`.
    ``max_drop``: top-1 drop gate in percentage points (without labels: top-1 disagreement with FP32,
    an upper bound of the drop); ``strict`` gates on the upper end of the confidence interval.
    ``min_speedup``: batch-1 speed-up gate over the reference: the median of the per-round paired ratios
    (:func:`~vitedge.timing.paired_speedup`).
    ``reference_threads``: threads of the FP32 reference (PyTorch intra-op threads, or ONNX Runtime's for an
    ``.onnx`` reference); default the cores other processes leave free (every usable core on a quiet machine),
    which the ONNX Runtime and OpenVINO engines then use too.  When no thread count fits, or the reference's
    threads wait for cores, the speed-up is withheld (``speedup`` null, ``speedup_verdict`` says why) and
    ``min_speedup`` raises :class:`~vitedge.errors.SpeedupNotMeasurable` (exit 3) instead of passing on it.
    ``preprocessing``: for ONNX files without a vitedge manifest (engines or reference; see
    ``docs/foreign.md``); a manifest-less reference otherwise takes the first engine's preprocessing.
    Models that are not classifiers (dense maps, several outputs) are compared per output
    (``vs_reference.outputs``: cosine, max abs error, SNR).
    ``size``: (height, width) or ``"HxW"``: every model is fed the images at that size (a dynamic-size engine
    takes any size in its bounds, a PyTorch reference any size); by default a dynamic-size engine is fed at
    its own size (``img_size``), the images resized and cropped as the reference's are.
    ``ray``: the accuracy pass runs on a Ray cluster (``"auto"``/True, an address or
    :class:`~vitedge.distributed.RayOptions`; see :func:`_accuracy_on_ray`), with the same numbers as a local run;
    latency is measured on one machine: this process's, or with ``latency_node`` (a node's IP or ID) that Ray node,
    where the whole measurement then runs as a task (the report is written here).
    Writes ``report.json/md/html`` to ``out_dir`` (if given), then raises ``GateFailed`` if a gate is missed.
    """
    specs = _as_specs(engine, backend)
    size = _size_arg(size)
    ray_options = distributed.RayOptions.of(ray)
    if latency_node is not None:
        if ray_options is None:
            raise VitedgeError("--latency-node names a node of a Ray cluster", "add --ray")
        ray_options = dataclasses.replace(ray_options, latency_node=latency_node)
    _check_arguments(max_drop, min_speedup, batch_sizes)
    if out_dir is not None:
        check_output(out_dir, folder=True)
    timing = timing or Timing(budget_s=time_budget, rounds=rounds, warmup_runs=warmup, min_runs=min_runs, runs=runs)
    settings = {
        "samples": samples,
        "seed": seed,
        "batch_sizes": [int(b) for b in batch_sizes],
        "timing": timing.to_dict(),
        "rounds": timing.rounds,
        "reference_threads": reference_threads,
        "ci_level": CI_LEVEL,
        "ci_method": ci_method,
        "eval_batch": eval_batch,
        "gates": {"max_drop_pp": max_drop, "min_speedup": min_speedup, "strict": strict},
    }
    if size is not None:
        settings["size"] = list(size)
    args = (specs, reference, data, settings, timing, worst, kind, preprocessing, ray_options)
    if ray_options is not None and ray_options.latency_node is not None:  # measured there, written here
        distributed.connect(ray_options)
        report = distributed.on_node(ray_options.latency_node, _measure, *args)
    else:
        report = _measure(*args)
    return _finish(report, post, out_dir)


def _measure(
    specs: list[EngineSpec],
    reference,
    data,
    settings: dict,
    timing: Timing,
    worst: int,
    kind: str,
    preprocessing,
    ray_options: distributed.RayOptions | None,
) -> Report:
    """The report of :func:`validate` (open -> run -> compare -> time), measured on this machine: latency and
    throughput always, the accuracy pass too unless ``ray_options`` sends it to a Ray cluster."""
    samples, seed, batch_sizes, ci_method, eval_batch = (settings[k] for k in ("samples", "seed", "batch_sizes", "ci_method", "eval_batch"))
    max_drop = settings["gates"]["max_drop_pp"]
    size = tuple(settings["size"]) if settings.get("size") else None
    at_start = resources.read_cpu()  # through the module: tests give a reading of their choosing
    fitting = at_start.fitting_threads()
    busy = fitting < at_start.cores  # on a quiet machine the engines keep their own thread counts
    settings["reference_threads"] = ref_threads = reference_thread_count(settings["reference_threads"], fitting)
    settings["engine_threads"] = fitting if busy else None
    specs = [_fitted(s, fitting if busy else None) for s in specs]
    notes: list[str] = []
    machine = machine_info()
    models: list[_Model] = []
    acc_ref: _Model | None = None
    torch_threads_before = torch_threads()  # process-wide: a PyTorch reference sets it, restored when done
    try:
        baseline, acc_ref = _open_reference(reference, specs, notes, preprocessing, ref_threads, size)
        models.append(baseline)
        models += [_open_engine(s, preprocessing, notes) for s in specs]
        _dedupe_names(models)
        images = _images(data, baseline, samples, seed, notes)
        _feed(acc_ref or baseline, models, images, notes)
        _fix_size(models + ([acc_ref] if acc_ref is not None else []), size, notes)
        accuracy_models = [acc_ref or baseline, *models[1:]]
        if ray_options is None:
            inputs = _Inputs(images, eval_batch)
            outs = _accuracy_outputs(accuracy_models, inputs)
        else:
            job = _ShardJob(_task_reference(reference, baseline, acc_ref), specs, preprocessing, ref_threads, eval_batch, size)
            outs, settings["ray"] = _accuracy_on_ray(job, images, accuracy_models, ray_options, machine, notes)
            images.skipped = outs.skipped
            inputs = _Inputs(_timing_images(images, outs.skipped, max(int(b) for b in batch_sizes)), eval_batch)
        truth = _reference_pass(accuracy_models[0], models[1:], outs, images, kind, max_drop, notes)
        results = {r.name: _compare(r, truth, o, ci_method, worst, notes) for r, o in zip(models[1:], outs.outputs[1:], strict=True)}
        if kind == "validate":
            maps = _AttentionMaps(accuracy_models[0], inputs, truth.names, notes)
            for r in models[1:]:
                results[r.name]["attention"] = maps.compare(r)
        if acc_ref is not None:
            acc_ref.close()
            acc_ref = None
        before_timing = resources.read_cpu()
        latency, throughput, single_ms = _time(models, inputs, timing, batch_sizes)
        machine["load"] = load_record(machine.get("load_average"), before_timing.load, load_average(), usable_cores())
        verdict = _speedup_verdict(models[0], latency, single_ms, [at_start, before_timing])
        for warning in (machine["load"]["warning"], verdict["warning"]):  # printed once, by the CLI, from the findings
            if warning:
                notes.insert(0, warning)
        report = _report(models, results, truth, latency, throughput, images, settings, kind, machine, notes, verdict)
    finally:
        for r in models + ([acc_ref] if acc_ref is not None else []):
            r.close()
        gc.collect()
        set_torch_threads(torch_threads_before)
    return report


def validate_sizes(engine, reference=None, *, sizes: Sequence[tuple[int, int]] | str, out_dir: str | Path | None = None, **kwargs) -> dict[str, Report]:
    """:func:`validate` once per size (``sizes``: (height, width) pairs or ``"HxW,HxW"``), each report in
    ``out_dir/HxW/``, and ``out_dir/sizes.md`` / ``sizes.json`` with every engine's accuracy, cosine, latency
    and speed-up per size (:meth:`Report.summary`).  Every size runs; a missed gate at any raises
    :class:`GateFailed` at the end (``.report``: the first size's that missed)."""
    pairs = [_size_arg(s) for s in sizes] if not isinstance(sizes, str) else [_size_arg(s) for s in sizes.split(",")]
    reports: dict[str, Report] = {}
    failed: list[tuple[str, GateFailed]] = []
    for h, w in (p for p in pairs if p is not None):
        key = f"{h}x{w}"
        try:
            reports[key] = validate(engine, reference, size=(h, w), out_dir=Path(out_dir) / key if out_dir is not None else None, **kwargs)
        except GateFailed as exc:
            reports[key] = exc.report
            failed.append((key, exc))
    if out_dir is not None:
        lines = ["# Validation per input size", ""]
        for key, rep in reports.items():
            lines += [f"## {key} ([report]({key}/report.md))", "", *(f"- {line}" for line in rep.summary().splitlines()), ""]
        Path(out_dir, "sizes.md").write_text("\n".join(lines))
        write_json_atomic(Path(out_dir) / "sizes.json", {key: {"summary": rep.summary(), "report": f"{key}/report.json"} for key, rep in reports.items()})
    if failed:
        key, first = failed[0]
        err = GateFailed(f"gates missed at {len(failed)} size(s), first at {key}: {first}")
        err.report = first.report
        raise err
    return reports


def _size_arg(size) -> tuple[int, int] | None:
    """``size`` as (height, width): a tuple as given, text through :func:`vitedge.options.parse_size`."""
    if size is None or isinstance(size, tuple):
        return size
    try:
        return parse_size(str(size))
    except ValueError as exc:
        raise InputError(f"size {size!r}: {exc}") from None


def _fix_size(models: list[_Model], size: tuple[int, int] | None, notes: list[str]) -> None:
    """The one size each model is fed at: ``size`` when given; else a dynamic-size engine's own size, since a
    validation batch needs one size and the reference sees the images resized and cropped the same way (each
    image at its own aspect ratio is what ``predict`` does)."""
    for r in models:
        pre = r.preprocessing
        if pre is None:
            continue
        if size is not None:
            _check_takes(r, size)
            r.preprocessing = pre.at(*size)
        elif pre.dynamic_size is not None:
            r.preprocessing = pre.fixed()
            notes.append(f"{r.name}: a dynamic-size engine, fed at its size {pre.img_size[0]}x{pre.img_size[1]} (--size HxW for another)")
    if size is not None:
        notes.append(f"every model fed the images at {size[0]}x{size[1]} (--size)")


def _check_takes(r: _Model, size: tuple[int, int]) -> None:
    """Refuse, before anything runs, a ``--size`` that a model does not take (one line)."""
    sizes = r.engine.manifest.dynamic_size
    if sizes is not None:
        sizes.check(*size)
        return
    hw = tuple(r.engine.input_shape[2:4])
    if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) and hw != size:
        raise ShapeMismatch(
            f"{r.name} takes {hw[0]}x{hw[1]} inputs only, not --size {size[0]}x{size[1]}", "--size is for dynamic-size engines (vitedge export --dynamic-size)"
        )


def _check_arguments(max_drop, min_speedup, batch_sizes) -> None:
    if max_drop is not None and max_drop < 0:
        raise VitedgeError(f"--max-drop {max_drop} must be >= 0 (percentage points)")
    if min_speedup is not None and min_speedup <= 0:
        raise VitedgeError(f"--min-speedup {min_speedup} must be > 0")
    bad_bs = [b for b in batch_sizes if int(b) < 1]
    if bad_bs:
        raise VitedgeError(f"batch sizes must be >= 1, got {bad_bs}")


def _images(data, baseline: _Model, samples: int | None, seed: int, notes: list[str]):
    if data is None:
        images = _default_data(baseline, notes)
    elif isinstance(data, ImageSet):
        images = data
    else:
        images = ImageSet.from_path(data)
    return images.sample(samples, seed)


def _default_data(model: _Model, notes: list[str]):
    val = SHIPPED_CALIBRATION / "digits" / "val"
    if not val.is_dir():
        raise VitedgeError("no validation data given", "pass --val DIR (class/image folders for top-1/top-5, or plain images)")
    images = ImageSet.from_path(val)
    src = str(getattr(model.engine, "source", "") or "")  # a PyTorch reference: its checkpoint
    is_ref_model = Path(src).resolve() == REFERENCE_CHECKPOINT.resolve() if src else False
    if not is_ref_model:
        images.labels = [None] * len(images)
        notes.append(f"no --val: fidelity measured on the shipped digit images ({val}); accuracy needs --val")
    else:
        notes.append(f"no --val: using the reference model's held-out set {val}")
    return images


def _feed(truth: _Model, models: list[_Model], images, notes: list[str]) -> None:
    """Each engine's preprocessing (the reference's where its manifest has none); array data checked against every input."""
    ref_pre = truth.preprocessing
    for r in models[1:]:
        if r.preprocessing is None:
            if ref_pre is None and images.arrays is None:
                raise VitedgeError(
                    f"{r.artifact} has no preprocessing in its manifest and the reference has none either",
                    "re-export with vitedge, or validate with preprocessed .npy data",
                )
            r.preprocessing = ref_pre
            notes.append(f"{r.name}: no preprocessing in its manifest, used the reference's")
        elif ref_pre is not None and _pre_key(r.preprocessing) != _pre_key(ref_pre):
            notes.append(
                f"{r.name}: its bundled preprocessing differs from the reference's; each model is fed "
                "through its own (accuracy differences may come from preprocessing)"
            )
    if images.arrays is not None:
        for r in models:
            images.check_shape(r.engine.input_shape)


# -- run ---------------------------------------------------------------------------------------
@dataclass
class _Truth:
    """The reference's outputs on the validation images and what they are: every engine is compared with these."""

    outputs: dict[str, np.ndarray]
    names: list[str]  # the images, in order
    features: bool  # not a classifier: agreement per output
    class_names: list[str]
    y: np.ndarray | None  # label indices, when the images are labelled by the model's classes
    accuracy: dict | None  # the reference's, when labelled

    @property
    def logits(self) -> np.ndarray:
        return next(iter(self.outputs.values()))

    @property
    def labelled(self) -> bool:
        return self.y is not None


def _run(r: _Model, inputs: _Inputs, what: str = "accuracy") -> dict[str, np.ndarray]:
    """Every output of a model on the validation images; its peak memory is raised to what this pass took."""
    x, _, _ = inputs.get(r.preprocessing)
    with RssPeak() as mem:
        outs = _outputs(r, x, inputs.eval_batch, what)
    r.peak_rss_mb = max(r.peak_rss_mb or 0, mem.peak_mb)
    if r.rss_baseline_mb is not None:
        r.rss_increase_mb = max(r.rss_increase_mb or 0, mem.peak_mb - r.rss_baseline_mb)
    return outs


@dataclass
class _Outputs:
    """What the accuracy part of a report is computed from: the accuracy models' outputs (the reference's first,
    then each engine's) on a run of images (one shard, or every shard merged), with the images' names and labels."""

    names: list[str]
    labels: list[str | None]
    outputs: list[dict[str, np.ndarray]]
    skipped: list[tuple[str, str]]

    @classmethod
    def merged(cls, parts: Sequence[_Outputs], source: str) -> _Outputs:
        """The shards' outputs in shard order: the arrays a single run over every image gives (a shard whose images
        were all unreadable adds only its skipped images, as a local run skips them)."""
        full = [p for p in parts if p.outputs]
        if not full:
            raise VitedgeError(f"no usable images in {source}")
        outputs = [{k: np.concatenate([p.outputs[m][k] for p in full]) for k in full[0].outputs[m]} for m in range(len(full[0].outputs))]
        return cls([n for p in full for n in p.names], [lbl for p in full for lbl in p.labels], outputs, [s for p in parts for s in p.skipped])


def _accuracy_outputs(models: list[_Model], inputs: _Inputs) -> _Outputs:
    """The accuracy pass over ``inputs``' images (all of them, or one shard on a Ray worker): the reference
    (``models[0]``), then each engine."""
    _, labels, names = inputs.get(models[0].preprocessing)
    outputs = [_run(r, inputs, "FP32 reference" if i == 0 else "accuracy") for i, r in enumerate(models)]
    return _Outputs(names, labels, outputs, list(inputs.images.skipped))


@dataclass
class _ShardJob:
    """What a Ray task needs to open the models the driver opened (:func:`_shard_outputs`): the arguments of
    :func:`validate` that say how."""

    reference: Any
    specs: list[EngineSpec]
    preprocessing: Any
    reference_threads: int
    eval_batch: int
    size: tuple[int, int] | None = None  # --size: every model fed at it (else a dynamic-size engine at its own size)


def _task_reference(reference, baseline: _Model, acc_ref: _Model | None):
    """The reference as the Ray tasks open it: as given, except a preset that is itself the accuracy reference, whose
    random weights the driver drew: its model goes to the tasks, else every task would draw weights of its own."""
    if acc_ref is None and str(getattr(baseline.engine, "source", "")).startswith("preset:"):
        return baseline.engine.spec
    return reference


def _shard_outputs(job: _ShardJob, shard: ImageSet) -> _Outputs:
    """One shard of the accuracy pass, in a Ray task: open the models as the driver did (once per task), then
    the same :func:`_accuracy_outputs` as a local run."""
    unreachable = [p for p in shard.paths if not Path(p).is_file()]
    if unreachable:
        raise FileProblem(
            f"{len(unreachable)} of the shard's {len(shard)} images are not on this Ray node, e.g. {unreachable[0]}",
            "put --data on a filesystem that every node mounts at the same path (docs/distributed.md)",
        )
    notes: list[str] = []  # the driver opened the same models: it has the same notes
    opened: list[_Model] = []
    try:
        baseline, acc_ref = _open_reference(job.reference, job.specs, notes, job.preprocessing, job.reference_threads, job.size)
        opened = [baseline] + ([acc_ref] if acc_ref is not None else [])
        engines = [_open_engine(s, job.preprocessing, notes) for s in job.specs]
        opened += engines
        _feed(acc_ref or baseline, [baseline, *engines], shard, notes)
        _fix_size(opened, job.size, notes)  # as the driver did: one size per model
        try:
            return _accuracy_outputs([acc_ref or baseline, *engines], _Inputs(shard, job.eval_batch))
        except VitedgeError:
            if shard.skipped and len(shard.skipped) == len(shard):  # every image unreadable: skipped, as a local run skips them
                return _Outputs([], [], [], list(shard.skipped))
            raise
    finally:
        for m in opened:
            m.close()


def _cpu_dependent(m: _Model) -> bool:
    """Whether a model's outputs follow the CPU's instruction sets beyond rounding: OpenVINO picks its inference
    precision by the CPU (bf16 where AMX or AVX-512 BF16 is present), and INT8 kernels differ with and without VNNI."""
    return m.backend == "openvino" or m.precision == "int8"


def _subset(images: ImageSet, index: Sequence[int]) -> ImageSet:
    """The images at ``index``, as the same kind of :class:`~vitedge.data.ImageSet` (a subclass keeps its own reading)."""
    arrays = None if images.arrays is None else images.arrays[list(index)]
    paths = [images.paths[i] for i in index] if images.arrays is None else []
    return dataclasses.replace(images, paths=paths, labels=[images.labels[i] for i in index], arrays=arrays, skipped=[])


def _timing_images(images: ImageSet, skipped: list[tuple[str, str]], count: int) -> ImageSet:
    """The first ``count`` readable images: what a local run times (the driver preprocesses no more than these)."""
    gone = {s for s, _ in skipped}
    readable = [i for i in range(len(images)) if images.arrays is not None or str(images.paths[i]) not in gone]
    return _subset(images, readable[:count])


def _accuracy_on_ray(job: _ShardJob, images: ImageSet, models: list[_Model], options: distributed.RayOptions, machine: dict, notes: list[str]):
    """The accuracy pass as Ray tasks, one per shard of whole evaluation batches (so every engine sees the
    batches a local run gives it), merged in order: (the outputs, the report's ``settings.ray``).

    Data paths: the tasks read ``--data`` at the driver's paths, so it must be on a filesystem every node
    mounts there; preprocessed ``.npy``/``.npz`` data travels inside the shards, through Ray's object store.
    Models whose outputs depend on the CPU (:func:`_cpu_dependent`) run only on nodes with this machine's
    instruction sets."""
    n = len(images)
    distributed.connect(options)
    size = options.shard_size or math.ceil(n / (2 * distributed.cluster_cpus()))
    size = max(1, math.ceil(size / job.eval_batch)) * job.eval_batch
    starts = list(range(0, n, size))
    shards = [_subset(images, range(i, min(i + size, n))) for i in starts]
    names = [f"shard {k + 1} of {len(shards)} (images {i + 1}-{min(i + size, n)} of {images.source})" for k, i in enumerate(starts)]
    bound = [m.name for m in models if _cpu_dependent(m)]
    run = distributed.run_shards(
        _shard_outputs, job, shards, names, options, isa=machine["instruction_sets"] if bound else None, why_isa=f"{', '.join(bound)}'s outputs"
    )
    where = run.driver.describe() if run.driver is not None else f"the driver, outside the cluster ({machine['cpu']}; {isa_summary(machine)})"
    used = [x for x in run.nodes if x.shards]
    notes.append(
        f"accuracy ran on Ray: {n} images in {len(shards)} shards of up to {size} on {len(used)} node{'s' if len(used) != 1 else ''}; "
        f"latency and throughput were measured on one node: {where}; peak memory covers loading and timing there, not the accuracy pass"
    )
    if run.restricted:
        notes.append(f"{', '.join(bound)} ran only on nodes with this CPU's instruction sets; left out: {'; '.join(run.restricted)}")
    summary = {"address": options.address or "auto", "shard_size": size, **run.summary(), "latency_node": where}
    return _Outputs.merged(run.results, images.source), summary


def _reference_pass(truth: _Model, engines: list[_Model], outs: _Outputs, images, kind: str, max_drop: float | None, notes: list[str]) -> _Truth:
    """Decide what the reference's outputs are: class logits (labels read as class indices) or features."""
    labels, names = outs.labels, outs.names
    first, logits = next(iter(outs.outputs[0].items()))
    features = truth.engine.manifest.task != "classification" or logits.ndim != 2
    if features and kind == "benchmark":
        raise VitedgeError(
            f"the model's output {first!r} {logits.shape[1:]} is not class logits ({truth.engine.manifest.task}): benchmark ranks engines by top-1",
            "use vitedge validate, which reports agreement per output",
        )
    if features and max_drop is not None:
        raise VitedgeError(
            f"--max-drop needs class logits, but the model's output {first!r} is {logits.shape[1:]} ({truth.engine.manifest.task})",
            "drop --max-drop: agreement per output (cosine, max abs error, SNR) is reported instead",
        )
    if features:
        return _Truth(outs.outputs[0], names, True, [], None, None)
    n_classes = logits.shape[1]
    known = truth.labels or engines[0].labels
    class_names = list(known or [str(i) for i in range(n_classes)])
    if len(class_names) != n_classes:
        class_names = [str(i) for i in range(n_classes)]
    y = None
    if images.labelled and all(lbl is not None for lbl in labels):
        try:
            y = label_indices(labels, class_names, images.source)
        except VitedgeError:
            if known:
                raise
            # a model without labels (e.g. an ONNX file exported elsewhere): its classes are only indices
            notes.append(
                f"{images.source}: class folders do not match the model's {n_classes} unnamed classes; agreement with FP32 only (pass labels to get accuracy)"
            )
    if y is not None and (y >= n_classes).any():
        raise VitedgeError(f"{images.source}: a class folder index exceeds the model's {n_classes} classes", "name class folders after the model's labels")
    return _Truth(outs.outputs[0], names, False, class_names, y, compare.accuracy(logits, y) if y is not None else None)


# -- compare -----------------------------------------------------------------------------------
class _AttentionMaps:
    """Where each engine looks against where the reference looks (:meth:`~vitedge.backends.base.Engine.attention`,
    rollout) on the first :data:`ATTENTION_IMAGES` validation images: the report's ``attention`` per engine."""

    def __init__(self, ref: _Model, inputs: _Inputs, names: list[str], notes: list[str]):
        self.ref, self.inputs, self.names, self.notes = ref, inputs, names, notes
        self._ref_maps: np.ndarray | None = None
        self._ref_failed = False

    def _maps(self, r: _Model) -> np.ndarray:
        x, _, _ = self.inputs.get(r.preprocessing)
        return r.engine.attention(x[:ATTENTION_IMAGES], "rollout")

    def compare(self, r: _Model) -> dict | None:
        if self._ref_failed or r.preprocessing is None or Path(str(r.engine.artifact)).resolve() == Path(str(self.ref.engine.artifact)).resolve():
            return None  # no reference maps, no images to give it, or the reference itself
        if self._ref_maps is None:
            try:
                self._ref_maps = self._maps(self.ref)
            except VitedgeError as exc:
                self._ref_failed = True
                self.notes.append(f"attention maps not compared: the reference {self.ref.name} has none: {exc}")
                return None
        try:
            ours = self._maps(r)
        except VitedgeError as exc:
            self.notes.append(f"{r.name}: attention maps not compared with the reference's: {exc}")
            return None
        if ours.shape != self._ref_maps.shape:
            self.notes.append(f"{r.name}: attention maps not compared: its patch grid {ours.shape[1:]} is not the reference's {self._ref_maps.shape[1:]}")
            return None
        return {"kind": "rollout", **attention.compare_maps(ours, self._ref_maps, self.names, ATTENTION_MOVED)}


def _compare(r: _Model, truth: _Truth, outs: dict[str, np.ndarray], ci_method: str, worst: int, notes: list[str]) -> dict:
    """One engine's outputs against the reference's (:mod:`vitedge.compare`): its accuracy, ``vs_reference``
    and which precision its layers ran in."""
    ref = truth.outputs
    logits = next(iter(outs.values()))
    if len(outs) == len(ref) == 1 and logits.shape != truth.logits.shape:
        raise VitedgeError(
            f"{r.name} outputs {logits.shape[1:]} but the reference {truth.logits.shape[1:]}", "validate an engine against the model it was made from"
        )
    outs = compare.match_outputs(ref, outs, r.name)
    logits = next(iter(outs.values()))
    if truth.features:
        vs = compare.features(ref, outs)
    else:
        vs = compare.classification(truth.logits, logits, names=truth.names, class_names=truth.class_names, y=truth.y, ci_method=ci_method, worst=worst)
        if len(ref) > 1:
            vs["outputs"] = compare.per_output(ref, outs, _OUTPUT_KEYS, json_snr=True)
    for k, o in (vs.get("outputs") or {}).items():
        notes.append(
            f"{r.name}: output {k} {tuple(o['shape'])} vs FP32: cosine mean {o['cosine_mean']:.6f} (min {o['cosine_min']:.6f}), "
            f"max abs error {o['max_abs_error']:.3g}, SNR {'inf' if o['snr_db'] is None else format(o['snr_db'], '.1f')} dB"
        )
    return {"accuracy": compare.accuracy(logits, truth.y) if truth.y is not None else None, "vs_reference": vs, "precision_breakdown": precision_breakdown(r)}


# -- time --------------------------------------------------------------------------------------
def _single_thread_ms(ref: _Model, x: np.ndarray, seconds: float) -> float | None:
    """The PyTorch reference's median latency (ms) at 1 thread over a short run: its own calibration, which
    other processes cannot distort by making its threads wait for one another.  None for a reference that
    already runs on 1 thread or is not PyTorch (an ONNX Runtime session's threads are fixed when it opens)."""
    eng = ref.engine
    if ref.backend != "pytorch" or eng.threads <= 1:
        return None
    threads, eng.threads = eng.threads, 1  # PyTorchEngine sets torch's thread count to eng.threads on every run
    try:
        run_for(lambda: ref.infer(x), Slot(0.0, 2, 2))  # warm-up at 1 thread
        return float(np.median(run_for(lambda: ref.infer(x), Slot(seconds, 5, 1000))))
    finally:
        eng.threads = threads


def _time(models: list[_Model], inputs: _Inputs, timing: Timing, batch_sizes: Sequence[int]) -> tuple[dict, dict, float | None]:
    """Batch-1 latency samples per model and round (interleaved, see :func:`_timed`), throughput per batch size,
    and the reference's median at 1 thread (:func:`_single_thread_ms`) measured just before."""
    first = {r.name: inputs.get(r.preprocessing)[0][:1] for r in models}
    single_ms = _single_thread_ms(models[0], first[models[0].name], min(0.5, max(timing.budget_s / 4, 0.05)))
    lat = _timed(models, first, timing, "timing batch 1")  # per round: paired speed-ups in _report
    throughput: dict[str, list[dict]] = {r.name: [] for r in models}
    tp_budget = timing.throughput_budget_s or max(timing.budget_s / 4, 0.05)
    tp_timing = Timing(**{**timing.to_dict(), "warmup_runs": 1, "warmup_s": 0.0, "runs": None if timing.runs is None else max(3, timing.runs // 4)})
    for bs in sorted({int(b) for b in batch_sizes}):
        if bs == 1:
            samples = lat
        else:
            xb = {}
            for r in models:
                xall = inputs.get(r.preprocessing)[0]
                xb[r.name] = xall[np.arange(bs) % len(xall)] if len(xall) else np.repeat(first[r.name], bs, 0)
            samples = _timed(models, xb, tp_timing, f"throughput batch {bs}", budget_s=tp_budget, min_runs=3, adaptive=False)
        for r in models:
            st = latency_stats(flat_samples(samples[r.name]), batch=bs, keep=0)
            throughput[r.name].append({"batch": bs, "images_per_s": bs * 1000.0 / st["p50_ms"], "p50_ms": st["p50_ms"], "runs": st["runs"]})
    return lat, throughput, single_ms


# -- report ------------------------------------------------------------------------------------
def _report(
    models: list[_Model],
    results: dict[str, dict],
    truth: _Truth,
    lat: dict,
    throughput: dict,
    images,
    settings: dict,
    kind: str,
    machine: dict,
    notes: list[str],
    verdict: dict,
) -> Report:
    """The report document; a withheld speed-up (``verdict``) leaves every engine's ``speedup`` null and its
    ratios out, so that no distorted figure is shown, gated or kept."""
    baseline = models[0]
    base_tp = {t["batch"]: t["images_per_s"] for t in throughput[baseline.name]}
    entries = []
    for r in models:
        st = latency_stats(flat_samples(lat[r.name]))
        paired = paired_speedup(lat[baseline.name], lat[r.name])
        speedup = paired.pop("speedup")
        measured = verdict["measurable"] or r is baseline
        res = results.get(r.name) or {"accuracy": truth.accuracy, "vs_reference": None, "precision_breakdown": None}
        entries.append(
            {
                "name": r.name,
                "role": r.role,
                "backend": r.backend,
                "precision": r.precision,
                "artifact": r.artifact,
                "format": r.fmt,
                "options": _jsonable(r.options),
                "size_bytes": r.size_bytes,
                "load_s": float(r.load_s),
                "peak_rss_mb": None if r.peak_rss_mb is None else round(float(r.peak_rss_mb), 1),
                "rss_increase_mb": None if r.rss_increase_mb is None else round(float(r.rss_increase_mb), 1),
                "accuracy": res["accuracy"],
                "vs_reference": res["vs_reference"],
                "latency": st,
                "throughput": throughput[r.name],
                "speedup": speedup if measured else None,
                **({"speedup_spread": paired} if measured else {}),
                "throughput_speedup": {str(t["batch"]): t["images_per_s"] / base_tp[t["batch"]] for t in throughput[r.name] if t["batch"] in base_tp}
                if measured
                else {},
                "precision_breakdown": res["precision_breakdown"],
                "attention": res.get("attention"),
                "gate_failures": [],
            }
        )
    g = settings["gates"]
    gate = _apply_gates(entries, g["max_drop_pp"], g["min_speedup"], g["strict"], truth.labelled, verdict.get("reason"))
    return Report(
        {
            "schema": SCHEMA_ID,
            "kind": kind,
            "created": now_iso(),
            "vitedge_version": __version__,
            "machine": machine,
            "settings": {"data": str(images.source), **{k: v for k, v in settings.items() if k != "gates"}, "torch_threads": torch_threads(), "gates": g},
            "data": {
                "source": str(images.source),
                "images": len(truth.names),
                "labelled": truth.labelled,
                "classes": 0 if truth.features else len(truth.class_names),
                "skipped": [s for s, _ in images.skipped],
            },
            "models": entries,
            "gates": gate,
            "speedup_verdict": verdict,
            "findings": notes + _findings(entries, machine),
        }
    )


def _speedup_verdict(baseline: _Model, latency: dict, single_ms: float | None, readings: list[CpuReading]) -> dict:
    """``speedup_verdict`` in a report: whether the speed-ups hold (:func:`~vitedge.resources.speedup_withheld`),
    why not, the warning that says so, and what it was judged on."""
    threads = int(baseline.options.get("threads") or 1)
    many_ms = latency_stats(flat_samples(latency[baseline.name]), keep=0)["p50_ms"]
    reason = speedup_withheld(readings, threads, None if single_ms is None else (many_ms, single_ms))
    return {
        "measurable": reason is None,
        "reason": reason,
        "warning": None if reason is None else f"speed-up not measurable here: {reason}; re-run on a quiet machine",
        "cpu": {"at_start": readings[0].to_dict(), "before_timing": readings[-1].to_dict()},
        "reference_threads": threads,
        "reference_p50_ms": many_ms,
        "reference_single_thread_p50_ms": single_ms,
    }


def _finish(report: Report, post: Callable[[Report], None] | None, out_dir) -> Report:
    """Let the caller add to the report, write it, then raise :class:`GateFailed` if a gate was missed."""
    if post is not None:
        post(report)
    if out_dir is not None:
        report.files = report.write(out_dir)
    if not report.passed:
        where = f"; report in {out_dir}" if out_dir is not None else ""
        n = len(report.failures)
        # only --min-speedup left unchecked on a busy machine: its own exit code; any gate really missed: GateFailed
        kind = SpeedupNotMeasurable if set(report.failures) <= set(report.data["gates"].get("unchecked", [])) else GateFailed
        what = "not checked" if kind is SpeedupNotMeasurable else "missed"
        err = kind(f"{n} gate{'s' if n > 1 else ''} {what}: {report.failures[0]}{' (and more)' if n > 1 else ''}{where}")
        err.report = report  # the CLI still prints the table
        raise err
    return report


def _apply_gates(models: list[dict], max_drop, min_speedup, strict: bool, labelled: bool, withheld: str | None = None) -> dict:
    """Check the gates on each engine.  A withheld speed-up (``withheld``: why) fails ``min_speedup`` closed: its
    failure is listed in ``unchecked`` too, so that it can be told apart from a speed-up measured and missed."""
    failures, unchecked = [], []
    for m in models:
        if m["role"] != "engine":
            continue
        vs = m["vs_reference"]
        if max_drop is not None:
            value, ci = compare.top1_loss(vs, labelled)
            what = "top-1 drop" if labelled else "top-1 disagreement with FP32 (no labels)"
            test = ci[1] if strict else value
            if test > max_drop:
                msg = (
                    f"{m['name']}: {what} {value:.2f} pp (95% CI {ci[0]:.2f} to {ci[1]:.2f}) "
                    f"{'upper bound ' if strict else ''}exceeds --max-drop {max_drop:g} pp"
                )
                m["gate_failures"].append(msg)
                failures.append(msg)
        if min_speedup is not None and m["speedup"] is None:
            msg = f"{m['name']}: speed-up not measurable here ({withheld}): --min-speedup {min_speedup:g}x cannot be checked"
            m["gate_failures"].append(msg)
            failures.append(msg)
            unchecked.append(msg)
        elif min_speedup is not None and m["speedup"] < min_speedup:
            msg = (
                f"{m['name']}: speed-up {m['speedup']:.2f}x{_spread_text(m.get('speedup_spread'))} over the FP32 reference "
                f"is below --min-speedup {min_speedup:g}x"
            )
            m["gate_failures"].append(msg)
            failures.append(msg)
    return {"max_drop_pp": max_drop, "min_speedup": min_speedup, "strict": strict, "passed": not failures, "failures": failures, "unchecked": unchecked}


def _spread_text(spread: dict | None) -> str:
    """`` (median of 10 paired rounds, IQR 2.10-2.40x)``, or nothing."""
    if not spread:
        return ""
    lo, hi = spread["ratio_iqr"]
    n = spread["rounds"]
    return f" (median of {n} paired round{'s' if n != 1 else ''}, IQR {lo:.2f}-{hi:.2f}x)"


def _dedupe_names(runners: list[_Model]) -> None:
    seen: set[str] = set()
    for i, r in enumerate(runners):
        if r.name in seen and r.artifact:
            r.name = f"{r.name} [{Path(r.artifact).name}]"
        if r.name in seen:
            r.name = f"{r.name} #{i}"
        seen.add(r.name)


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))
