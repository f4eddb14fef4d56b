"""The INT8 fidelity search: measure the default, and when it misses the target, climb a bounded ladder.

Real pretrained ViTs carry activation outliers (a few residual channels 50-100x the rest, attention
sinks) that make a tool's default INT8 flip predictions; where the harm sits differs from model to
model, so vitedge finds it by measuring.  Every try is one NNCF configuration
(:class:`~vitedge.quantization.nncf_int8.Int8Config`), quantized and measured in a child process
(a crash or hang costs that try only), on held-out images the calibration never saw.

The ladder (``docs/quantize.md``), each step changing the most faithful configuration so far:

1. vitedge's default (NNCF, Transformer model type; ONNX Runtime: attention core in float)
2. attention core (Q·Kᵀ, softmax·V) in float (OpenVINO; small cost; NVIDIA's default too)
3. SmoothQuant off, then SmoothQuant 0.5          (no speed cost)
4. quantile activation ranges                      (no speed cost)
5. full bias correction                            (no speed cost)
6. patch embedding and first block in float        (costs a block)
7. NNCF accuracy control: the most harmful layers back to float until the target is met

On OpenVINO CPUs with BF16 each try is measured with its float parts in bf16 and in f32 (bf16 is
faster, but adds flips of its own).  The search stops at the first try that meets the target and
chooses the fastest variant that meets it; if none does within the time budget, the most faithful
try is kept and the caller is told (``FidelityResult.met``).  Every try goes into a table beside
the artifact (``<artifact>.fidelity.md`` / ``.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VitedgeError
from ..ui import err_console, note
from .calibration import EvalSet
from .nncf_int8 import Int8Config, graph_roles

DEFAULT_AGREEMENT = 0.98  # top-1 agreement with FP32, classifiers
DEFAULT_COSINE = 0.995  # minimum per-image output cosine, other outputs
DEFAULT_BUDGET_S = 900.0  # wall time for the whole search, default try excluded
FIRST_TRY_TIMEOUT_S = 3600.0  # the default try is never cut by the budget, only by this
TRY_TIMEOUT_S = 1800.0  # any later try: at most this, and never past the budget
TIE = 1.03  # latencies within 3 % are a tie (timing noise): prefer the earlier try, and INT8 over float
BROKEN_ERROR_RATIO, BROKEN_MIN_GAP = 3.0, 0.01  # see _sound(): a variant this much further from FP32 is broken
FLOAT_WORTH = 1.05  # INT8 less than this much faster than the float model is called out
AC_MAX_FLOAT_FRACTION = 0.25  # accuracy control may return at most this share of the matrix ops to float


@dataclass(frozen=True)
class Target:
    """What "keeps the predictions" means.  Classifiers: top-1 agreement with FP32 (and, with
    ``max_drop``, the top-1 points lost on labelled images).  Other outputs: the minimum per-image
    cosine of every output."""

    agreement: float = DEFAULT_AGREEMENT
    cosine: float = DEFAULT_COSINE
    max_drop: float | None = None  # top-1 percentage points (labelled: accuracy; else disagreement)

    def __post_init__(self):
        for name, v in (("target agreement", self.agreement), ("target cosine", self.cosine)):
            if not (0.0 <= v <= 1.0):
                raise VitedgeError(f"{name} {v} must be between 0 and 1", "e.g. --target-agreement 0.98")

    def describe(self, classifier: bool) -> str:
        if classifier:
            s = f"top-1 agreement >= {100 * self.agreement:.1f}%"
            return s + (f" and top-1 drop <= {self.max_drop:g} pp" if self.max_drop is not None else "")
        return f"min output cosine >= {self.cosine:g}"

    def check(self, m: dict, classifier: bool, drop_pp: float | None) -> bool:
        if not m.get("finite", True):
            return False
        if classifier:
            ok = m.get("top1_agreement", 1.0) >= self.agreement - 1e-12
            return ok and (self.max_drop is None or drop_pp is None or drop_pp <= self.max_drop + 1e-9)
        return min_cosine(m) >= self.cosine - 1e-12


def min_cosine(m: dict) -> float:
    outs = m.get("outputs")
    return min(o["cosine_min"] for o in outs.values()) if outs else m["cosine_min"]


def default_config(backend: str) -> Int8Config:
    """ONNX Runtime: the attention core stays float (its int8 attention MatMuls are slow and lossy);
    OpenVINO: NNCF's defaults (its fused attention kernel takes int8 inputs)."""
    return Int8Config(attention_float=backend == "onnxruntime")


