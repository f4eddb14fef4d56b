"""The INT8 fidelity search: quantize once, then revert the harmful groups to float, decided with statistics.

Real pretrained ViTs carry activation outliers (a few residual channels 50-100x the rest, attention
sinks) that make a tool's default INT8 flip predictions, and the harm sits in a few places that differ
from model to model.  The search finds them by measuring, on images the calibration never saw:

1. **Quantize once.**  NNCF quantizes the model with vitedge's default configuration, keeping its output
   revertible (:mod:`.candidates`).  The default INT8 engine is measured for every engine variant the CPU
   offers (float parts in bf16 / f32, static batch 1 / dynamic batch).  Met: done.
2. **Rank.**  One pass measures what keeping each structural group in float buys - per block the Q/K/V
   projections, the attention core (Q·Kᵀ, softmax·V), the output projection, fc1, fc2; the patch embedding;
   the head - each a graph edit of the one quantized model, scored by a continuous measure against FP32
   (mean KL divergence of the class probabilities, or mean 1 - cosine of other outputs) on calibration
   images, so the held-out images are left for the verdicts.  Groups are found from the graph (weights
   and data flow), so ONNX files vitedge did not export work too.
3. **Revert.**  The best-ranked groups (gain per multiply-add) go back to float, 1, 2, 4, 8... at a time
   and then bisected, until the target is met or more than :data:`MAX_FLOAT_SHARE` of the multiply-adds
   would run in float.
4. **Whole-model settings** (SmoothQuant off / 0.5, quantile ranges, full bias correction) are candidates
   of the same search when reverting is not enough: each is tried on a calibration subset first and
   quantized on the full set only when it beats the default there; the winner is reverted in turn.

Every candidate's agreement (with its Wilson interval), drop, minimum cosine, share of multiply-adds in
float and batch-1 latency goes into a table beside the artifact (``<artifact>.fidelity.md`` / ``.json``).
The fastest candidate that meets the target is written; when none does, the most faithful is written
and the caller is told (:attr:`FidelityResult.met`).  Everything native runs in a worker process
(:mod:`.worker`): a crash or hang costs one candidate, not the run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import compare, distributed
from .._io import json_safe
from ..errors import VitedgeError, first_line
from ..options import Target
from ..sysinfo import instruction_sets
from ..ui import err_console, note
from .calibration import EvalSet
from .nncf_int8 import Int8Config
from .roles import Group, graph_roles, matrix_macs, merge, structural_groups
from .worker import Worker, WorkerCrashed, WorkerFailed, WorkerTimeout, data_paths, ray_calls

QUANTIZE_TIMEOUT_S = 3600.0  # one NNCF quantization (the default one is never cut by the budget, only by this)
SETTING_TIMEOUT_S = 900.0  # one whole-model setting's quantization: at most this, and never past the budget
MAX_FLOAT_SHARE = 0.25  # reverting stops before more than this share of the multiply-adds runs in float
RANK_IMAGES = 64  # calibration images the ranking pass scores each group on
REFINE_BLOCKS = 3  # the ranking scores the parts of this many of the blocks that gain most
SUBSET_IMAGES = 64  # calibration images a whole-model setting is first tried on
SETTING_GAIN = 0.8  # a whole-model setting is quantized on the full set when its divergence is below this x the default's
TIE = 1.03  # latencies within 3 % are a tie (timing noise): prefer the earlier, more-INT8 candidate
BROKEN_ERROR_RATIO, BROKEN_MIN_GAP = 3.0, 0.01  # see _sound(): a variant this much further from FP32 is broken
FLOAT_WORTH = 1.05  # INT8 less than this much faster than the float model is called out
CI_LEVEL = compare.CI_LEVEL


def min_cosine(m: dict) -> float:
    outs = m.get("outputs")
    return min(o["cosine_min"] for o in outs.values()) if outs else m["cosine_min"]


SETTINGS: list[tuple[str, dict]] = [  # whole-model settings tried when reverting groups is not enough
    ("SmoothQuant off", {"smooth_quant": -1.0}),
    ("SmoothQuant 0.5", {"smooth_quant": 0.5}),
    ("quantile ranges", {"estimator": "percentile"}),
    ("full bias correction", {"bias_correction": "full"}),
]
# NNCF's ONNX backend fails on full bias correction for torch.onnx exports ("Duplicate definition-site for <input>"):
# not tried there, rather than paid for as a failure every time
ONNX_UNSUPPORTED = ("full bias correction",)


# -- the table's rows -------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured engine variant of one candidate (a row of the table)."""

    no: int
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
    paired_ms: float | None = None  # float reference: the chosen INT8 candidate's latency, timed interleaved with this row
    kept: tuple[str, ...] = ()  # structural groups returned to float by the search
    float_share: float | None = None  # share of the matrix multiply-adds that run in float
    verdict: str | None = None  # met | missed | not separable (the interval straddles the target)
    interval: list[float] | None = None  # Wilson interval of the top-1 agreement
    divergence: float | None = None  # the continuous measure against FP32 on the held-out images
    model: str | None = None  # the candidate's file in the scratch folder

    def describe(self) -> str:
        if self.status == "reference":
            return "FP32 model, not quantized (for comparison)"
        what = self.config.describe()
        if self.kept:
            what += f" + {len(self.kept)} group{'s' if len(self.kept) > 1 else ''} float ({', '.join(self.kept)})"
        return what

    def to_dict(self) -> dict:
        return {
            "candidate": self.no,
            "step": self.step,
            "config": self.config.to_dict(),
            "description": self.describe(),
            "kept_float_groups": list(self.kept),
            "float_mac_share": self.float_share,
            "float_precision": self.float_precision,
            "engine_batch": self.engine_batch,
            "status": self.status,
            "verdict": self.verdict,
            "latency_ms": self.latency_ms,
            "seconds": round(self.seconds, 1),
            "float_ops": self.float_ops,
            "error": self.error,
            "drop_pp": self.drop_pp,
            "top1_agreement": self.metrics.get("top1_agreement"),
            "agreement_interval": self.interval,
            "images": self.metrics.get("images"),
            "cosine_min": min_cosine(self.metrics) if self.metrics else None,
            "divergence": self.divergence,
            "snr_db": self.metrics.get("snr_db"),
            "paired_int8_latency_ms": self.paired_ms,
        }


