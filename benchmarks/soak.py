"""Soak test: 10,000 inferences per backend, resident memory after a warm-up vs at the end (issue #14).

    python benchmarks/soak.py                                   # reference + vit_tiny, ONNX Runtime + OpenVINO, 10,000 runs each
    python benchmarks/soak.py --models reference --runs 2000    # quick
    python benchmarks/soak.py --threads 4                       # the same runs from 4 caller threads sharing one engine

Every model is exported (``vitedge.export_onnx``) and compiled with ``vitedge compile``'s defaults
(static batch 1, latency hint) once; then every (model, backend) runs in a fresh Python process:
load the engine, ``--warmup`` inferences of batch 1, RSS (psutil, after ``gc.collect()``), then
``--runs`` inferences with RSS sampled every 1,000 and at the end.  Inputs cycle through 8 different
random batches.  Growth = (RSS at the end - RSS after warm-up) / RSS after warm-up; the bar is < 2 %.
Prints the machine (CPU, instruction sets) and the load average before and after, and a Markdown
table (``--json FILE`` also writes the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAR_PCT = 2.0
SAMPLE_EVERY = 1000


def child(artifact: str, runs: int, warmup: int, threads: int) -> dict:
    """One soak in this process; returns its numbers."""
    import gc
    import threading

    import numpy as np
    import psutil

    import vitedge

    proc = psutil.Process()

    def rss_mb() -> float:
        gc.collect()
        return proc.memory_info().rss / 2**20

    eng = vitedge.load(artifact)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in eng.input_shape]
    shape[0] = 1
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]

    def run(n: int) -> None:
        if threads == 1:
            for i in range(n):
                eng.infer(inputs[i % 8])
            return
        errors = []

        def work(t):
            try:
                for i in range(t, n, threads):
                    eng.infer(inputs[i % 8])
            except Exception as exc:  # reported below
                errors.append(exc)

        ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]

    rss_loaded = rss_mb()
    run(warmup)
    rss_warm = rss_mb()
    samples = []
    t0 = time.perf_counter()
    done = 0
    while done < runs:
        n = min(SAMPLE_EVERY, runs - done)
        run(n)
        done += n
        samples.append(round(rss_mb(), 2))
    seconds = time.perf_counter() - t0
    eng.close()
    rss_end = samples[-1]
    return {
        "backend": eng.backend,
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "ms_per_run": round(seconds / runs * 1000, 3),
        "rss_loaded_mb": round(rss_loaded, 2),
        "rss_after_warmup_mb": round(rss_warm, 2),
        "rss_end_mb": rss_end,
        "rss_max_mb": max(samples),
        "growth_pct": round((rss_end - rss_warm) / rss_warm * 100, 3),
        "samples_mb": samples,
    }


def build(models: list[str], backends: list[str], work: Path) -> list[tuple[str, str, Path]]:
    """Export and compile every model for every backend; (model, backend, engine path)."""
    import vitedge
    from vitedge.compilation import compile_model

    out = []
    for name in models:
        onnx = work / f"{name}.onnx"
        vitedge.export_onnx(vitedge.load_model(name), onnx)
        for backend in backends:
            suffix = {"onnxruntime": ".ort.onnx", "openvino": ".ov.xml"}[backend]
            path, _ = compile_model(onnx, work / f"{name}{suffix}", target=backend)
            out.append((name, backend, Path(path)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="reference,vit_tiny", help="comma-separated: reference and/or presets (vit_tiny, ...)")
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="caller threads sharing the engine")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.runs, args.warmup, args.threads)))
        return 0

    from vitedge.sysinfo import machine_info, machine_summary

    info = machine_info()
    load_before = [round(v, 2) for v in os.getloadavg()]
    print(f"machine: {machine_summary(info)}")
    print(f"load average before: {load_before}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitedge-soak-") as tmp:
        engines = build(args.models.split(","), args.backends.split(","), Path(tmp))
        for model, backend, path in engines:
            cmd = [sys.executable, __file__, "--child", str(path), "--runs", str(args.runs), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            row = {"model": model, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"  {model} {backend}: {row['ms_per_run']} ms/run, RSS {row['rss_after_warmup_mb']} -> {row['rss_end_mb']} MB "
                  f"({row['growth_pct']:+.2f} %)", flush=True)
    load_after = [round(v, 2) for v in os.getloadavg()]
    print(f"load average after: {load_after}")
    print()
    print(f"| model | backend | caller threads | runs | ms/run | RSS after {args.warmup} warm-up runs | RSS at the end | growth | max RSS seen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['threads']} | {r['runs']:,} | {r['ms_per_run']:.2f} | {r['rss_after_warmup_mb']:.1f} MB | "
              f"{r['rss_end_mb']:.1f} MB | {r['growth_pct']:+.2f} % | {r['rss_max_mb']:.1f} MB |")
    worst = max(r["growth_pct"] for r in rows)
    print(f"\nworst growth {worst:+.2f} % (bar: < {BAR_PCT:g} %): {'PASS' if worst < BAR_PCT else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"date": started, "machine": info, "load_before": load_before, "load_after": load_after,
                                         "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}, indent=2, default=str))
    return 0 if worst < BAR_PCT else 1


if __name__ == "__main__":
    sys.exit(main())