def ladder(backend: str, has_blocks: bool, fixed_batch: int | None = None) -> list[tuple[str, callable]]:
    """(step name, best config so far -> next config).  Steps that would repeat a config are skipped."""
    steps = [
        ("attention core float", lambda c: c.but(attention_float=True)),
        ("SmoothQuant off", lambda c: c.but(smooth_quant=-1.0)),
        ("SmoothQuant 0.5", lambda c: c.but(smooth_quant=0.5)),
        ("quantile ranges", lambda c: c.but(estimator="percentile")),
        ("full bias correction", lambda c: c.but(bias_correction="full")),
    ]
    if has_blocks:
        steps.append(("patch embedding + first block float",
                      lambda c: c.but(float_groups=tuple(sorted(set(c.float_groups) | {"patch_embed", "first_block"})))))
    if not fixed_batch:  # accuracy control ranks layers on single images
        steps.append(("sensitive layers float", lambda c: c.but(accuracy_control=True)))
    return steps


@dataclass
class Row:
    """One measured variant of one try (a row of the table)."""

    try_no: int
    step: str
    config: Int8Config
    float_precision: str | None
    status: str  # met | missed | crashed | timeout | failed | reference
    metrics: dict = field(default_factory=dict)
    latency_ms: float | None = None
    seconds: float = 0.0
    float_ops: int | None = None
    error: str | None = None
    drop_pp: float | None = None
    engine_batch: int | str | None = None  # OpenVINO: 1 (static, what latency engines are compiled to) or "dynamic"
    paired_ms: float | None = None  # float reference: the chosen INT8 try's latency, timed interleaved with this row

    def describe(self) -> str:
        return "FP32 model, not quantized (for comparison)" if self.status == "reference" else self.config.describe()

    def to_dict(self) -> dict:
        return {"try": self.try_no, "step": self.step, "config": self.config.to_dict(), "description": self.describe(),
                "float_precision": self.float_precision, "engine_batch": self.engine_batch, "status": self.status, "latency_ms": self.latency_ms,
                "seconds": round(self.seconds, 1), "float_ops": self.float_ops, "error": self.error, "drop_pp": self.drop_pp,
                "top1_agreement": self.metrics.get("top1_agreement"), "cosine_min": min_cosine(self.metrics) if self.metrics else None,
                "snr_db": self.metrics.get("snr_db"), "paired_int8_latency_ms": self.paired_ms}