@dataclass
class FidelityResult:
    target: Target
    met: bool
    chosen: Row
    rows: list[Row]
    artifact: Path | None  # the chosen candidate's file (in the scratch folder)
    classifier: bool
    seconds: float
    reference: Row | None = None  # the FP32 model at the CPU's float precision, measured alike
    enforced: bool = True  # False: predictions mean nothing (random-weight preset), speed alone decides
    ranking: list[dict] = field(default_factory=list)  # every group's gain, best first
    default: Row | None = None  # the default INT8 engine as deployed (what the search started from)
    settings: dict = field(default_factory=dict)  # whole-model settings tried on a calibration subset
    phases: dict = field(default_factory=dict)  # seconds per phase of the search (default, ranking, revert, settings)
    ray: list = field(default_factory=list)  # what ran as Ray tasks (--ray): items, seconds, nodes per batch

    @property
    def int8_ms(self) -> float | None:
        """The chosen INT8 candidate's latency: as timed beside the float reference when it was, else its own."""
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
            return bool(self.int8_ms and r.latency_ms < self.int8_ms / TIE)
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
            return f"INT8 ({q:.2f} ms): {self.speedup_vs_float:.2f}x faster than {fl} on this CPU (random weights: speed alone decides)"
        if self.float_wins:
            why = "INT8 missed the fidelity target" if not self.met else f"the best INT8 ({q:.2f} ms) is not faster on this CPU"
            return f"{fp}: {why}, and {fl} meets the target ({_numbers(r, self.classifier)})"
        if not self.target.check(r.metrics, self.classifier, r.drop_pp):
            return f"INT8 ({q:.2f} ms): {fl} misses the fidelity target"
        return f"INT8 ({q:.2f} ms): {self.speedup_vs_float:.2f}x faster than {fl} on this CPU"

    @property
    def speedup_vs_float(self) -> float | None:
        if self.reference is None or not self.reference.latency_ms or not self.int8_ms:
            return None
        return self.reference.latency_ms / self.int8_ms

    def summary(self) -> str:
        c = self.chosen
        what = (
            f"candidate {c.no} ({c.describe()}"
            + (f", float parts {c.float_precision}" if c.float_precision else "")
            + (f", {'dynamic batch' if c.engine_batch == 'dynamic' else f'static batch {c.engine_batch}'} engine" if c.engine_batch else "")
            + ")"
        )
        nums = _numbers(c, self.classifier)
        n = len({r.no for r in self.rows})
        done = f"{n} candidate{'s' if n != 1 else ''} in {self.seconds:.0f} s"
        speed = ""
        if self.speedup_vs_float is not None and self.reference is not None:
            speed = f"; {self.speedup_vs_float:.2f}x the speed of the FP32 model at {self.reference.float_precision or 'fp32'}"
            if self.speedup_vs_float < FLOAT_WORTH:
                speed += " - INT8 buys little here: consider --auto"
        gave = _given_up(c, self.default)
        if self.met:
            head = f"INT8 fidelity target ({self.target.describe(self.classifier)}) met by {what}: {nums}; {done}{gave}{speed}"
        else:
            head = f"INT8 fidelity target ({self.target.describe(self.classifier)}) NOT met after {done}; kept the most faithful, {what}: {nums}{speed}"
        if c.verdict == "not separable" and c.interval is not None:
            head += (
                f" - {c.metrics.get('images')} held-out images cannot separate it from the target "
                f"(interval [{100 * c.interval[0]:.1f}, {100 * c.interval[1]:.1f}]%); give more with --val"
            )
        return head


def _given_up(c: Row, default: Row | None) -> str:
    """What the user gave up for fidelity: multiply-adds in float and the latency against the default INT8 engine."""
    if not c.kept:
        return ""
    s = f"; gave up: {100 * (c.float_share or 0):.1f}% of the multiply-adds run in float"
    if default is not None and default.latency_ms and c.latency_ms:
        s += f", {c.latency_ms / default.latency_ms:.2f}x the default INT8 latency"
    return s


def _numbers(r: Row, classifier: bool) -> str:
    parts = []
    if classifier and "top1_agreement" in r.metrics:
        s = f"agreement {100 * r.metrics['top1_agreement']:.1f}%"
        if r.interval is not None:
            s += f" [{100 * r.interval[0]:.1f}, {100 * r.interval[1]:.1f}] on {r.metrics.get('images')} images"
        if r.metrics.get("size"):
            s += f" at {r.metrics['size']} (the worst of {len(r.metrics['per_size'])} sizes)"
        parts.append(s)
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
        return (-1.0, -1.0, -1.0)
    cos = min_cosine(r.metrics)
    div = -(r.divergence if r.divergence is not None else 0.0)
    if classifier:
        return (r.metrics.get("top1_agreement", 0.0), -(r.drop_pp or 0.0), div, cos)
    return (cos, div, r.metrics.get("snr_db") or 0.0)


def divergence(ref: dict[str, np.ndarray], outs: dict[str, np.ndarray], classifier: bool) -> float:
    """The continuous measure candidates are ranked by: mean KL(FP32 || INT8) of the class probabilities for a
    classifier, else the mean over images and outputs of 1 - cosine.  Unlike agreement it moves with every image,
    so a few dozen images rank candidates that agreement on hundreds could not tell apart."""
    outs = compare.match_outputs(ref, outs, "the quantized model", check_shapes=False)
    if classifier:
        name = next(iter(ref))
        p, q = (_log_softmax(np.asarray(a, np.float64)) for a in (ref[name], outs[name]))
        kl = (np.exp(p) * (p - q)).sum(axis=1)
        return float(np.mean(kl)) if np.isfinite(kl).all() else float("inf")
    errs = [1.0 - compare.cosine(np.asarray(ref[k], np.float64), np.asarray(outs[k], np.float64)) for k in ref]
    return float(np.mean([e.mean() for e in errs]))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# -- data on disk -----------------------------------------------------------------------------------------------------------
