"""What one dynamic-size engine costs against fixed-size engines, size by size.

    python benchmarks/resolution.py                              # vit_small, 224 288 384 448 240x320, both CPU backends
    python benchmarks/resolution.py --model vit_tiny --sizes 224,240x320 --rounds 2 --seconds 0.2 -o /tmp/res.md   # a smoke run

The model is exported once with ``--dynamic-size`` (bounds: the smallest and largest side asked for, and the model's own size) and once
per size at that fixed size (a non-square size is exported with that input shape).  Every export is compiled
by ``vitedge compile`` for each backend (batch 1, latency hint, the device's default precision) and verified
there as usual.  Per size and backend, the fixed engine and the dynamic one run the same random batch-1
input, interleaved in rounds (:func:`vitedge.timing.interleaved`); the cost of the dynamic engine is the median
of the per-round ratios dynamic / fixed (:func:`vitedge.timing.paired_speedup`), so load changes during the
run hit both alike.  The outputs of the two engines are compared too (they compute the same thing: the
dynamic graph interpolates the position table in the graph, the fixed one at export).

Random weights are fine for latency.  Writes a Markdown table (``-o``, default ``benchmarks/resolution.md``);
publish numbers only from a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vitedge import compare, compile_model, export_onnx, load  # noqa: E402
from vitedge.models.loading import load_model  # noqa: E402
from vitedge.options import parse_size  # noqa: E402
from vitedge.sysinfo import machine_summary  # noqa: E402
from vitedge.timing import Slot, interleaved, paired_speedup  # noqa: E402

DEFAULT_SIZES = "224,288,384,448,240x320"
BUDGET = 0.10  # the bar: the dynamic engine costs at most 10 % at any size
HEADER = (
    "| backend | size (HxW) | fixed-size engine (ms) | dynamic-size engine (ms) | dynamic costs (per-round ratios: median, IQR) | within 10 % | output cosine |"
)


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    return [s for s in sizes if s is not None]


def _engines(spec, folder: Path, sizes: list[tuple[int, int]], backends: list[str]) -> tuple[dict, dict]:
    """The dynamic-size engine per backend, and the fixed-size engine per (size, backend)."""
    p = spec.config.patch_size
    target = min(spec.preprocessing.img_size)  # the bounds must hold the model's own size
    lo, hi = min(target, *(min(s) for s in sizes)), max(target, *(max(s) for s in sizes))
    dyn_onnx = folder / "dynamic.onnx"
    export_onnx(spec, dyn_onnx, dynamic_size=True, min_size=lo // p * p, max_size=-(-hi // p) * p, images=[])
    dynamic = {be: compile_model(dyn_onnx, folder / f"dynamic.{be}{_suffix(be)}", target=be).path for be in backends}
    fixed = {}
    for h, w in sizes:
        onnx = folder / f"fixed_{h}x{w}.onnx"
        export_onnx(replace(spec, preprocessing=spec.preprocessing.at(h, w)), onnx, images=[])
        for be in backends:
            fixed[(h, w), be] = compile_model(onnx, folder / f"fixed_{h}x{w}.{be}{_suffix(be)}", target=be).path
    return dynamic, fixed


def _suffix(backend: str) -> str:
    return ".xml" if backend == "openvino" else ".onnx"


def measure(spec, sizes: list[tuple[int, int]], backends: list[str], rounds: int, seconds: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitedge-resolution-") as tmp:
        dynamic, fixed = _engines(spec, Path(tmp), sizes, backends)
        for be in backends:
            with load(dynamic[be]) as dyn:
                for h, w in sizes:
                    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
                    with load(fixed[(h, w), be]) as fix:
                        agree = compare.output_metrics(fix.infer(x), dyn.infer(x))
                        times = interleaved(
                            [lambda e=fix, x=x: e.infer(x), lambda e=dyn, x=x: e.infer(x)], rounds, Slot(seconds, 3), warmup=Slot(0.0, 3, 3), pause_s=0.05
                        )
                    ratio = paired_speedup(times[1], times[0])  # reference = dynamic: "speed-up" = dynamic time / fixed time
                    rows.append(
                        {
                            "backend": be,
                            "size": f"{h}x{w}",
                            "fixed_ms": float(np.median([t for r in times[0] for t in r])),
                            "dynamic_ms": float(np.median([t for r in times[1] for t in r])),
                            "cost": ratio["speedup"] - 1.0,
                            "cost_iqr": [v - 1.0 for v in ratio["ratio_iqr"]],
                            "cosine": agree["cosine_min"],
                        }
                    )
                    print(
                        f"{be:12s} {h}x{w}: fixed {rows[-1]['fixed_ms']:.2f} ms, dynamic {rows[-1]['dynamic_ms']:.2f} ms, cost {100 * rows[-1]['cost']:+.1f} %"
                    )
    return rows


def markdown(rows: list[dict], model: str, rounds: int, seconds: float, load: tuple) -> str:
    lines = [
        "# One dynamic-size engine vs fixed-size engines: latency by input size",
        "",
        f"Made by `python benchmarks/resolution.py` (model {model}, batch 1, {rounds} interleaved rounds of {seconds:g} s per engine).",
        f"Machine: {machine_summary()}.",
        f"Load average (1 min) before and after: {load[0]:.2f} and {load[1]:.2f}; nothing else ran.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['size']} | {r['fixed_ms']:.2f} | {r['dynamic_ms']:.2f} | {100 * r['cost']:+.1f} % "
            f"({100 * r['cost_iqr'][0]:+.1f} to {100 * r['cost_iqr'][1]:+.1f}) | {'yes' if r['cost'] <= BUDGET else 'no'} | {r['cosine']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small", help="preset, checkpoint or model folder (default vit_small, random weights)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated sizes, N or HxW (default {DEFAULT_SIZES})")
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per engine per round")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "resolution.md")
    args = ap.parse_args(argv)
    spec = load_model(args.model)
    print(f"{machine_summary()}\nload average before: {os.getloadavg()[0]:.2f}")
    before = os.getloadavg()[0]
    rows = measure(spec, _sizes(args.sizes), [b for b in args.backends.split(",") if b], args.rounds, args.seconds)
    after = os.getloadavg()[0]
    print(f"load average after: {after:.2f}")
    args.output.write_text(markdown(rows, args.model, args.rounds, args.seconds, (before, after)))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
