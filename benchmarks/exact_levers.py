"""Issue 15's exact levers in ``vitedge export``, each on and off, timed interleaved in one run.

Both are on by default and verified against the full PyTorch model by ``vitedge export``:

1. **CLS-only last block** (``cls_only_last_block``): a classifier reads the CLS token only, so the last
   block's query, attention output projection, MLP and the final norm run for that token alone.
2. **Split Q/K/V** (``split_qkv``): the fused qkv projection is exported as three projections, each reshaped
   to heads on its own, so a runtime sees the plain Transpose-MatMul-Softmax-MatMul attention pattern
   instead of a 5-D permute and gathers.

This times batch-1 engines built from three exports of the same weights (plain; lever 1; levers 1 + 2;
random-weight presets: speed does not depend on the weights), all engines of one kind back to back in
every round (order alternating), and reports the median of the per-round ratios to the plain export.

    python benchmarks/exact_levers.py --models vit_small,vit_base       # writes benchmarks/exact_levers.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from ablation import settle  # noqa: E402


VARIANTS = (("plain export", "plain", False, False), ("CLS-only last block", "cls", True, False),
            ("CLS-only + split Q/K/V (default)", "cls_split", True, True))


def build(model: str, work: Path, calib: Path) -> dict[str, dict[str, Path]]:
    """{variant: {engine kind: path}}."""
    from vitedge import export_onnx, load_model
    from vitedge.backends.openvino import default_precision_hint
    from vitedge.compilation import compile_model
    from vitedge.quantization import quantize

    spec = load_model(model)
    out: dict[str, dict[str, Path]] = {}
    for variant, folder, cls_only, split in VARIANTS:
        d = work / model / folder
        d.mkdir(parents=True, exist_ok=True)
        onnx, _ = export_onnx(spec, d / "fp32.onnx", images=[], cls_only_last_block=cls_only, split_qkv=split)
        q, _ = quantize(onnx, d / "int8.xml", backend="openvino", calib=calib, samples=32, search_budget=0)
        out[variant] = {
            "onnxruntime fp32": compile_model(onnx, d / "ort.onnx", target="onnxruntime")[0],
            "openvino fp32 (device default)": compile_model(onnx, d / "ov.xml", target="openvino", batch=1)[0],
            # one engine configuration for every graph (static batch 1, the CPU's default float precision for
            # INT8), so that only the graph differs between the columns
            "openvino int8": compile_model(q, d / "ov.int8.xml", target="openvino", batch=1,
                                           precision_hint=default_precision_hint("int8"))[0],
        }
    return out


def time_interleaved(paths: list[Path], rounds: int, seconds: float) -> tuple[list[float], list[float]]:
    """Median batch-1 latency (ms) of each engine (the median of its per-round medians), and the median over rounds
    of (first engine / engine) (``vitedge.timing.paired_speedup``).  Timed with ``vitedge.timing.interleaved``:
    10 warm-up runs each, then per round every engine in turn (reverse order every other round) after a 0.2 s
    pause and one untimed run, for its share of ``seconds`` and at least 5 runs."""
    from vitedge import load
    from vitedge.timing import Slot, interleaved, paired_speedup

    engines = [load(p) for p in paths]
    try:
        x = np.random.default_rng(0).standard_normal((1, *engines[0].input_shape[1:])).astype(np.float32)
        fns = [(lambda e=e: e.infer(x)) for e in engines]
        per_engine = interleaved(fns, rounds, Slot(seconds / rounds / len(engines), 5, None), warmup=Slot(0.0, 10, 10),
                                 alternate=True, wake=True, pause_s=0.2)
    finally:
        for e in engines:
            e.close()
    medians = [statistics.median(statistics.median(r) for r in v) for v in per_engine]
    ratios = [paired_speedup(per_engine[0], v)["speedup"] for v in per_engine]
    return medians, ratios


def main(argv=None) -> int:
    from vitedge.data import SHIPPED_CALIBRATION
    from vitedge.sysinfo import isa_summary, print_machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_small,vit_base")
    ap.add_argument("--work", type=Path, default=HERE / "runs" / "exact_levers")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=15.0, help="timing seconds per group of engines")
    ap.add_argument("--out", type=Path, default=HERE / "exact_levers.md")
    args = ap.parse_args(argv)
    machine = print_machine()
    calib = SHIPPED_CALIBRATION / "digits" / "calib"  # any real images: speed does not depend on them
    built = {model: build(model, args.work, calib) for model in args.models.split(",")}
    settle((machine.get("usable_cores") or 1) / 2)
    load_start = os.getloadavg()
    print(f"load average before timing: {load_start}", file=sys.stderr)
    rows = []
    for model, engines in built.items():
        for kind in engines[VARIANTS[0][0]]:
            med, ratio = time_interleaved([engines[v[0]][kind] for v in VARIANTS], args.rounds, args.seconds)
            rows.append((model, kind, med, ratio))
            print(f"{model} {kind}: " + ", ".join(f"{v[0]} {m:.2f} ms ({r:.3f}x)" for v, m, r in zip(VARIANTS, med, ratio)), file=sys.stderr)
    load_end = os.getloadavg()
    print(f"load average after timing: {load_end}", file=sys.stderr)
    busy = max(load_start[0], load_end[0]) > (machine.get("usable_cores") or 1)
    lines = ["# Exact export levers: on vs off (batch 1, interleaved, one run)", "",
             f"Generated by `python benchmarks/exact_levers.py --models {args.models}` on {time.strftime('%Y-%m-%d')}. "
             f"CPU: {machine.get('cpu')}; ISA: {isa_summary(machine)}; {machine.get('usable_cores')} cores; load average "
             f"{[round(v, 2) for v in load_start]} before timing, {[round(v, 2) for v in load_end]} after"
             + (" **(busy machine: re-run quietly)**" if busy else "") + ". Random-weight presets at 224 px (197 tokens).", "",
             "| model | engine | " + " | ".join(f"{v[0]} p50 ms (speed-up)" for v in VARIANTS) + " |",
             "|---|---|" + "---:|" * len(VARIANTS)]
    lines += [f"| {m} | {k} | " + " | ".join(f"{a:.2f} ({r:.3f}x)" for a, r in zip(med, ratio)) + " |" for m, k, med, ratio in rows]
    lines += ["", "Speed-up: the median over rounds of (plain export latency / this latency), each round timing every engine "
              "of the row back to back; it is the column to read.  The p50 columns pool all rounds, so on a host whose speed "
              "drifts during the run they can disagree with it.  Exact: every file is verified against the full PyTorch "
              "model by `vitedge export`.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