class _Arrays:
    """The calibration and held-out images, preprocessed once, as .npy files the worker maps in: one file each, or for
    a dynamic-size model one per input size (:data:`~.candidates.Data`)."""

    def __init__(self, scratch: Path, calib_stream, ev: EvalSet):
        self.dir = scratch
        self.calib = _to_npy(scratch / "calib.npy", calib_stream)
        self.eval = _to_npy(scratch / "eval.npy", ev.batches(32))
        calib = [np.load(p, mmap_mode="r") for p in data_paths(self.calib)]
        self.calib_count = sum(len(x) for x in calib)
        per = -(-RANK_IMAGES // len(calib))  # the ranking's images: as many of each size
        ranks = [scratch / f"rank{Path(p).name.removeprefix('calib')}" for p in data_paths(self.calib)]
        for x, path in zip(calib, ranks, strict=True):
            np.save(path, np.asarray(x[:per]))
        self.rank: str | list[str] = str(ranks[0]) if isinstance(self.calib, str) else [str(r) for r in ranks]


def _to_npy(path: Path, batches) -> str | list[str]:
    """Stream batches into .npy files: one at ``path``, or when the batches come in several input sizes one per
    size (``calib.224x224.npy``...), in the order the sizes first come (two passes would re-decode images; this
    grows a raw file per size, then adds the header)."""
    raws: dict[tuple, tuple[Path, list[int]]] = {}
    dtype = np.float32
    for b in batches:
        b = np.ascontiguousarray(b, dtype=np.float32)
        shape = tuple(b.shape[1:])
        if shape not in raws:
            raws[shape] = (path.with_suffix(f".{len(raws)}.raw"), [0])
        raw, n = raws[shape]
        with open(raw, "ab") as f:
            f.write(b.tobytes())
        n[0] += len(b)
    if not raws:
        raise VitedgeError("no usable images for the INT8 search")
    out = []
    for shape, (raw, n) in raws.items():
        dest = path if len(raws) == 1 else path.with_suffix(f".{shape[-2]}x{shape[-1]}.npy")
        arr = np.lib.format.open_memmap(dest, mode="w+", dtype=dtype, shape=(n[0], *shape))
        arr[:] = np.memmap(raw, dtype=dtype, mode="r", shape=(n[0], *shape))
        arr.flush()
        del arr
        raw.unlink()
        out.append(str(dest))
    return out[0] if len(out) == 1 else out


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- the search -------------------------------------------------------------------------------------------------------------
class _Search:
    """One search: the source model, the data on disk, the worker, the target, the rows so far."""

    def __init__(
        self,
        src: Path,
        fmt: str,
        arrays: _Arrays,
        ev: EvalSet,
        scratch: Path,
        target: Target,
        classifier: bool,
        fixed_batch: int | None,
        final_name: str,
        worker: Worker,
        budget_s: float,
        t0: float,
        enforce: bool,
    ):
        self.src, self.fmt, self.arrays, self.ev, self.scratch = src, fmt, arrays, ev, scratch
        self.target, self.classifier, self.fixed_batch, self.final_name = target, classifier, fixed_batch, final_name
        self.worker, self.budget_s, self.t0, self.enforce = worker, budget_s, t0, enforce
        self.rows: list[Row] = []
        self.count = 0
        self.suffix = ".xml" if fmt == "openvino" else ".onnx"
        self._structure: tuple | None = None
        self.rank_ref: dict[str, np.ndarray] | None = None
        self.settings: dict[str, dict] = {}  # whole-model settings tried on a calibration subset
        self.phases: dict[str, float] = {}  # seconds per phase, for the table
        self.ray: Any = None  # distributed.RayOptions: the ranking and the settings run as Ray tasks (--ray)
        self.ray_items: list[dict] = []  # what ran on Ray, for the table

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's seconds to phase ``name`` of the table."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def structure(self) -> tuple[dict[str, float], list[Group], list[tuple]]:
        """The model's matrix multiply-adds, structural groups and attention pairs, read from the graph once (the
        first time while the worker calibrates)."""
        if self._structure is None:
            roles = graph_roles(_onnx_structure(self.src))
            macs = matrix_macs(self.src)
            pairs = [tuple(roles.attention[i : i + 2]) for i in range(0, len(roles.attention) - 1, 2)]
            self._structure = (macs, structural_groups(roles, macs), pairs)
        return self._structure

    @property
    def macs(self) -> dict[str, float]:
        return self.structure()[0]

    @property
    def groups(self) -> list[Group]:
        return self.structure()[1]

    @property
    def attention_pairs(self) -> list[tuple]:
        return self.structure()[2]

    def while_calibrating(self) -> None:
        """What this process does while the worker runs NNCF the first time: the FP32 reference on the held-out
        images (NNCF leaves a core idle in its bookkeeping and graph passes) and the model's structure."""
        self.ev.resolve_reference()
        self.structure()

    # time
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def _call(self, name: str, timeout: float, what: str, **kw):
        return self.worker.call(name, timeout, what, **kw)

    # steps
    def quantize(
        self, cfg: Int8Config, tag: str, count: int | None = None, timeout: float | None = None, meanwhile: Callable[[], Any] | None = None
    ) -> tuple[str, list[str], float]:
        """NNCF once for ``cfg`` (on the first ``count`` calibration images); the revertible base's path.
        ``meanwhile``: work for this process while the worker calibrates (the FP32 reference, the first time)."""
        out = self.scratch / tag / f"base{self.suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        n = f"{count} of the {self.arrays.calib_count}" if count else f"{self.arrays.calib_count}"
        res = self._call(
            "quantize_base",
            timeout or max(5.0, self.left()),
            f"INT8: quantizing with {cfg.describe()} on {n} calibration images",
            source=str(self.src),
            fmt=self.fmt,
            config=cfg.to_dict(),
            calib=self.arrays.calib,
            out=str(out),
            count=count,
            fixed_batch=self.fixed_batch,
            meanwhile=meanwhile,
        )
        return str(out), res["quantized"], res["seconds"]

    def float_share(self, base_quantized: list[str], kept: list[Group]) -> float:
        """Share of the matrix multiply-adds that run in float: those not quantized in the base, plus the kept groups."""
        q = {n.removesuffix("/WithoutBiases") for n in base_quantized}
        for qk, av in self.attention_pairs:  # OpenVINO fuses Q·Kᵀ into its attention op, named after ·V
            if av in q:
                q.add(qk)
        for g in kept:
            q -= set(g.ops)
        total = float(sum(self.macs.values())) or 1.0
        return sum(v for k, v in self.macs.items() if k not in q) / total

    def evaluate(
        self,
        step: str,
        cfg: Int8Config,
        base: str,
        quantized: list[str],
        kept: list[Group],
        variants: list[dict],
        time_s: float | None = None,
        seconds: float = 0.0,
        again: Row | None = None,
    ) -> list[Row]:
        """A candidate (the base with ``kept`` in float) measured on the held-out images, one row per engine variant,
        timed for ``time_s`` seconds in all (default: 1 s for one variant, half a second per variant for more; the
        candidates that meet the target are timed again side by side before one is chosen).
        ``again``: a candidate already built, measured as more engine variants (its file is run as it is)."""
        time_s = max(1.0, 0.5 * len(variants)) if time_s is None else time_s
        if again is None:
            self.count += 1
        no = again.no if again is not None else self.count
        folder = self.scratch / f"candidate{no}"
        model = folder / f"model{self.suffix}"
        ops = [o for g in kept for o in g.ops]
        label = f"INT8 candidate {no} ({step})"
        t0 = time.perf_counter()
        try:
            res = self._call(
                "measure",
                max(60.0, self.left()) if no > 1 else QUANTIZE_TIMEOUT_S,
                f"{label}: measuring on {len(self.ev)} held-out images",
                fmt=self.fmt,
                model=str(model),
                data=self.arrays.eval,
                out_dir=str(folder),
                variants=variants,
                fixed_batch=self.fixed_batch,
                base=None if again is not None else base,
                keep_float=ops,
                keep=True,
                time_s=time_s,
                data_name=f"{self.final_name}.data",
            )
            if again is not None:  # the file was built before: its float ops were recorded then
                res["float_ops"] = json.loads((folder / "float_ops.json").read_text())
        except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
            status = _status(exc)
            row = Row(no, step, cfg, None, status, seconds=time.perf_counter() - t0 + seconds, error=str(exc)[:200], kept=tuple(g.name for g in kept))
            self._print([row])
            self.rows.append(row)
            return [row]
        share = self.float_share(quantized, kept)
        rows = []
        for v in res["variants"]:
            outs = _load_npz(v["outputs"])
            m = self.ev.measure_outputs(outs)
            drop = self.ev.drop_pp(m) if self.classifier else None
            verdict, interval = self.target.verdict(m, self.classifier, drop)
            status = "met" if self.target.check(m, self.classifier, drop) else "missed"
            shape = (self.fixed_batch or (1 if v["static"] else "dynamic")) if self.fmt == "openvino" else None
            rows.append(
                Row(
                    no,
                    step,
                    cfg,
                    v["float_precision"],
                    status,
                    metrics=m,
                    latency_ms=v.get("latency_ms"),
                    seconds=time.perf_counter() - t0 + seconds,
                    float_ops=len(res["float_ops"]),
                    drop_pp=drop,
                    engine_batch=shape,
                    kept=tuple(g.name for g in kept),
                    float_share=share,
                    verdict=verdict,
                    interval=interval,
                    divergence=divergence(self.ev.ref_outputs, outs, self.classifier),
                    model=str(model),
                )
            )
        (folder / "float_ops.json").write_text(json.dumps(res["float_ops"]))
        self._print(rows)
        _warn_shape_gap(rows)
        self.rows += rows
        return rows

    def _print(self, rows: list[Row]) -> None:
        for r in rows:
            shape = "" if r.engine_batch is None else ("dynamic " if r.engine_batch == "dynamic" else "static ")
            share = "" if r.float_share is None else f"{100 * r.float_share:4.1f}% float, "
            err_console.print(
                f"  {r.no:3d} {r.status:7s} {('float ' + r.float_precision) if r.float_precision else '':11s} {shape:8s}"
                f"{share}{_numbers(r, self.classifier) or r.error or ''}",
                soft_wrap=True,
            )

    def rank(self, base: str, variant: dict, candidates: list[Group]) -> list[dict]:
        """Score groups by how much keeping each in float lowers the divergence from FP32 on calibration images: first
        whole blocks (and the groups outside blocks), then the parts of the :data:`REFINE_BLOCKS` blocks that gain most."""
        if self.rank_ref is None:
            path = str(self.scratch / "rank_reference.npz")
            self._call(
                "reference_outputs",
                600.0,
                "INT8: FP32 outputs for the ranking pass",
                fmt=self.fmt,
                source=str(self.src),
                data=self.arrays.rank,
                out=path,
                fixed_batch=self.fixed_batch,
            )
            self.rank_ref = _load_npz(path)
        ref = self.rank_ref
        folder = self.scratch / "ranking"

        def call(ops: list[str], tag: str) -> dict:  # the worker call that scores one group
            return {
                "fmt": self.fmt,
                "model": str(folder / tag / f"model{self.suffix}"),
                "data": self.arrays.rank,
                "out_dir": str(folder / tag),
                "variants": [variant],
                "fixed_batch": self.fixed_batch,
                "base": base,
                "keep_float": ops,
                "keep": False,
            }

        def divergence_of(res: dict) -> float:
            return divergence(ref, _load_npz(res["variants"][0]["outputs"]), self.classifier)

        base_div = divergence_of(self._call("measure", max(30.0, self.left()), "INT8 ranking: none", **call([], "none")))
        by_block: dict[int, list[Group]] = {}
        for g in candidates:
            if g.block is not None:
                by_block.setdefault(g.block, []).append(g)
        level1 = [merge(parts, f"block {b}") if len(parts) > 1 else parts[0] for b, parts in by_block.items()]
        level1 += [g for g in candidates if g.block is None]
        images = min(RANK_IMAGES, self.arrays.calib_count)
        err_console.print(f"[bold]INT8 ranking[/]: what keeping each of {len(level1)} blocks and groups in float buys ({images} calibration images)")
        ranking = self._score_all(level1, call, divergence_of, "block")
        blocks = [r for r in ranking if r["block"] is not None and len(by_block[r["block"]]) > 1 and r["divergence"] is not None and r["divergence"] < base_div]
        refine = [r["block"] for r in sorted(blocks, key=lambda r: r["divergence"])[:REFINE_BLOCKS]]
        if refine:
            err_console.print(f"[bold]INT8 ranking[/]: the parts of block{'s' if len(refine) > 1 else ''} {', '.join(map(str, refine))}")
            ranking += self._score_all([g for b in refine for g in by_block[b]], call, divergence_of, "part")
            for r in ranking:  # a refined block is reverted through its parts
                r["refined"] = r["level"] == "block" and r["block"] in refine
        for r in ranking:
            r["base_divergence"] = base_div
            if r.get("divergence") is not None:
                r["gain"] = base_div - r["divergence"]
        return ranking

    def _score_all(self, groups: list[Group], call: Callable[[list[str], str], dict], divergence_of: Callable[[dict], float], level: str) -> list[dict]:
        """Each group's entry of the ranking: ``call(ops, tag)`` is its worker call, ``divergence_of`` reads the result.
        With ``--ray`` the groups run as Ray tasks, all at once; else one after the other in the worker."""
        entries: list[dict] = [
            {"group": g.name, "ops": list(g.ops), "share": g.share, "block": g.block, "level": level, "gain": None, "divergence": None} for g in groups
        ]
        tags = [f"{level}{k}" for k in range(len(groups))]
        remote = self.on_ray([[("measure", call(list(g.ops), tag))] for g, tag in zip(groups, tags, strict=True)], [f"ranking {g.name}" for g in groups])
        if remote is not None:
            for e, res in zip(entries, remote, strict=True):
                if "error" in res:
                    e["error"] = res["error"][:160]
                else:
                    e["divergence"] = divergence_of(res["results"][0])
            return entries
        out = []
        for k, (e, g, tag) in enumerate(zip(entries, groups, tags, strict=True)):
            if self.left() <= 5:
                note(f"INT8 search budget ({self.budget_s:.0f} s) used up while ranking ({k} of {len(groups)}); pass --search-budget to allow more")
                break
            try:
                e["divergence"] = divergence_of(self._call("measure", max(30.0, self.left()), f"INT8 ranking: {tag}", **call(list(g.ops), tag)))
            except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
                e["error"] = str(exc)[:160]
            out.append(e)
        return out

    def on_ray(self, items: list[list[tuple[str, dict]]], names: list[str]) -> list[dict] | None:
        """Independent items of the search (each a list of worker calls run in order) as Ray tasks, with ``--ray``:
        each item's ``{"results": [...]}`` or ``{"error": ...}``.  None without ``--ray``, for fewer than two items,
        or when Ray cannot run them (said in a note): the caller then runs them in its worker, one after the other.
        The tasks run on nodes whose instruction sets are this machine's (INT8 kernels differ with them)."""
        if self.ray is None or len(items) < 2 or self.left() <= 5:
            return None
        t0 = time.perf_counter()
        try:
            run = distributed.run_shards(
                ray_calls,
                {"threads": 1},  # one core per task: Ray runs as many tasks as the cluster has CPUs
                items,
                names,
                self.ray,
                isa=instruction_sets(),
                why_isa="INT8 candidates compute with the CPU's instruction sets (VNNI, BF16)",
            )
        except VitedgeError as exc:
            note(f"INT8 search: {len(items)} items could not run on Ray ({first_line(exc)}); running them here")
            return None
        where = {n.ip for n in run.nodes if n.shards}
        self.ray_items.append({"items": len(items), "seconds": time.perf_counter() - t0, "nodes": sorted(where)})
        err_console.print(f"  {len(items)} items on Ray ({len(where)} node{'s' if len(where) != 1 else ''}) in {time.perf_counter() - t0:.0f} s")
        return run.results


SHAPE_GAP = 3.0  # one file's static and dynamic engines this far apart (divergence) compute different things


def _warn_shape_gap(rows: list[Row]) -> None:
    """The same file as a static batch-1 and a dynamic-batch engine should agree to rounding; when not, the runtime
    computes something else for one of them (seen: OpenVINO's fused Reduce + FakeQuantize, docs/openvino_static_batch.md)."""
    by_fp: dict = {}
    for r in rows:
        if r.divergence is not None and r.engine_batch is not None:
            by_fp.setdefault(r.float_precision, {})[r.engine_batch == 1] = r.divergence
    for fp, d in by_fp.items():
        if len(d) == 2 and max(d.values()) > SHAPE_GAP * max(min(d.values()), 1e-6):
            worse = "static batch-1" if d[True] > d[False] else "dynamic-batch"
            note(
                f"the {worse} engine ({fp or 'default'} float parts) is {max(d.values()) / max(min(d.values()), 1e-9):.1f}x further from "
                "FP32 than the other shape of the same file: a runtime issue (see docs/openvino_static_batch.md); "
                "the search keeps the faithful one"
            )


def _status(exc: WorkerCrashed | WorkerTimeout | WorkerFailed) -> str:
    """A failed call's status in the table."""
    return "crashed" if isinstance(exc, WorkerCrashed) else "timeout" if isinstance(exc, WorkerTimeout) else "failed"


def _onnx_structure(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _order(ranking: list[dict]) -> list[Group]:
    """Groups worth reverting, best first: positive gain, by gain per share of multiply-adds (a cheap group that buys
    as much goes first), where a group's share counts at least half a percent.  A block whose parts were scored is
    reverted through its parts."""
    useful = [r for r in ranking if r.get("gain") is not None and r["gain"] > 0 and not r.get("refined")]
    useful.sort(key=lambda r: r["gain"] / max(r["share"], 0.005), reverse=True)
    return [Group(r["group"], tuple(r["ops"]), r["share"]) for r in useful]


def _within(order: list[Group], share_of, cap: float) -> list[Group]:
    """``order`` without the groups that would take the float share past ``cap`` (each skipped group leaves room
    for the cheaper ones after it)."""
    kept: list[Group] = []
    for g in order:
        if share_of(kept + [g]) <= cap + 1e-9:
            kept.append(g)
    return kept


def search(
    src: Path,
    fmt: str,
    calib_stream,
    ev: EvalSet,
    scratch: Path,
    *,
    target: Target,
    budget_s: float,
    fixed_batch: int | None,
    base_config: Int8Config,
    variants: list[dict],
    final_name: str = "model.onnx",
    classifier: bool | None = None,
    float_candidate: bool = False,
    enforce: bool = True,
    worker: Worker | None = None,
    ray: Any = None,
) -> FidelityResult:
    """Quantize once with ``base_config``, measure every engine variant of ``variants``; when the target is missed,
    rank the groups and revert the harmful ones, then try whole-model settings, within ``budget_s`` seconds.
    ``fmt``: NNCF's output, ``openvino`` (an IR) or ``onnx`` (QDQ ONNX for ONNX Runtime).  ``float_candidate`` (``--auto``): the FP32 model is measured
    alike at the CPU's fastest float precision and timed beside the chosen INT8.  ``enforce=False`` (random-weight
    presets, whose predictions mean nothing): the fastest sound variant of the default is chosen, no search.
    ``worker``: one started earlier (:meth:`Worker.early`), closed here like the one made otherwise.  ``ray``: a
    :class:`~vitedge.distributed.RayOptions`: the ranking's groups and the whole-model settings, independent of each
    other, run as Ray tasks (the candidates that build on each other stay in the worker)."""
    t0 = time.perf_counter()
    with worker or Worker(scratch) as worker:
        worker.start()  # its imports (NNCF, OpenVINO, ONNX Runtime) overlap with preparing the images here
        s = _Search(src, fmt, _Arrays(scratch, calib_stream, ev), ev, scratch, target, bool(classifier), fixed_batch, final_name, worker, budget_s, t0, enforce)
        s.ray = ray
        base_cfg = base_config
        err_console.print(f"[bold]INT8 default[/]: {base_cfg.describe()}")
        try:
            base, quantized, q_s = s.quantize(base_cfg, "default", timeout=QUANTIZE_TIMEOUT_S, meanwhile=s.while_calibrating)
        except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
            raise VitedgeError(f"INT8 quantization failed: {exc}", "check the model with `vitedge check parity`, or try --fp16") from None
        assert ev.ref is not None, "the evaluation set needs its FP32 reference (EvalSet.set_reference / defer_reference)"
        if classifier is None:  # class logits: one (N, classes) output
            classifier = ev.ref.ndim == 2 and ev.ref.shape[1] > 1 and len(ev.ref_outputs) == 1
        s.classifier = bool(classifier)
        # the engine `vitedge compile` builds by default first; the other variants (float parts, engine shape) only when
        # it misses, or for a random-weight preset, which picks its fastest sound variant
        first = s.evaluate("default", base_cfg, base, quantized, [], variants if not enforce else variants[:1], seconds=q_s)
        if enforce and len(variants) > 1 and first[0].model and not any(r.status == "met" for r in first):
            first += s.evaluate("default", base_cfg, base, quantized, [], variants[1:], again=first[0])
        s.t0 = time.perf_counter()  # the budget counts from here: the default is never cut by it
        s.phases["default"] = s.t0 - t0
        default = _best(first, classifier)
        ranking: list[dict] = []
        if enforce and budget_s > 0 and not any(r.status == "met" for r in first) and default is not None:
            ranking = _revert_search(s, base_cfg, base, quantized, default)
            if not any(r.status == "met" for r in s.rows) and s.left() > 5:
                with s.phase("settings"):
                    _settings_search(s, base_cfg, default, ranking)
        rows = s.rows
        best = _best(rows, classifier)
        if best is None:
            errors = "; ".join(f"candidate {r.no}: {r.status} ({r.error})" for r in rows[:3])
            raise VitedgeError(f"every INT8 candidate failed: {errors}", "check the model with `vitedge check parity`, or try --fp16")
        met_rows = [r for r in rows if r.status == "met"]
        chosen = best
        if not enforce:  # predictions that mean nothing (a random-weight preset): pick on speed, among sound variants
            ran = _sound([r for r in rows if r.status in ("met", "missed") and r.latency_ms and r.metrics])
            chosen = min(ran, key=lambda r: r.latency_ms or 0.0) if ran else best  # all timed: filtered above
        elif met_rows:
            chosen = _fastest(s, met_rows)
        reference = None
        if float_candidate:  # --auto: the FP32 model at the CPU's fastest float precision, measured and timed alike
            reference = _float_reference(s, chosen, variants[0])
    return FidelityResult(
        target,
        bool(met_rows),
        chosen,
        rows,
        Path(chosen.model) if chosen.model else None,
        classifier,
        time.perf_counter() - t0,
        reference,
        enforce,
        ranking,
        _deployed_default(first),
        s.settings,
        {k: round(v, 1) for k, v in s.phases.items()},
        s.ray_items,
    )


def _best(rows: list[Row], classifier: bool) -> Row | None:
    ran = [r for r in rows if r.status in ("met", "missed")]
    return max(ran, key=lambda r: _score(r, classifier)) if ran else None


def _deployed_default(first: list[Row]) -> Row | None:
    return first[0] if first and first[0].status in ("met", "missed") else None


def _revert_search(s: _Search, cfg: Int8Config, base: str, quantized: list[str], start: Row) -> list[dict]:
    """Rank the groups on ``base``, then revert the best 1, 2, 4, ... and bisect; returns the ranking."""
    variant = {"float_precision": start.float_precision, "static": start.engine_batch == 1}
    # the ranking measures quantization's harm: float parts in f32 where the engine offers it, so bf16's own rounding
    # (which moves with every change to the graph) cannot drown the signal
    rank_variant = {**variant, "float_precision": "f32"} if variant["float_precision"] == "bf16" else variant
    q = {n.removesuffix("/WithoutBiases") for n in quantized}
    candidates = [
        g for g in s.groups if any(o in q for o in g.ops) or (g.name.endswith("attention core") and any(av in q for _, av in s.attention_pairs if av in g.ops))
    ]
    with s.phase("ranking"):
        ranking = s.rank(base, rank_variant, candidates)
    with s.phase("revert"):
        _revert(s, cfg, base, quantized, ranking, variant)
    return ranking


def _revert(s: _Search, cfg: Int8Config, base: str, quantized: list[str], ranking: list[dict], variant: dict) -> None:
    """Revert the best 1, 2, 4, ... groups of ``ranking`` until the target is met, then bisect to the fewest."""
    order = _order(ranking)
    if not order:
        note("INT8 search: keeping no single group in float brings the model closer to FP32")
        return
    order = _within(order, lambda gs: s.float_share(quantized, gs), MAX_FLOAT_SHARE)
    if not order:
        note(f"INT8 search: every group that helps puts more than {100 * MAX_FLOAT_SHARE:.0f}% of the multiply-adds in float")
        return
    cap = len(order)
    err_console.print(
        f"[bold]INT8 revert[/]: groups in order of gain per multiply-add: {', '.join(g.name for g in order[:8])}" + (" ..." if len(order) > 8 else "")
    )
    tried: dict[int, bool] = {}

    def attempt(k: int) -> bool:
        if k not in tried:
            rows = s.evaluate(f"revert {k} group{'s' if k > 1 else ''}", cfg, base, quantized, order[:k], [variant])
            tried[k] = any(r.status == "met" for r in rows)
        return tried[k]

    lo, hi, k = 0, None, 1
    while s.left() > 5:  # doubling
        k = min(k, cap)
        if attempt(k):
            hi = k
            break
        lo = k
        if k == cap:
            break
        k *= 2
    while hi is not None and hi - lo > 1 and s.left() > 5:  # bisecting: the fewest groups that meet the target
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    if s.left() <= 5:
        note(f"INT8 search budget ({s.budget_s:.0f} s) used up while reverting groups; pass --search-budget to allow more")


def _settings_search(s: _Search, base_cfg: Int8Config, default: Row, ranking: list[dict]) -> None:
    """Whole-model settings, each first on a calibration subset against the default on the same subset (divergence on
    the ranking images); the best that beats it clearly is quantized on the full set, measured, and reverted in the
    default's ranking order."""
    if s.rank_ref is None:
        return
    subset = SUBSET_IMAGES if s.arrays.calib_count > SUBSET_IMAGES else None
    variant = {"float_precision": default.float_precision, "static": default.engine_batch == 1}
    score_variant = {**variant, "float_precision": "f32"} if variant["float_precision"] == "bf16" else variant  # as the ranking
    configs = {"default": base_cfg}
    configs.update(
        {name: base_cfg.but(**change) for name, change in SETTINGS if base_cfg.but(**change) != base_cfg and not (s.fmt == "onnx" and name in ONNX_UNSUPPORTED)}
    )
    err_console.print(f"[bold]INT8 settings[/]: each on {subset or 'all'} calibration images, against the default on the same images")

    def steps(k: int, cfg: Int8Config) -> list[tuple[str, dict]]:  # quantize on the subset, then score on the ranking images
        folder = s.scratch / f"setting{k}"
        base = folder / f"base{s.suffix}"
        base.parent.mkdir(parents=True, exist_ok=True)
        quantize = {
            "source": str(s.src),
            "fmt": s.fmt,
            "config": cfg.to_dict(),
            "calib": s.arrays.calib,
            "out": str(base),
            "count": subset,
            "fixed_batch": s.fixed_batch,
        }
        measure = {
            "fmt": s.fmt,
            "model": str(folder / f"model{s.suffix}"),
            "data": s.arrays.rank,
            "out_dir": str(folder),
            "variants": [score_variant],
            "fixed_batch": s.fixed_batch,
            "base": str(base),
            "keep_float": [],
            "keep": False,
        }
        return [("quantize_base", quantize), ("measure", measure)]

    def record(name: str, cfg: Int8Config, res: dict | None, error: str | None, status: str = "failed") -> None:
        if res is None:
            s.settings[name] = {"config": cfg.to_dict(), "status": status, "error": (error or "")[:200], "divergence": None}
            err_console.print(f"  setting '{name}': {status} ({(error or '')[:120]})", soft_wrap=True)
            return
        d = divergence(s.rank_ref or {}, _load_npz(res["variants"][0]["outputs"]), s.classifier)
        s.settings[name] = {"config": cfg.to_dict(), "status": "ok", "divergence": d, "images": subset or s.arrays.calib_count}
        err_console.print(f"  setting '{name}': divergence {d:.4g} on the ranking images", soft_wrap=True)

    items = list(configs.items())
    remote = s.on_ray([steps(k, cfg) for k, (_, cfg) in enumerate(items)], [f"setting '{name}'" for name, _ in items])
    for k, (name, cfg) in enumerate(items):
        if remote is not None:
            got = remote[k]
            record(name, cfg, got["results"][1] if "results" in got else None, got.get("error"))
            continue
        if s.left() <= 5:
            note(f"INT8 search budget ({s.budget_s:.0f} s) used up before trying '{name}'; pass --search-budget to allow more")
            break
        quantize, measure = (kw for _, kw in steps(k, cfg))
        try:
            s._call(
                "quantize_base",
                max(5.0, min(SETTING_TIMEOUT_S, s.left())),
                f"INT8: quantizing with {cfg.describe()} on {subset or s.arrays.calib_count} calibration images",
                **quantize,
            )
            record(name, cfg, s._call("measure", max(30.0, s.left()), f"INT8 setting '{name}': measuring", **measure), None)
        except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
            record(name, cfg, None, str(exc), _status(exc))
    ref = (s.settings.get("default") or {}).get("divergence")
    tried = [(n, v["divergence"]) for n, v in s.settings.items() if n != "default" and v["divergence"] is not None]
    if ref is None or not tried or s.left() <= 5:
        return
    name, d = min(tried, key=lambda kv: kv[1])
    if not d < SETTING_GAIN * ref:
        note(f"INT8 search: no whole-model setting beats the default clearly (best: {name}, divergence {d:.3g} vs {ref:.3g})")
        return
    cfg = configs[name]
    try:
        base, quantized, q_s = s.quantize(cfg, "setting_full", timeout=max(5.0, s.left()))
    except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
        err_console.print(f"  setting '{name}' on all calibration images: {exc}", soft_wrap=True)
        return
    rows = s.evaluate(name, cfg, base, quantized, [], [variant], seconds=q_s)
    if any(r.status == "met" for r in rows) or s.left() <= 5:
        return
    order = _within(_order(ranking), lambda gs: s.float_share(quantized, gs), MAX_FLOAT_SHARE)
    for k in sorted({min(len(order), k) for k in (1, 2, 4, 8, 16, 32)}):
        if k == 0 or s.left() <= 5:
            break
        rows = s.evaluate(f"{name} + revert {k}", cfg, base, quantized, order[:k], [variant])
        if any(r.status == "met" for r in rows):
            return


def _fastest(s: _Search, met: list[Row]) -> Row:
    """Among the candidates that meet the target, the fastest, timed side by side in one process (within 3 % is a
    tie: the one with fewer ops in float, then the earlier, wins)."""
    met = sorted(met, key=lambda r: (r.float_share or 0.0, r.no))
    if len(met) > 1:
        try:
            lat = s._call(
                "time_models",
                300.0,
                f"INT8: timing {len(met)} candidates side by side",
                fmt=s.fmt,
                models=[{"path": r.model, "float_precision": r.float_precision, "static": r.engine_batch == 1} for r in met],
                sample=s.arrays.eval,
                fixed_batch=s.fixed_batch,
            )
            for r, ms in zip(met, lat, strict=True):
                r.latency_ms = ms
        except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
            note(f"timing the candidates side by side failed ({exc}); using each candidate's own timing")
    timed = [(r, ms) for r in met if (ms := r.latency_ms)]
    if not timed:
        return met[0]
    fastest = min(ms for _, ms in timed)
    return next(r for r, ms in timed if ms <= fastest * TIE)


def _float_reference(s: _Search, chosen: Row, variant: dict) -> Row | None:
    """The FP32 model at the CPU's fastest float precision: measured on the held-out images and timed beside ``chosen``."""
    folder = s.scratch / "float_reference"
    try:
        res = s._call(
            "measure",
            900.0,
            "FP32 model: measuring for comparison",
            fmt=s.fmt,
            model=str(s.src),
            data=s.arrays.eval,
            out_dir=str(folder),
            variants=[variant],
            fixed_batch=s.fixed_batch,
        )
        lat = None
        if chosen.model:
            lat = s._call(
                "time_models",
                300.0,
                "FP32 model and the chosen INT8: timing side by side",
                fmt=s.fmt,
                models=[{"path": str(s.src), **variant}, {"path": chosen.model, "float_precision": chosen.float_precision, "static": chosen.engine_batch == 1}],
                sample=s.arrays.eval,
                fixed_batch=s.fixed_batch,
            )
    except (WorkerCrashed, WorkerTimeout, WorkerFailed) as exc:
        note(f"the FP32 model could not be measured for comparison ({exc})")
        return None
    outs = _load_npz(res["variants"][0]["outputs"])
    m = s.ev.measure_outputs(outs)
    drop = s.ev.drop_pp(m) if s.classifier else None
    verdict, interval = s.target.verdict(m, s.classifier, drop)
    shape = (s.fixed_batch or (1 if variant["static"] else "dynamic")) if s.fmt == "openvino" else None
    return Row(
        0,
        "float reference",
        Int8Config(),
        variant["float_precision"],
        "reference",
        metrics=m,
        latency_ms=lat[0] if lat else None,
        drop_pp=drop,
        engine_batch=shape,
        paired_ms=lat[1] if lat else None,
        float_share=1.0,
        verdict=verdict,
        interval=interval,
        divergence=divergence(s.ev.ref_outputs, outs, s.classifier),
    )


def _sound(rows: list[Row]) -> list[Row]:
    """The rows whose outputs are not broken: error (1 - min cosine to FP32) at most BROKEN_ERROR_RATIO times the
    smallest error among ``rows``, or within BROKEN_MIN_GAP of it.  For a random-weight preset agreement means nothing, but
    cosine still tells INT8 noise (every variant of a candidate alike) from an engine that computes something else: e.g.
    OpenVINO's static-shape f32 engine of a token-merged INT8 ViT-S (cosine 0.61 where its siblings had 0.99)."""
    if not rows:
        return rows
    best_err = min(1.0 - min_cosine(r.metrics) for r in rows)
    limit = max(BROKEN_ERROR_RATIO * best_err, best_err + BROKEN_MIN_GAP)
    return [r for r in rows if 1.0 - min_cosine(r.metrics) <= limit]


def add_attention(path_json: Path, path_md: Path, maps: dict) -> None:
    """Add where the written (chosen) candidate looks against the FP32 model to the table (``maps``: the quantize front
    door's attention comparison)."""
    info = json.loads(path_json.read_text())
    info["attention"] = maps
    path_json.write_text(json.dumps(json_safe(info), indent=2) + "\n")
    lines = ["", "## Where the chosen candidate looks", ""]
    if not maps.get("available", True):
        lines.append(f"Attention maps not compared: {maps['reason']}.")
    else:
        c, t = maps["correlation"], maps["top10_overlap"]
        lines += [
            f"Attention rollout of the written file against the FP32 model on {maps['images']} held-out images at {maps['size']}:",
            "",
            "| | median | mean | min |",
            "|---|---:|---:|---:|",
            f"| Pearson correlation of the maps | {c['median']:.4f} | {c['mean']:.4f} | {c['min']:.4f} |",
            f"| top-10 % patches shared | {100 * t['median']:.0f} % | {100 * t['mean']:.0f} % | {100 * t['min']:.0f} % |",
        ]
    with open(path_md, "a") as f:
        f.write("\n".join(lines) + "\n")


def _ray_batch(b: dict) -> str:
    return f"{b['items']} items in {b['seconds']:.0f} s on {len(b['nodes'])} node(s)"


def _per_size_lines(result: FidelityResult) -> list[str]:
    """A dynamic-size model: the chosen candidate at each input size (the target holds at every one)."""
    per = result.chosen.metrics.get("per_size")
    if not per:
        return []
    lines = [
        "",
        "## The chosen candidate at each input size",
        "",
        "Every held-out image is measured at each size; the target must hold at every size (the table above shows the worst).",
        "",
        "| size (HxW) | top-1 agreement | top-1 FP32 | top-1 INT8 | min cosine |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, m in per.items():
        agree = "" if m.get("top1_agreement") is None else f"{100 * m['top1_agreement']:.1f}%"
        acc = [f"{100 * m[k]:.1f}%" if k in m else "" for k in ("top1_fp32", "top1")]
        lines.append(f"| {key} | {agree} | {acc[0]} | {acc[1]} | {m['cosine_min']:.5f} |")
    return lines


def write_table(result: FidelityResult, path_json: Path, path_md: Path, *, model: str, backend: str, eval_source: str, images: int) -> None:
    """Every candidate's numbers and the ranking, as JSON and Markdown, next to the artifact."""
    rows = [r.to_dict() for r in result.rows]
    info = {
        "model": model,
        "backend": backend,
        "target": {
            "agreement": result.target.agreement,
            "cosine": result.target.cosine,
            "max_drop": result.target.max_drop,
            "metric": result.target.describe(result.classifier),
        },
        "measured_on": eval_source,
        "images": images,
        "met": result.met,
        "chosen_candidate": result.chosen.no,
        "chosen_float_precision": result.chosen.float_precision,
        "chosen_verdict": result.chosen.verdict,
        "seconds": round(result.seconds, 1),
        "candidates": rows,
        "ranking": result.ranking,
        "settings": result.settings,
        "phases_s": result.phases,
        "ray": result.ray,
        "float_reference": result.reference.to_dict() if result.reference else None,
        "speedup_vs_float": result.speedup_vs_float,
        "max_float_mac_share": MAX_FLOAT_SHARE,
        "summary": result.summary(),
    }
    path_json.write_text(json.dumps(json_safe(info), indent=2) + "\n")
    lines = [
        f"# INT8 fidelity search: {model} ({backend})",
        "",
        (
            f"- target: {result.target.describe(result.classifier)}; measured on {eval_source} ({images} images); "
            f"agreement intervals are {100 * CI_LEVEL:.0f} % Wilson intervals"
        ),
        f"- result: {result.summary()}",
        *([f"- time: {', '.join(f'{k} {v:.0f} s' for k, v in result.phases.items())}"] if result.phases else []),
        *([f"- on Ray: {', '.join(_ray_batch(b) for b in result.ray)}"] if result.ray else []),
        "",
        (
            "| # | step | configuration | float MACs | float parts | engine batch | status | verdict | top-1 agreement | drop pp | min cosine "
            "| divergence | latency ms (batch 1) | seconds |"
        ),
        "|---:|---|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows + ([result.reference] if result.reference else []):
        chosen = " **(chosen)**" if r is result.chosen else ""
        agree = "" if r.metrics.get("top1_agreement") is None else f"{100 * r.metrics['top1_agreement']:.1f}%"
        if r.interval is not None:
            agree += f" [{100 * r.interval[0]:.1f}, {100 * r.interval[1]:.1f}]"
        cos = f"{min_cosine(r.metrics):.5f}" if r.metrics else ""
        lat = "" if r.latency_ms is None else f"{r.latency_ms:.2f}"
        drop = "" if r.drop_pp is None else f"{r.drop_pp:+.2f}"
        div = "" if r.divergence is None else f"{r.divergence:.3g}"
        share = "" if r.float_share is None else f"{100 * r.float_share:.1f}%"
        status = r.status + (f": {r.error}" if r.error else "")
        shape = "" if r.engine_batch is None else ("dynamic" if r.engine_batch == "dynamic" else f"static {r.engine_batch}")
        lines.append(
            f"| {r.no if r.status != 'reference' else '-'}{chosen} | {r.step} | {r.describe()} | {share} | {r.float_precision or ''} | "
            f"{shape} | {status} | {r.verdict or ''} | {agree} | {drop} | {cos} | {div} | {lat} | {r.seconds:.0f} |"
        )
    lines += _per_size_lines(result)
    if result.ranking:
        lines += [
            "",
            "## Ranking: what keeping each group in float buys",
            "",
            (
                f"Divergence from FP32 on {RANK_IMAGES} calibration images (mean KL of class probabilities, or mean 1 - cosine); "
                f"the default candidate's: {result.ranking[0].get('base_divergence', float('nan')):.4g}."
            ),
            "",
            "Whole blocks first; then the parts of the blocks that gained most (a block whose parts were scored is reverted through them).",
            "",
            "| group | share of MACs | divergence with it in float | gain |",
            "|---|---:|---:|---:|",
        ]
        for g in sorted(result.ranking, key=lambda g: -(g.get("gain") or -1e9)):
            gain = "" if g.get("gain") is None else f"{g['gain']:.4g}"
            d = "" if g.get("divergence") is None else f"{g['divergence']:.4g}"
            lines.append(f"| {g['group']} | {100 * g['share']:.2f}% | {d or g.get('error', '')} | {gain} |")
    if result.settings:
        lines += [
            "",
            "## Whole-model settings, each quantized on a calibration subset",
            "",
            "| setting | status | divergence on the ranking images |",
            "|---|---|---:|",
        ]
        for name, v in result.settings.items():
            d = "" if v.get("divergence") is None else f"{v['divergence']:.4g}"
            lines.append(f"| {name} | {v['status'] + (': ' + v['error'] if v.get('error') else '')} | {d} |")
    ref = result.reference
    if ref is not None and ref.paired_ms:
        lines += [
            "",
            (
                f"Float reference and the chosen INT8 candidate timed side by side (interleaved, one process): "
                f"{ref.latency_ms:.2f} ms vs {ref.paired_ms:.2f} ms (what `--auto` compares)."
            ),
        ]
    lines += [
        "",
        (
            "Latency: median of batch-1 runs in the search's worker process; candidates that met the target were timed again "
            "side by side before one was chosen. Compare rows, not machines."
        ),
        "Agreement with FP32 is measured on held-out images the calibration never saw; the search stopped on them too, so",
        "confirm on fresh images with `vitedge validate --val DIR`.",
    ]
    path_md.write_text("\n".join(lines) + "\n")


def copy_chosen(result: FidelityResult, dest: Path, fmt: str) -> list[str]:
    """Move the chosen candidate's files to ``dest`` (an .xml/.onnx path in the scratch folder); returns their names."""
    src = result.artifact
    if src is None:
        raise VitedgeError("the INT8 search kept no model file")
    names = []
    shutil.move(str(src), dest)
    names.append(dest.name)
    if fmt == "openvino":
        shutil.move(str(src.with_suffix(".bin")), dest.with_suffix(".bin"))
        names.append(dest.with_suffix(".bin").name)
    else:  # external data (models over 1.8 GB) was saved under the artifact's final name already
        data = src.parent / f"{dest.name}.data"
        if data.exists():
            shutil.move(str(data), dest.parent / data.name)
            names.append(data.name)
    return names


def kept_float(result: FidelityResult) -> list[str]:
    p = result.artifact.parent / "float_ops.json" if result.artifact else None
    return json.loads(p.read_text()) if p is not None and p.exists() else []
