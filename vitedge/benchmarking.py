"""`vitedge benchmark`: every backend x precision this machine can run, built, validated and ranked.

For one model: export the FP32 ONNX, build each candidate engine with ``vitedge quantize`` and
``vitedge compile`` (ONNX Runtime FP32/FP16/INT8, OpenVINO FP32/FP16/BF16/INT8, TensorRT FP16/INT8
where present), then validate all of them *in one run* against PyTorch eager FP32 (the same
weights), so the speed-ups are ratios measured side by side.  Candidates that cannot be built on
this machine are listed with the reason, never faked.  The result is ranked by batch-1 latency,
the Pareto front (latency vs accuracy drop) is marked, and the fastest engine within the accuracy
budget is recommended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends import registry
from .backends.openvino import (
    cpu_has_bf16,  # OpenVINO's own answer on BF16, not the CPU flags
)
from .compare import top1_loss
from .compilation import compile_model
from .errors import VitedgeError
from .export import export_onnx
from .models.loading import ModelSpec, load_model
from .options import ENGINE_PRECISIONS, Target
from .quantization import FidelityNotMet, quantize
from .report import Report
from .sysinfo import machine_info, print_machine
from .ui import err_console, note
from .validation import EngineSpec, validate


@dataclass
class Candidate:
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


def candidates(backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None) -> list[Candidate]:
    chosen = [registry.get(b, "benchmark") for b in backends] if backends else registry.backends("benchmark")
    precisions = [p.lower() for p in (precisions or ENGINE_PRECISIONS)]
    for p in precisions:
        if p not in ENGINE_PRECISIONS:
            raise VitedgeError(f"unknown precision {p!r}", f"choose from {', '.join(ENGINE_PRECISIONS)}")
    return [Candidate(b.name, p) for b in chosen for p in precisions if p in b.benchmark]


def _unavailable(c: Candidate, machine: dict) -> str | None:
    """Why a candidate cannot be built here (None: try it)."""
    backend = registry.get(c.backend)
    reason = backend.unavailable()
    if reason:
        return reason
    if backend.benchmark.get(c.precision) == "bf16":
        if not cpu_has_bf16():
            return f"OpenVINO does not compute BF16 on this CPU (no AVX-512 BF16/AMX): {c.backend} would silently compute in FP32"
    return None


def _build(c: Candidate, fp32_onnx: Path, folder: Path, calib, calib_samples, seed: int):
    """Build one candidate; returns an EngineSpec (raises VitedgeError with the reason otherwise)."""
    backend = registry.get(c.backend)
    stem = f"{c.backend}-{c.precision}"
    if c.precision in ("fp32", "bf16"):
        src = fp32_onnx
    else:
        try:
            src, _ = quantize(
                fp32_onnx,
                folder / f"quant-{stem}{backend.quantized_suffix}",
                precision=c.precision,
                backend=c.backend,
                calib=calib if c.precision == "int8" else None,
                samples=calib_samples,
                seed=seed,
            )
        except FidelityNotMet as exc:  # measured and ranked anyway: the report shows how far it is from the target
            note(f"{c.name}: {exc}")
            assert exc.output is not None  # FidelityNotMet names the file it wrote
            src = exc.output
    assert backend.engine_suffix is not None  # a benchmarked backend compiles, and the registry gives every compiler a suffix
    out = folder / (stem + backend.engine_suffix)
    # FP32 means FP32: OpenVINO would otherwise compute in bf16 on CPUs with AVX-512 BF16/AMX
    path, _ = compile_model(src, out, target=c.backend, precision_hint=backend.benchmark.get(c.precision))
    return EngineSpec(path, c.backend, name=c.name, precision=c.precision)


def _drop_value(m: dict, labelled: bool, strict: bool) -> float:
    """Top-1 points lost vs the reference (:func:`vitedge.compare.top1_loss`); ``strict``: the upper end of its interval."""
    value, ci = top1_loss(m["vs_reference"], labelled)
    return ci[1] if strict else value


#: a float engine (BF16/FP16/FP32) within this factor of the fastest INT8 engine's latency is preferred when
#: it is more faithful: INT8 that buys no speed is not worth its flips
FLOAT_PREFERRED_WITHIN = 1.05


def meets_target(m: dict, target=None) -> bool:
    """The INT8 fidelity target, applied to every engine: top-1 agreement (classifiers) or min cosine vs the reference."""
    vs = m["vs_reference"]
    return (target or Target()).check(vs, classifier=vs.get("top1_agreement") is not None, drop_pp=None)


def _faithfulness(m: dict) -> tuple:
    vs = m["vs_reference"]
    return (vs.get("top1_agreement") or 0.0, vs.get("cosine_min") or 0.0)


def choose(within: list[dict]) -> tuple[str | None, str | None]:
    """The engine to recommend among those meeting the target (sorted fastest first), and why, when it is not simply the fastest.

    Precision is chosen on the target: where a float engine (BF16 on CPUs with AVX-512 BF16/AMX, FP16, FP32)
    runs within 5 % of the fastest INT8 engine and is more faithful, it is the better deal.
    """
    if not within:
        return None, None
    fastest = within[0]
    if fastest.get("precision") != "int8":
        return fastest["name"], None
    lat = fastest["latency"]["p50_ms"]
    floats = [
        m
        for m in within[1:]
        if m.get("precision") != "int8" and m["latency"]["p50_ms"] <= lat * FLOAT_PREFERRED_WITHIN and _faithfulness(m) > _faithfulness(fastest)
    ]
    if not floats:
        return fastest["name"], None
    f = floats[0]
    slower = 100.0 * (f["latency"]["p50_ms"] / lat - 1)
    return f["name"], (
        f"as fast as {fastest['name']} on this CPU ({slower:+.1f} % latency) and more faithful "
        f"(agreement {_pct(f)} vs {_pct(fastest)}), so INT8 buys nothing here"
    )


def _pct(m: dict) -> str:
    a = m["vs_reference"].get("top1_agreement")
    return f"{100 * a:.2f}%" if a is not None else f"cosine min {m['vs_reference']['cosine_min']:.5f}"


def rank(report: Report, max_drop: float | None, strict: bool = False, fidelity: bool = True) -> None:
    """Add ranking (by batch-1 p50), Pareto front and recommendation to a report, in place."""
    engines = report.engines
    labelled = report.labelled
    by_speed = sorted(engines, key=lambda m: m["latency"]["p50_ms"])
    pts = {m["name"]: (m["latency"]["p50_ms"], _drop_value(m, labelled, strict)) for m in engines}
    front = []
    for m in by_speed:
        lat, drop = pts[m["name"]]
        dominated = any(o != m["name"] and ol <= lat and od <= drop and (ol < lat or od < drop) for o, (ol, od) in pts.items())
        if not dominated:
            front.append(m["name"])
    within = [m for m in by_speed if (max_drop is None or pts[m["name"]][1] <= max_drop) and (not fidelity or meets_target(m))]
    rec, why = choose(within)
    report.data["findings"] = [f for f in report.data["findings"] if not f.startswith(("recommended:", "no engine is"))]  # idempotent
    report.data["ranking"] = [m["name"] for m in by_speed]
    report.data["pareto"] = front
    report.data["recommended"] = rec
    budget = (
        " and ".join(
            ([] if not fidelity else ["meeting the fidelity target"])
            + ([] if max_drop is None else [f"within {max_drop:g} pp top-1 {'drop' if labelled else 'disagreement'}"])
        )
        or "(no accuracy budget: random weights)"
    )
    if rec:
        r = next(m for m in engines if m["name"] == rec)
        speed = f"{r['speedup']:.2f}x over {report.reference['name']}" if r["speedup"] is not None else "speed-up not measurable"
        report.data["findings"].append(
            f"recommended: {rec} — {why or 'fastest ' + budget}: p50 {r['latency']['p50_ms']:.3f} ms, {speed}, cosine {r['vs_reference']['cosine_mean']:.5f}."
        )
    else:
        report.data["findings"].append(f"no engine is {budget}; loosen --max-drop or check the INT8 calibration.")


def benchmark(
    model,
    *,
    calib=None,
    data=None,
    out_dir: str | Path = "vitedge-benchmark",
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    max_drop: float | None = 1.0,
    strict: bool = False,
    img_size: int | None = None,
    samples: int | None = None,
    calib_samples: int | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    time_budget: float = 5.0,
    rounds: int = 3,
    runs: int | None = None,
    min_runs: int = 20,
    warmup: int = 5,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Build and validate every backend x precision available here; returns the ranked report.

    ``model``: checkpoint / preset / ``"reference"`` / :class:`~vitedge.ModelSpec` (PyTorch eager is
    the baseline) or an FP32 ``.onnx`` file (ONNX Runtime FP32 is the baseline).  ``calib``:
    calibration images for INT8.  ``data``: validation images (``class/image`` folders give
    top-1/top-5).  ``max_drop``: the accuracy budget (pp) for the recommendation — engines over it
    are reported, not dropped.  Artifacts go to ``out_dir/artifacts``, reports to ``out_dir``.
    """
    say = log or (lambda msg: err_console.print(msg, highlight=False, soft_wrap=True))
    cands = candidates(backends, precisions)
    out_dir = Path(out_dir)
    art = out_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    machine = print_machine(machine_info())

    reference: str | ModelSpec
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        fp32 = Path(model)
        reference, load_s = str(fp32), None
    else:
        if img_size and isinstance(model, ModelSpec):
            raise VitedgeError("img_size cannot change a ModelSpec given in memory", "load it with img_size, or pass the name")
        t_load = time.perf_counter()
        spec = model if isinstance(model, ModelSpec) else load_model(model, img_size=img_size)
        load_s = 0.0 if isinstance(model, ModelSpec) else time.perf_counter() - t_load
        fp32 = art / "fp32.onnx"
        t0 = time.perf_counter()
        export_onnx(spec, fp32)
        say(f"exported {fp32} ({time.perf_counter() - t0:.1f} s)")
        reference = spec

    specs, skipped = [], []
    for c in cands:
        reason = _unavailable(c, machine)
        if reason:
            skipped.append({"name": c.name, "reason": reason})
            note(f"skipped {c.name}: {reason}")
            continue
        t0 = time.perf_counter()
        try:
            specs.append(_build(c, fp32, art, calib, calib_samples, seed))
            say(f"built {c.name} ({time.perf_counter() - t0:.1f} s)")
        except VitedgeError as exc:
            skipped.append({"name": c.name, "reason": str(exc)})
            note(f"skipped {c.name}: {exc}")
        except ImportError as exc:
            skipped.append({"name": c.name, "reason": f"missing module: {exc}"})
            note(f"skipped {c.name}: missing module: {exc}")
    if not specs:
        raise VitedgeError("no engine could be built on this machine", "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)[:300])

    def post(rep: Report) -> None:
        rep.data["kind"] = "benchmark"
        if load_s:
            rep.reference["load_s"] = load_s
        rep.data["skipped"] = skipped
        rep.data["settings"]["benchmark"] = {
            "model": str(getattr(reference, "source", reference)),
            "calib": str(calib) if calib else None,
            "max_drop_budget_pp": max_drop,
            "strict": strict,
            "candidates": [c.name for c in cands],
        }
        # a random-weight preset has no predictions worth keeping: no fidelity target, only --max-drop if given
        rank(rep, max_drop, strict, fidelity=not str(getattr(reference, "source", "")).startswith("preset:"))

    return validate(
        specs,
        reference,
        data=data,
        out_dir=out_dir,
        batch_sizes=batch_sizes,
        runs=runs,
        samples=samples,
        seed=seed,
        time_budget=time_budget,
        rounds=rounds,
        warmup=warmup,
        min_runs=min_runs,
        kind="benchmark",
        post=post,
    )
