#!/usr/bin/env python
"""Speed-up of every vitedge engine over PyTorch eager FP32, measured in one run per model.

    python benchmarks/run_benchmarks.py                       # reference, vit_small, vit_base (long)
    python benchmarks/run_benchmarks.py --models reference    # only the shipped digits ViT
    python benchmarks/run_benchmarks.py --quick               # short timing budgets, fewer images

For each model this runs ``vitedge.benchmarking.benchmark``: export, build every backend x precision
available on this machine (ONNX Runtime FP32/FP16/INT8, OpenVINO FP32/FP16/BF16/INT8, TensorRT where
present), validate them all against PyTorch eager FP32 in the same process with interleaved timing
rounds, and rank them.  The presets run at 224x224, batch 1.  It prints the CPU's instruction sets
and writes a markdown table (each engine's p50/p99 latency, speed-up over PyTorch eager FP32 and
accuracy against FP32, plus the machine) to ``benchmarks/results.md``; the full report of each model
(report.json/md/html) goes to ``--work``/<model>/.

Presets have random weights: their "accuracy" columns are agreement with the FP32 model on real
images (fidelity), not accuracy.  The reference model is trained, so its column is a real top-1 drop.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "calibration_data" / "digits" / "calib"
VAL = ROOT / "calibration_data" / "digits" / "val"

MODELS = {
    # name: (model, img_size, validation samples full/quick)
    "reference": ("reference", None, (None, 120)),
    "vit_small": ("vit_small", 224, (120, 32)),
    "vit_base": ("vit_base", 224, (120, 32)),
}


def _budget(model: str) -> float | None:
    """Accuracy budget (pp) for the recommendation: 1 pp on the trained reference model; none for
    random-weight presets, whose near-flat logits make top-1 agreement a poor yardstick (see the cosine column)."""
    return 1.0 if model == "reference" else None


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def results_table(name: str, rep, img: str) -> list[str]:
    from vitedge.report import speedup_text

    ref = rep.reference
    lab = rep.labelled
    lines = [f"### {name} ({img}, batch 1)", "",
             f"| engine | p50 ms | p99 ms | speed-up vs PyTorch eager FP32 | {'top-1 drop pp (95% CI)' if lab else 'top-1 agreement with FP32'} | logit cosine |",
             "|---|---:|---:|---:|---:|---:|",
             f"| PyTorch eager FP32 ({ref['options'].get('threads', '?')} threads) | {_fmt_ms(ref['latency']['p50_ms'])} | "
             f"{_fmt_ms(ref['latency']['p99_ms'])} | 1.00x | {'top-1 %.2f %%' % (100 * ref['accuracy']['top1']) if lab else '–'} | 1 |"]
    rec = rep.data.get("recommended")
    for n in rep.data.get("ranking", []):
        e = rep.engine(n)
        vs = e["vs_reference"]
        acc = (f"{vs['top1_drop_pp']:+.2f} [{vs['top1_drop_ci95_pp'][0]:+.2f}, {vs['top1_drop_ci95_pp'][1]:+.2f}]" if lab
               else f"{100 * vs['top1_agreement']:.1f} %")
        label = f"**{n}**" if n == rec else n
        lines.append(f"| {label} | {_fmt_ms(e['latency']['p50_ms'])} | {_fmt_ms(e['latency']['p99_ms'])} | "
                     f"{speedup_text(e)} | {acc} | {vs['cosine_mean']:.5f} |")
    for s in rep.data.get("skipped", []):
        lines.append(f"| {s['name']} | – | – | – | not run: {s['reason'].split(';')[0][:90]} | – |")
    lines.append("")
    for f in rep.data.get("findings", []):
        if f.startswith(("INT8", "recommended")) or "INT8 does not pay off" in f or "actually ran" in f:
            lines.append(f"- {f}")
    lines.append("")
    return lines


def _write(args, info, done: list[str], budget: float, load_before, sections: list[str], after=None) -> None:
    from vitedge.sysinfo import machine_info, machine_summary

    after = after or machine_info().get("load_average")
    v = info["versions"]
    head = [
        "# vitedge benchmark results", "",
        f"Measured {_dt.date.today().isoformat()} with `python benchmarks/run_benchmarks.py --models {','.join(done)}"
        f"{' --quick' if args.quick else ''}{f' --time-budget {args.time_budget:g}' if args.time_budget else ''}`.", "",
        f"- machine: {machine_summary(info)}",
        f"- software: torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, openvino {v.get('openvino')}, nncf {v.get('nncf')}, "
        f"Python {v.get('python')}",
        f"- method: every engine and PyTorch eager FP32 are timed in one process, in 3 interleaved rounds after warm-up, "
        f"{budget:g} s per engine (extended up to 2x until the median is stable); batch 1; speed-up = the median over rounds of (eager latency / engine latency) within the round (paired: a drift in the host's speed cancels in each ratio).",
        f"- load average before/after: {load_before} / {after} (on a shared machine the ratios are noisier than on an idle one)",
        "- presets have random weights: their accuracy column is top-1 agreement with FP32 on real images; the reference model "
        "is trained, so its column is a real top-1 drop with a paired 95 % interval. **Bold**: recommended engine (reference: fastest within "
        "1 pp top-1 drop; presets: fastest, since random weights have no accuracy to keep — judge fidelity by the cosine column).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(head + sections).rstrip() + "\n")
    os.replace(tmp, args.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="reference,vit_small,vit_base", help="comma-separated: reference, vit_small, vit_base")
    ap.add_argument("--quick", action="store_true", help="short timing budgets and fewer images (a smoke run, noisier figures)")
    ap.add_argument("--backends", default=None, help="comma-separated subset of onnxruntime,openvino,tensorrt")
    ap.add_argument("--precisions", default=None, help="comma-separated subset of fp32,fp16,bf16,int8")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of timed runs per engine (default 8, quick 1.5)")
    ap.add_argument("--val-samples", "--samples", dest="samples", type=int, default=None, help="validation images per model (default: see MODELS; --samples: its old name)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration images for INT8 (default 64, quick 16)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md", help="markdown results file")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rewrite --out from the reports already in --work/<model>/report.json")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs", help="engines and full reports per model")
    args = ap.parse_args(argv)

    from vitedge.benchmarking import benchmark
    from vitedge.data import ImageSet
    from vitedge.sysinfo import isa_summary, machine_info, machine_summary

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"instruction sets: {isa_summary(info)}")
    budget = args.time_budget or (1.5 if args.quick else 8.0)
    calib_samples = args.calib_samples or (16 if args.quick else 64)
    load_before = info.get("load_average")

    sections = []
    if args.render_only:
        from vitedge.benchmarking import rank
        from vitedge.report import Report

        for name in names:
            rep = Report.load(args.work / name / "report.json")
            rank(rep, _budget(MODELS[name][0]), fidelity=_budget(MODELS[name][0]) is not None)
            img = MODELS[name][1]
            sections += results_table(name, rep, f"{img}x{img}" if img else "64x64")
        first, last = (Report.load(args.work / n / "report.json").data for n in (names[0], names[-1]))
        _write(args, first["machine"], names, first["settings"]["timing"]["budget_s"], first["machine"].get("load_average"),
               sections, after=last["machine"].get("load_average"))
        print(f"wrote {args.out} from {len(names)} report(s)")
        return 0
    for name in names:
        model, img, (full_n, quick_n) = MODELS[name]
        samples = args.samples or (quick_n if args.quick else full_n)
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        data = ImageSet.from_path(VAL)
        if model != "reference":  # random weights: the digit labels mean nothing to a preset, measure agreement with FP32
            data.labels = [None] * len(data)
        rep = benchmark(model, calib=CALIB, data=data, out_dir=args.work / name, img_size=img, samples=samples,
                        calib_samples=calib_samples, batch_sizes=(1,), time_budget=budget, rounds=3,
                        backends=args.backends.split(",") if args.backends else None,
                        precisions=args.precisions.split(",") if args.precisions else None, max_drop=_budget(model))
        size = f"{img}x{img}" if img else "64x64"
        sections += results_table(name, rep, size)
        print("\n".join(results_table(name, rep, size)))
        print(f"({time.perf_counter() - t0:.0f} s; full report: {args.work / name / 'report.html'})", flush=True)
        _write(args, info, names[: names.index(name) + 1], budget, load_before, sections)  # partial results survive an interrupted run

    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