@dataclass
class FidelityResult:
    target: Target
    met: bool
    chosen: Row
    rows: list[Row]
    artifact_dir: Path  # where the chosen try's files are
    classifier: bool
    seconds: float
    reference: Row | None = None  # the FP32 model at the CPU's float precision (OpenVINO on BF16 CPUs), measured alike
    enforced: bool = True  # False: predictions mean nothing (random-weight preset), speed alone decides

    @property
    def int8_ms(self) -> float | None:
        """The chosen INT8 try's latency: as timed beside the float reference when it was, else from its try."""
        r = self.reference
        return r.paired_ms if r is not None and r.paired_ms else self.chosen.latency_ms

    @property
    def float_wins(self) -> bool:
        """The unquantized model (at the CPU's fastest float precision) meets the target and INT8 is no faster
        (or missed the target): what ``--auto`` writes instead of INT8."""
        r = self.reference
        if r is None or not r.latency_ms:
            return False
        if not self.enforced:
            return bool(self.int8_ms) and r.latency_ms < self.int8_ms / TIE
        if not self.target.check(r.metrics, self.classifier, r.drop_pp):
            return False
        return not self.met or not self.int8_ms or r.latency_ms < self.int8_ms / TIE

    def choice(self) -> str:
        """Why ``--auto`` chose what it chose, in one sentence (latencies timed side by side when they were)."""
        r, q = self.reference, self.int8_ms
        if r is None:
            return "INT8: no float model was measured"
        fl, fp = f"the FP32 model at {r.float_precision or 'fp32'} ({r.latency_ms:.2f} ms)", r.float_precision or "fp32"
        if not self.enforced:  # a random-weight preset: speed alone
            if self.float_wins:
                return f"{fp}: {fl} is faster than the best INT8 ({q:.2f} ms) on this CPU (random weights: speed alone decides)"
            return f"INT8 ({q:.2f} ms): {r.latency_ms / q:.2f}x faster than {fl} on this CPU (random weights: speed alone decides)"
        if self.float_wins:
            why = "INT8 missed the fidelity target" if not self.met else f"the best INT8 ({q:.2f} ms) is not faster on this CPU"
            return f"{fp}: {why}, and {fl} meets the target"
        if not self.target.check(r.metrics, self.classifier, r.drop_pp):
            return f"INT8 ({q:.2f} ms): {fl} misses the fidelity target"
        return f"INT8 ({q:.2f} ms): {r.latency_ms / q:.2f}x faster than {fl} on this CPU"

    @property
    def speedup_vs_float(self) -> float | None:
        if self.reference is None or not self.reference.latency_ms or not self.int8_ms:
            return None
        return self.reference.latency_ms / self.int8_ms

    def summary(self) -> str:
        c = self.chosen
        what = (f"try {c.try_no} ({c.config.describe()}" + (f", float parts {c.float_precision}" if c.float_precision else "")
                + (f", {'dynamic batch' if c.engine_batch == 'dynamic' else f'static batch {c.engine_batch}'} engine" if c.engine_batch else "")
                + ")")
        nums = _numbers(c, self.classifier)
        tries = len({r.try_no for r in self.rows})
        speed = ""
        if self.speedup_vs_float is not None:
            speed = f"; {self.speedup_vs_float:.2f}x the speed of the FP32 model in bf16 ({_numbers(self.reference, self.classifier)})"
            if self.speedup_vs_float < FLOAT_WORTH:
                speed += " - INT8 buys little here: consider bf16 (`vitedge benchmark` compares every precision)"
        if self.met:
            return (f"INT8 fidelity target ({self.target.describe(self.classifier)}) met by {what}: {nums}; "
                    f"{tries} tr{'y' if tries == 1 else 'ies'} in {self.seconds:.0f} s{speed}")
        return (f"INT8 fidelity target ({self.target.describe(self.classifier)}) NOT met after {tries} tries in {self.seconds:.0f} s; "
                f"kept the most faithful, {what}: {nums}{speed}")


def _numbers(r: Row, classifier: bool) -> str:
    parts = []
    if classifier and "top1_agreement" in r.metrics:
        parts.append(f"agreement {100 * r.metrics['top1_agreement']:.2f}%")
    if r.drop_pp is not None and classifier:
        parts.append(f"drop {r.drop_pp:+.2f} pp")
    if r.metrics:
        parts.append(f"cosine min {min_cosine(r.metrics):.4f}")
    if r.latency_ms is not None:
        parts.append(f"{r.latency_ms:.2f} ms")
    return ", ".join(parts)


def _score(r: Row, classifier: bool) -> tuple:
    """Higher is more faithful."""
    if r.status not in ("met", "missed"):
        return (-1.0, -1.0)
    cos = min_cosine(r.metrics)
    if classifier:
        return (r.metrics.get("top1_agreement", 0.0), -(r.drop_pp or 0.0), cos)
    return (cos, r.metrics.get("snr_db") or 0.0)


