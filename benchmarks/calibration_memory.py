"""Peak memory of INT8 calibration vs the number of calibration images (bounded-memory check).

    python benchmarks/calibration_memory.py                          # vit_small @224, 64 vs 1024 images, all backends
    python benchmarks/calibration_memory.py --counts 16,128 --model reference --configs ort-minmax   # quick

For every configuration (ONNX Runtime MinMax / entropy / percentile, OpenVINO NNCF) and every image
count, ``vitedge.quantization.quantize`` runs in a fresh Python process that reports its own peak
RSS (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` would inherit the parent's peak across fork+exec) and its RSS just before quantize starts (model loaded,
libraries imported).  The evaluation set is a fixed ``--val`` folder of 16 images for every run, so
only calibration depends on the image count.  Calibration images are generated into a temporary
folder (distinct crops/flips/scales/colour shifts of the two photographs scikit-learn ships and of
the shipped digits images) and deleted afterwards: nothing generated is committed.

Writes a markdown table to ``benchmarks/calibration_memory.md`` (``--out``).  Target: peak RSS grows
less than 10 % from 64 to 1024 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (backend, method)
    "ort-minmax": ("onnxruntime", "minmax"),
    "ort-entropy": ("onnxruntime", "entropy"),
    "ort-percentile": ("onnxruntime", "percentile"),
    "openvino-nncf": ("openvino", "minmax"),
}

_CHILD = r"""
import json, os, resource, sys, time
import numpy as np
from vitedge.quantization import quantize
import onnxruntime, openvino, nncf  # import every library up front: the 'before' RSS includes them
model, out, calib, val, n, backend, method = sys.argv[1:8]
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
before = status_mb("VmRSS")
t = time.perf_counter()
quantize(model, out, precision="int8", backend=backend, calib=calib, samples=int(n), val=val, method=method)
secs = time.perf_counter() - t
# VmHWM: high-water RSS of this process image (ru_maxrss would carry the parent's peak across fork+exec)
peak = status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"before_mb": before, "peak_mb": peak, "seconds": secs}))
"""


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` distinct RGB images: random crops, flips, scales and colour shifts of real photos and digits."""
    import numpy as np
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    digits = sorted((ROOT / "calibration_data" / "digits").rglob("*.png"))
    digit_imgs = [Image.open(p).convert("RGB") for p in digits[:200]]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i % 4 == 3 and digit_imgs:  # a quarter: digits, scaled up, shifted, tinted
            im = digit_imgs[rng.integers(len(digit_imgs))]
            s = int(rng.integers(size // 2, size * 2))
            im = im.resize((s, s), Image.BICUBIC)
            canvas = Image.new("RGB", (size + 32, size + 32), tuple(int(v) for v in rng.integers(0, 255, 3)))
            canvas.paste(im, tuple(int(v) for v in rng.integers(0, 33, 2)) if s <= size else (0, 0))
            im = canvas
        else:
            src = photos[rng.integers(len(photos))]
            w, h = src.size
            cw = int(rng.integers(w // 5, w))
            ch = int(min(h, cw * rng.uniform(0.6, 1.4)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = src.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        if rng.random() < 0.3:
            im = ImageOps.flip(im)
        arr = np.asarray(im.resize((size + 32, size + 32), Image.BILINEAR), dtype=np.float32)
        arr = np.clip(arr * rng.uniform(0.7, 1.3, 3) + rng.uniform(-25, 25, 3), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)


def run_child(model: Path, out: Path, calib: Path, val: Path, n: int, backend: str, method: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(out), str(calib), str(val), str(n), backend, method],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[:300]}


def table(rows: list[dict], counts: list[int]) -> list[str]:
    lo, hi = counts[0], counts[-1]
    head = ["configuration"] + [f"peak RSS, {c} images (MB)" for c in counts] + [f"growth {lo}->{hi}", "calibration share growth", "time " + " / ".join(str(c) for c in counts) + " (s)", "target <10 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["results"]
        if any("error" in res[c] for c in counts):
            err = next(res[c]["error"] for c in counts if "error" in res[c])
            lines.append(f"| {r['name']} | " + " | ".join("-" for _ in head[1:-1]) + f" | failed: {err} |")
            continue
        p = [res[c]["peak_mb"] for c in counts]
        growth = 100.0 * (p[-1] - p[0]) / p[0]
        over_lo = res[lo]["peak_mb"] - res[lo]["before_mb"]
        over_hi = res[hi]["peak_mb"] - res[hi]["before_mb"]
        share = 100.0 * (over_hi - over_lo) / max(over_lo, 1e-9)
        t = " / ".join(f"{res[c]['seconds']:.0f}" for c in counts)
        lines.append(f"| {r['name']} | " + " | ".join(f"{v:.0f}" for v in p) + f" | {growth:+.1f} % | {share:+.1f} % | {t} | {'yes' if growth < 10 else 'NO'} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small", help="preset or 'reference' (default vit_small, random weights)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--counts", default="64,1024", help="comma-separated calibration image counts (first vs last compared)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated from {', '.join(CONFIGS)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "calibration_memory.md"))
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted afterwards)")
    args = ap.parse_args(argv)
    counts = sorted(int(c) for c in args.counts.split(","))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")

    from vitedge import export_onnx, load_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vitedge_calibmem_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        kw = {} if args.model == "reference" else {"img_size": args.img_size}
        spec = load_model(args.model, **kw)
        model = work / f"{args.model}.onnx"
        if not model.exists():
            export_onnx(spec, model)
        size = spec.preprocessing.img_size[0]
        calib, val = work / "calib", work / "val"
        if len(list(calib.glob("*.jpg"))) < counts[-1]:
            print(f"generating {counts[-1]} calibration images ...", flush=True)
            make_images(calib, counts[-1], size, seed=0)
        if not val.exists():
            make_images(val, 16, size, seed=12345)
        rows = []
        for name in configs:
            backend, method = CONFIGS[name]
            res = {}
            for n in counts:
                suffix = ".xml" if backend == "openvino" else ".onnx"
                out = work / f"q_{name}_{n}{suffix}"
                print(f"{name}: {n} images ...", flush=True)
                res[n] = run_child(model, out, calib, val, n, backend, method)
                print(f"  {res[n]}", flush=True)
                for f in work.glob(f"q_{name}_{n}*"):
                    f.unlink()
            rows.append({"name": name, "results": res})
            _write(args, counts, rows, size)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _write(args, counts, rows, size) -> None:
    import nncf
    import onnxruntime
    import openvino

    lines = [
        f"# Calibration memory: {args.model} at {size}x{size}, {' vs '.join(str(c) for c in counts)} calibration images",
        "",
        "Peak RSS of one `vitedge.quantization.quantize(..., precision='int8')` run, each in a fresh process",
        "(`VmHWM` of the process); evaluation on the same 16 `--val` images every time, so only",
        "calibration depends on the image count. *Calibration share growth*: growth of (peak - RSS before",
        "quantize started, i.e. model + libraries loaded). Target: peak grows < 10 %.",
        "",
        *table(rows, counts),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, nncf {nncf.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Reproduce: `python benchmarks/calibration_memory.py`.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
