"""Accuracy-aware INT8: rank layers by sensitivity, keep the most sensitive in float until the drop fits.

Sensitivity of a layer (MatMul/Gemm/Conv node) = the error it adds when it is the only one
quantized (same calibration ranges as the full model), measured on the held-out images as the
noise-to-signal ratio of the logits against FP32 (also shown as SNR and top-1 agreement).  The
search then keeps the 1, 2, 3, ... most sensitive layers in float until the measured drop is within
``--max-drop``, or stops at :data:`MAX_FLOAT_FRACTION` of the layers and says the budget cannot be met.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..runtime import load
from ..ui import progress
from .calibration import EvalSet
from .tensorrt_qdq import QDQConfig, quantize_qdq

MAX_FLOAT_FRACTION = 0.5  # beyond this the model is no longer meaningfully INT8


def _run(path: Path, ev: EvalSet) -> dict:
    with load(path, backend="onnxruntime") as eng:
        out = ev.logits(eng)
    m = ev.measure(out)
    ref = ev.ref
    assert ref is not None  # measure() needs it too
    noise = float(((out.astype(np.float64) - ref) ** 2).sum() / max((ref.astype(np.float64) ** 2).sum(), 1e-30))
    m["noise_ratio"] = noise
    m["drop_pp"] = ev.drop_pp(m)
    return m


def rank_layers(prepared: Path, cache: Path, cfg: QDQConfig, method: str, nodes: list[str], ev: EvalSet, scratch: Path) -> list[dict]:
    """One row per layer, most sensitive first."""
    rows = []
    with progress() as bar:
        task = bar.add_task("sensitivity per layer", total=len(nodes))
        for name in nodes:
            tmp = scratch / "sens.onnx"
            quantize_qdq(prepared, tmp, cache, cfg, method, only=[name])
            m = _run(tmp, ev)
            rows.append(
                {
                    "node": name,
                    "noise_ratio": m["noise_ratio"],
                    "snr_db": m["snr_db"],
                    "cosine_min": m["cosine_min"],
                    "top1_agreement": m.get("top1_agreement"),
                    "drop_pp": m["drop_pp"],
                }
            )
            bar.advance(task)
    rows.sort(key=lambda r: (-r["noise_ratio"], r["node"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def search(
    prepared: Path, out: Path, cache: Path, cfg: QDQConfig, method: str, ranking: list[dict], ev: EvalSet, max_drop: float, full: dict, scratch: Path
) -> tuple[list[str], dict, list[dict], bool]:
    """Keep the k most sensitive layers float for k = 1, 2, ... until the drop fits.

    Returns (kept_float, metrics_of_the_chosen_model, steps, met).  ``out`` holds the chosen model.
    """
    steps = [{"kept_float": 0, "drop_pp": full["drop_pp"], "snr_db": full["snr_db"]}]
    limit = max(1, int(math.floor(len(ranking) * MAX_FLOAT_FRACTION)))
    with progress() as bar:
        task = bar.add_task("keeping sensitive layers in float", total=limit)
        for k in range(1, limit + 1):
            keep = [r["node"] for r in ranking[:k]]
            quantize_qdq(prepared, out, cache, cfg, method, exclude=keep)
            m = _run(out, ev)
            steps.append({"kept_float": k, "node": keep[-1], "drop_pp": m["drop_pp"], "snr_db": m["snr_db"]})
            bar.advance(task)
            if m["drop_pp"] <= max_drop + 1e-9:
                return keep, m, steps, True
    return keep, m, steps, False


def write_report(path_json: Path, path_md: Path, info: dict) -> None:
    """The per-layer sensitivity table as JSON and Markdown."""
    path_json.write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        f"# INT8 sensitivity report: {info['model']}",
        "",
        f"- backend: {info['backend']}, method: {info['method']}, scheme: {info.get('scheme', '')}",
        f"- measured on: {info['eval_set']} ({info['images']} images), metric: {info['drop_kind']}",
        f"- budget (--max-drop): {info['max_drop']} pp; all layers INT8: {info['full_int8_drop_pp']:.3f} pp",
        f"- result: {info['result']}",
        "",
        "Sensitivity = error a layer adds when it alone is quantized (noise/signal of the logits vs FP32).",
        "",
        "| rank | node | noise/signal | SNR dB | cosine min | top-1 agreement | kept float |",
        "|---:|---|---:|---:|---:|---:|:---:|",
    ]
    kept = set(info.get("kept_float", []))
    for r in info["layers"]:
        agree = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%"
        snr = "inf" if r["snr_db"] == float("inf") else f"{r['snr_db']:.1f}"
        mark = "yes" if r["node"] in kept else ""
        lines.append(f"| {r['rank']} | `{r['node']}` | {r['noise_ratio']:.3e} | {snr} | {r['cosine_min']:.5f} | {agree} | {mark} |")
    if info.get("steps"):
        lines += ["", "| layers kept float | drop pp | SNR dB |", "|---:|---:|---:|"]
        for s in info["steps"]:
            lines.append(f"| {s['kept_float']} | {s['drop_pp']:.3f} | {s['snr_db']:.1f} |")
    path_md.write_text("\n".join(lines) + "\n")