def float_precisions(backend: str) -> list[str | None]:
    """OpenVINO: the float parts of an INT8 engine run in bf16 on BF16 CPUs (faster) unless f32 is needed."""
    if backend != "openvino":
        return [None]
    from ..compilation import default_precision_hint

    return ["bf16", "f32"] if default_precision_hint("int8") == "bf16" else ["f32"]


class _Arrays:
    """The calibration and held-out images, preprocessed once, as .npy files every try maps in."""

    def __init__(self, scratch: Path, calib_stream, ev: EvalSet):
        self.dir = scratch
        self.calib = scratch / "calib.npy"
        self.eval = scratch / "eval.npy"
        self.reference = scratch / "reference.npz"
        _to_npy(self.calib, calib_stream)
        _to_npy(self.eval, ev.batches(32))
        np.savez(self.reference, **ev.ref_outputs)


def _to_npy(path: Path, batches) -> None:
    """Stream batches into one .npy (two passes would re-decode images; this grows a raw file, then adds the header)."""
    raw = path.with_suffix(".raw")
    n, shape, dtype = 0, None, np.float32
    with open(raw, "wb") as f:
        for b in batches:
            b = np.ascontiguousarray(b, dtype=np.float32)
            shape = b.shape[1:]
            n += len(b)
            f.write(b.tobytes())
    if shape is None:
        raise VitedgeError("no usable images for the INT8 search")
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))
    arr[:] = np.memmap(raw, dtype=dtype, mode="r", shape=(n, *shape))
    arr.flush()
    del arr
    raw.unlink()


@dataclass
class _Search:
    """What every try of one search shares: the source model, the data on disk, the target."""

    src: Path
    backend: str
    arrays: _Arrays
    ev: EvalSet
    scratch: Path
    target: Target
    classifier: bool
    fixed_batch: int | None
    ac_layers: int  # accuracy control may return at most this many matrix ops to float
    final_name: str  # the artifact's file name (external data of big ONNX models is saved under it)

    def job(self, d: Path, cfg: Int8Config, fps: list, float_reference: bool, compare: dict | None = None) -> dict:
        ac_drop = (1.0 - self.target.agreement) if self.classifier else (1.0 - self.target.cosine)
        return {"source": str(self.src), "backend": self.backend, "config": cfg.to_dict(),
                "output": str(d / ("model.xml" if self.backend == "openvino" else "model.onnx")),
                "calib": str(self.arrays.calib), "eval": str(self.arrays.eval), "reference": str(self.arrays.reference),
                "float_precisions": fps, "fixed_batch": self.fixed_batch, "classifier": self.classifier,
                "ac_max_drop": max(ac_drop, 1e-6), "ac_max_float_layers": self.ac_layers, "data_name": f"{self.final_name}.data",
                "result": str(d / "result.json"), "float_reference": float_reference, "compare": compare}

    def run_try(self, no: int, step: str, cfg: Int8Config, fps: list, timeout: float, float_reference: bool = False,
                compare: dict | None = None) -> list[Row]:
        """One try in a child process; its rows (one per float precision), or one row saying how it failed."""
        d = self.scratch / (f"try{no}" if not float_reference else "float_reference")
        d.mkdir()
        (d / "job.json").write_text(json.dumps(self.job(d, cfg, fps, float_reference, compare)))
        t0 = time.perf_counter()
        with open(d / "log.txt", "wb") as log:
            proc = subprocess.Popen(try_command(d / "job.json"), stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            code = _wait(proc, no, t0, timeout)
        secs = time.perf_counter() - t0
        if code is None:
            return [Row(no, step, cfg, None, "timeout", seconds=secs, error=f"stopped after {timeout:.0f} s (search budget)")]
        if not (d / "result.json").exists():
            what = f"signal {-code}" if code < 0 else f"exit code {code}"
            tail = (d / "log.txt").read_bytes()[-300:].decode(errors="replace").strip().splitlines()
            return [Row(no, step, cfg, None, "crashed", seconds=secs,
                        error=f"the try's process died ({what}){': ' + tail[-1][:160] if tail else ''}")]
        res = json.loads((d / "result.json").read_text())
        if res["status"] != "ok":
            return [Row(no, step, cfg, None, "failed", seconds=secs, error=res["error"][:200])]
        (d / "float_ops.json").write_text(json.dumps(res["float_ops"]))
        return [self._row(no, step, cfg, d, v, secs, None if float_reference else len(res["float_ops"]), float_reference)
                for v in res["variants"]]

    def _row(self, no, step, cfg, d: Path, variant: dict, secs: float, float_ops: int | None, float_reference: bool) -> Row:
        fp = variant["float_precision"]
        with np.load(d / f"outputs.{variant['key']}.npz") as z:
            m = self.ev.measure_outputs({k: z[k] for k in z.files})
        drop = self.ev.drop_pp(m) if self.classifier else None
        status = "reference" if float_reference else ("met" if self.target.check(m, self.classifier, drop) else "missed")
        shape = None
        if self.backend == "openvino":
            shape = self.fixed_batch or (1 if variant["static"] else "dynamic")
        return Row(no, step, cfg, fp, status, metrics=m, latency_ms=variant["latency_ms"], seconds=secs, float_ops=float_ops,
                   drop_pp=drop, engine_batch=shape, paired_ms=variant.get("compare_latency_ms"))


def _wait(proc: subprocess.Popen, no: int, t0: float, timeout: float) -> int | None:
    """The child's exit code, with a status line while it works; None (and the child killed) after ``timeout``."""
    with err_console.status(f"INT8 try {no}: quantizing and measuring in a child process") as status:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                elapsed = time.perf_counter() - t0
                status.update(f"INT8 try {no}: quantizing and measuring in a child process ({elapsed:.0f} s)")
                if elapsed > timeout:
                    proc.kill()
                    proc.wait()
                    return None


def search(src: Path, backend: str, calib_stream, ev: EvalSet, scratch: Path, *, target: Target, budget_s: float,
           fixed_batch: int | None, method: str = "minmax", final_name: str = "model.onnx", classifier: bool | None = None,
           float_candidate: bool = False, enforce: bool = True) -> FidelityResult:
    """Run the default try, then the ladder while the target is missed and the budget lasts.  The FP32 model
    is measured too at the CPU's fastest float precision on BF16 CPUs (OpenVINO), or always with
    ``float_candidate`` (``--auto``: the faster of the two is written).  ``enforce=False`` (random-weight
    presets, whose predictions mean nothing): the fastest variant is chosen, whatever its agreement."""
    import onnx

    t0 = time.perf_counter()
    if classifier is None:  # class logits: one (N, classes) output
        classifier = ev.ref.ndim == 2 and ev.ref.shape[1] > 1 and len(ev.ref_outputs) == 1
    roles = graph_roles(onnx.load(str(src), load_external_data=False))
    n_matrix = sum(len(b) for b in roles.blocks) + len(roles.patch_embed) + len(roles.head) + len(roles.attention)
    ctx = _Search(src, backend, _Arrays(scratch, calib_stream, ev), ev, scratch, target, classifier, fixed_batch,
                  max(1, int(n_matrix * AC_MAX_FLOAT_FRACTION)), final_name)
    base = default_config(backend) if method == "minmax" else default_config(backend).but(estimator=method)
    fps = float_precisions(backend)
    rows: list[Row] = []
    best: Row | None = None
    tried: set[Int8Config] = set()
    plan = [("default", lambda c: c)] + (ladder(backend, bool(roles.blocks), fixed_batch) if budget_s > 0 else [])
    for k, (step, make) in enumerate(plan, 1):
        cfg = make(best.config if best is not None else base)
        if cfg in tried:
            continue
        tried.add(cfg)
        remaining = FIRST_TRY_TIMEOUT_S if k == 1 else min(TRY_TIMEOUT_S, budget_s - (time.perf_counter() - t0))
        if remaining <= 5:
            note(f"INT8 search budget ({budget_s:.0f} s) used up before step '{step}'; pass --search-budget to allow more")
            break
        err_console.print(f"[bold]INT8 try {len(tried)}[/] (step {k}/{len(plan)}: {step}): {cfg.describe()}")
        new = ctx.run_try(len(tried), step, cfg, fps, remaining)
        rows += new
        for r in new:
            err_console.print(f"  {r.status:7s} {('float ' + r.float_precision) if r.float_precision else '':11s} "
                              f"{'' if r.engine_batch is None else ('dynamic ' if r.engine_batch == 'dynamic' else 'static '):8s}{_numbers(r, classifier) or r.error or ''}")
            if best is None or _score(r, classifier) > _score(best, classifier):
                best = r
        if any(r.status == "met" for r in new):
            break
    if best is None or best.status not in ("met", "missed"):
        errors = "; ".join(f"try {r.try_no}: {r.status} ({r.error})" for r in rows[:3])
        raise VitedgeError(f"every INT8 try failed: {errors}", "check the model with `vitedge check parity`, or try --fp16")
    met_rows = [r for r in rows if r.status == "met"]
    chosen = best
    if not enforce:  # predictions that mean nothing (a random-weight preset): pick on speed, among sound variants
        ran = _sound([r for r in rows if r.status in ("met", "missed") and r.latency_ms and r.metrics])
        chosen = min(ran, key=lambda r: r.latency_ms) if ran else best
    elif met_rows:  # within 3 % of the fastest is a tie (timing noise): prefer the earlier, more-INT8 try
        fastest = min(r.latency_ms for r in met_rows)
        chosen = next(r for r in met_rows if r.latency_ms <= fastest * TIE)
    reference = None
    if float_candidate or (backend == "openvino" and "bf16" in fps):
        # is INT8 worth it here?  The FP32 model at the CPU's fastest float precision, measured the same way
        model = scratch / f"try{chosen.try_no}" / ("model.xml" if backend == "openvino" else "model.onnx")
        compare = {"path": str(model), "float_precision": chosen.float_precision, "static": chosen.engine_batch == 1}
        ref_rows = ctx.run_try(0, "float reference", base, fps[:1], 900.0, float_reference=True,
                               compare=compare if chosen.status in ("met", "missed") and model.exists() else None)
        reference = ref_rows[0] if ref_rows[0].status == "reference" else None
    return FidelityResult(target, bool(met_rows), chosen, rows, scratch / f"try{chosen.try_no}", classifier, time.perf_counter() - t0,
                          reference, enforce)


def _sound(rows: list[Row]) -> list[Row]:
    """The rows whose outputs are not broken: error (1 - min cosine to FP32) at most BROKEN_ERROR_RATIO times the
    smallest error among ``rows``, or within BROKEN_MIN_GAP of it.  For a random-weight preset agreement means nothing, but
    cosine still tells INT8 noise (every variant of a try alike) from an engine that computes something else: e.g.
    OpenVINO's static-shape f32 engine of a token-merged INT8 ViT-S (cosine 0.61 where its siblings had 0.99)."""
    if not rows:
        return rows
    best_err = min(1.0 - min_cosine(r.metrics) for r in rows)
    limit = max(BROKEN_ERROR_RATIO * best_err, best_err + BROKEN_MIN_GAP)
    return [r for r in rows if 1.0 - min_cosine(r.metrics) <= limit]


def try_command(job: Path) -> list[str]:
    """The child process of one try."""
    return [sys.executable, "-m", "vitedge.quantization._try", str(job)]


def write_table(result: FidelityResult, path_json: Path, path_md: Path, *, model: str, backend: str, eval_source: str,
                images: int) -> None:
    """Every try's numbers, as JSON and Markdown, next to the artifact."""
    from . import _clean

    rows = [r.to_dict() for r in result.rows]
    info = {"model": model, "backend": backend, "target": {"agreement": result.target.agreement, "cosine": result.target.cosine,
            "max_drop": result.target.max_drop, "metric": result.target.describe(result.classifier)},
            "measured_on": eval_source, "images": images, "met": result.met, "chosen_try": result.chosen.try_no,
            "chosen_float_precision": result.chosen.float_precision, "seconds": round(result.seconds, 1), "tries": rows,
            "float_reference": result.reference.to_dict() if result.reference else None, "speedup_vs_float": result.speedup_vs_float,
            "summary": result.summary()}
    path_json.write_text(json.dumps(_clean(info), indent=2) + "\n")
    lines = [f"# INT8 fidelity search: {model} ({backend})", "",
             f"- target: {result.target.describe(result.classifier)}; measured on {eval_source} ({images} images)",
             f"- result: {result.summary()}", "",
             "| try | step | configuration | float parts | engine batch | status | top-1 agreement | drop pp | min cosine | latency ms (batch 1) | float matrix ops | seconds |",
             "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows + ([result.reference] if result.reference else []):
        chosen = " **(chosen)**" if r is result.chosen else ""
        agree = "" if r.metrics.get("top1_agreement") is None else f"{100 * r.metrics['top1_agreement']:.2f}%"
        cos = f"{min_cosine(r.metrics):.5f}" if r.metrics else ""
        lat = "" if r.latency_ms is None else f"{r.latency_ms:.2f}"
        drop = "" if r.drop_pp is None else f"{r.drop_pp:+.2f}"
        status = r.status + (f": {r.error}" if r.error else "")
        shape = "" if r.engine_batch is None else ("dynamic" if r.engine_batch == "dynamic" else f"static {r.engine_batch}")
        lines.append(f"| {r.try_no if r.status != 'reference' else '-'}{chosen} | {r.step} | {r.describe()} | {r.float_precision or ''} | {shape} | {status} | {agree} | "
                     f"{drop} | {cos} | {lat} | {'' if r.float_ops is None else r.float_ops} | {r.seconds:.0f} |")
    ref = result.reference
    if ref is not None and ref.paired_ms:
        lines += ["", f"Float reference and the chosen INT8 try timed side by side (interleaved, one process): "
                  f"{ref.latency_ms:.2f} ms vs {ref.paired_ms:.2f} ms (what `--auto` compares)."]
    lines += ["", "Latency: median of batch-1 runs in the try's own process, its variants timed interleaved, on this machine; "
              "compare rows, not machines.",
              "Agreement with FP32 is measured on held-out images; the search chose on them too, so confirm on",
              "fresh images with `vitedge validate --data DIR`."]
    path_md.write_text("\n".join(lines) + "\n")


def copy_chosen(result: FidelityResult, dest: Path, backend: str) -> list[str]:
    """Move the chosen try's files to ``dest`` (an .xml/.onnx path in the scratch folder); returns their names."""
    src = result.artifact_dir / ("model.xml" if backend == "openvino" else "model.onnx")
    names = []
    shutil.move(str(src), dest)
    names.append(dest.name)
    if backend == "openvino":
        shutil.move(str(src.with_suffix(".bin")), dest.with_suffix(".bin"))
        names.append(dest.with_suffix(".bin").name)
    else:  # external data (models over 1.8 GB) was saved under the final name already
        data = result.artifact_dir / (dest.name + ".data")
        if data.exists():
            shutil.move(str(data), dest.parent / data.name)
            names.append(data.name)
    return names


def kept_float(result: FidelityResult) -> list[str]:
    p = result.artifact_dir / "float_ops.json"
    return json.loads(p.read_text()) if p.exists() else []

