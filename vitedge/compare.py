"""The one comparator: how a candidate's outputs agree with a reference's.

Every place that measures an engine against its FP32 reference uses these functions: ``vitedge
validate`` / ``benchmark`` (:func:`classification`, :func:`features`), the export and compile
verifications (:func:`output_metrics`, :func:`per_output`) and the INT8 fidelity measurement.

* **Outputs** are matched by name, else by position (:func:`match_outputs`).
* **Per output**: max / mean absolute error, cosine per image (min and mean), SNR in dB.
* **Classifiers**: top-1 / top-5 agreement with the reference (Wilson interval), accuracy against
  labels, and the *paired* top-1 / top-5 drop with an Agresti–Min interval (or a paired bootstrap).

Only numpy at import time; scipy (intervals) is imported when an interval is computed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VitedgeError

CI_LEVEL = 0.95
#: what is kept per output wherever several outputs are compared
OUTPUT_KEYS = ("cosine_min", "cosine_mean", "max_abs_error", "snr_db", "finite")


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------
def match_outputs(
    ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray], name: str = "the engine", *, check_shapes: bool = True
) -> dict[str, np.ndarray]:
    """``outs`` in the reference's order and under its names: by name where the names agree, else by position.

    A different number of outputs (or, with ``check_shapes``, a different shape) is a one-line
    :class:`~vitedge.errors.VitedgeError` naming ``name``.
    """
    if len(outs) != len(ref):
        raise VitedgeError(f"{name} has {len(outs)} outputs but the reference {len(ref)}", "compare an engine with the model it was made from")
    got = list(outs.values())
    res = {k: outs[k] if k in outs else got[i] for i, k in enumerate(ref)}
    if check_shapes:
        for k, v in res.items():
            if np.shape(v) != np.shape(ref[k]):
                raise VitedgeError(
                    f"{name} outputs {np.shape(v)[1:]} for {k!r} but the reference {np.shape(ref[k])[1:]}", "compare an engine with the model it was made from"
                )
    return res


# ------------------------------------------------------------------------------------------
# any output
# ------------------------------------------------------------------------------------------
def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1)


def cosine(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine similarity per image (row), each image's values flattened; 0-safe."""
    a, b = _rows(ref), _rows(out)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-noise ratio in dB: reference energy over the energy of the difference (inf when identical)."""
    a, b = _rows(ref), _rows(out)
    noise = float(((a - b) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10((a**2).sum() / noise))


def output_metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    """Agreement numbers between a reference and a candidate output of the same shape: max / mean / relative
    absolute error, cosine per image (min, mean), SNR (dB, inf when identical), finiteness, and the top-1
    agreement when the output looks like class logits (N, classes)."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    diff = np.abs(ref - out)
    cos = cosine(ref, out)
    res = {
        "max_abs_error": float(diff.max()),
        "max_rel_error": float(diff.max() / (np.abs(ref).max() + 1e-12)),
        "mean_abs_error": float(diff.mean()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "snr_db": snr_db(ref, out),
        "finite": bool(np.isfinite(out).all()),
    }
    if ref.ndim == 2 and ref.shape[1] > 1:
        res["top1_agreement"] = float((ref.argmax(1) == out.argmax(1)).mean())
    return res


def per_output(
    ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray], keys: Sequence[str] = OUTPUT_KEYS, *, shape: bool = True, json_snr: bool = False
) -> dict[str, dict]:
    """:func:`output_metrics` of every reference output (``outs`` already matched), reduced to ``keys``.

    ``shape`` adds each output's per-image shape; ``json_snr`` writes an infinite SNR as None (JSON has no inf).
    """
    res = {}
    for k, a in ref.items():
        m = output_metrics(a, outs[k])
        row: dict[str, Any] = {"shape": [int(d) for d in np.shape(a)[1:]]} if shape else {}
        row.update({key: m[key] for key in keys if key in m})
        if json_snr and "snr_db" in row:
            row["snr_db"] = finite_or_none(row["snr_db"])
        res[k] = row
    return res


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or math.isinf(v) else v


# ------------------------------------------------------------------------------------------
# intervals
# ------------------------------------------------------------------------------------------
def z_value(level: float = CI_LEVEL) -> float:
    """The two-sided standard normal quantile for a confidence level (1.96 at 95 %)."""
    return statistics.NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(k: int, n: int, level: float = CI_LEVEL) -> list[float]:
    """Wilson score interval of a proportion k/n (scipy's ``binomtest(...).proportion_ci``)."""
    if n == 0:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [max(0.0, float(ci.low)), min(1.0, float(ci.high))]


def paired_drop(ref_ok: np.ndarray, eng_ok: np.ndarray, *, level: float = CI_LEVEL, method: str = "agresti-min", n_boot: int = 4000, seed: int = 0) -> dict:
    """Accuracy drop (reference minus engine) in percentage points with a paired confidence interval.

    Only images where exactly one of the two is right (``b``: reference only, ``c``: engine only)
    carry information about the difference.  ``agresti-min`` is the Wald interval for matched
    proportions with 0.5 added to each cell of the 2x2 table (Agresti & Min, 2005), which keeps a
    sensible width when there are few or no discordant images; ``bootstrap`` resamples images
    (scipy's percentile bootstrap of the paired differences).
    """
    ref_ok = np.asarray(ref_ok, bool)
    eng_ok = np.asarray(eng_ok, bool)
    n = len(ref_ok)
    b = int((ref_ok & ~eng_ok).sum())
    c = int((~ref_ok & eng_ok).sum())
    drop = 100.0 * (b - c) / n
    if method == "agresti-min":
        bs, cs, ns = b + 0.5, c + 0.5, n + 2.0
        d = (bs - cs) / ns
        se = math.sqrt(max((bs + cs) - (bs - cs) ** 2 / ns, 0.0)) / ns
        z = z_value(level)
        ci = [100.0 * max(-1.0, d - z * se), 100.0 * min(1.0, d + z * se)]
    elif method == "bootstrap":
        ci = [100.0 * v for v in _bootstrap_mean(ref_ok.astype(np.int8) - eng_ok.astype(np.int8), level, n_boot, seed)]
    else:
        raise VitedgeError(f"unknown confidence-interval method {method!r}", "use 'agresti-min' or 'bootstrap'")
    return {"drop_pp": drop, "ci95_pp": ci, "reference_only": b, "engine_only": c}


def _bootstrap_mean(diff: np.ndarray, level: float, n_boot: int, seed: int) -> list[float]:
    import inspect

    from scipy.stats import bootstrap

    if not diff.any():  # every image agrees: every resample has mean 0
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    seeded = {"rng": rng} if "rng" in inspect.signature(bootstrap).parameters else {"random_state": rng}
    res = bootstrap((diff.astype(np.float64),), np.mean, n_resamples=n_boot, batch=500, vectorized=True, confidence_level=level, method="percentile", **seeded)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


# ------------------------------------------------------------------------------------------
# classifiers
# ------------------------------------------------------------------------------------------
def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per image, largest first (stable: ties keep the lower index first)."""
    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def correct(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: is the label the top-1, and among the top-5."""
    top = topk(logits, 5)
    return top[:, 0] == y, (top == np.asarray(y)[:, None]).any(1)


def accuracy(logits: np.ndarray, y: np.ndarray, level: float = CI_LEVEL) -> dict:
    """Top-1 / top-5 accuracy against labels, with Wilson intervals."""
    ok1, ok5 = correct(logits, y)
    n = len(y)
    return {
        "top1": float(ok1.mean()),
        "top5": float(ok5.mean()),
        "top1_ci95": wilson_interval(int(ok1.sum()), n, level),
        "top5_ci95": wilson_interval(int(ok5.sum()), n, level),
    }


def classification(
    ref: np.ndarray,
    out: np.ndarray,
    *,
    names: Sequence[str],
    class_names: Sequence[str],
    y: np.ndarray | None = None,
    ci_method: str = "agresti-min",
    worst: int = 10,
) -> dict:
    """A classifier's logits against the reference's (``vs_reference`` of a validation report).

    Agreement of top-1 (with its Wilson interval) and top-5 (the reference's top-1 among the engine's
    top-5), per-image logit cosine, SNR, max abs error, the ``worst`` images (disagreements first, then
    the lowest cosine) and, with labels ``y``, the paired top-1 / top-5 drop with its interval.
    """
    m = output_metrics(ref, out)
    ref_top, eng_top = topk(ref, 5), topk(out, 5)
    agree1 = ref_top[:, 0] == eng_top[:, 0]
    agree5 = (eng_top == ref_top[:, :1]).any(1)
    cos = cosine(ref, out)
    order = np.lexsort((cos, agree1))  # disagreements first, then lowest cosine
    res = {
        "top1_drop_pp": None,
        "top1_drop_ci95_pp": None,
        "top5_drop_pp": None,
        "top5_drop_ci95_pp": None,
        "top1_agreement": float(agree1.mean()),
        "top1_agreement_ci95": wilson_interval(int(agree1.sum()), len(agree1)),
        "top5_agreement": float(agree5.mean()),
        "cosine_mean": m["cosine_mean"],
        "cosine_min": m["cosine_min"],
        "snr_db": finite_or_none(m["snr_db"]),
        "max_abs_error": m["max_abs_error"],
        "finite": m["finite"],
        "disagreements": int((~agree1).sum()),
        "discordant": {},
        "worst": [
            {
                "image": short_name(names[i]),
                "cosine": float(cos[i]),
                "reference_top1": class_names[ref_top[i, 0]],
                "engine_top1": class_names[eng_top[i, 0]],
                "label": None if y is None else class_names[y[i]],
            }
            for i in order[:worst]
        ],
    }
    if y is not None:
        (r1, r5), (e1, e5) = correct(ref, y), correct(out, y)
        d1, d5 = paired_drop(r1, e1, method=ci_method), paired_drop(r5, e5, method=ci_method)
        res.update(
            top1_drop_pp=d1["drop_pp"],
            top1_drop_ci95_pp=d1["ci95_pp"],
            top5_drop_pp=d5["drop_pp"],
            top5_drop_ci95_pp=d5["ci95_pp"],
            discordant={
                "top1_reference_only": d1["reference_only"],
                "top1_engine_only": d1["engine_only"],
                "top5_reference_only": d5["reference_only"],
                "top5_engine_only": d5["engine_only"],
            },
        )
    return res


def features(ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]) -> dict:
    """``vs_reference`` for a model that is not a classifier: no top-1, agreement per output (first output on top)."""
    per = per_output(ref, outs, ("cosine_mean", "cosine_min", "max_abs_error", "snr_db", "finite"), json_snr=True)
    first = per[next(iter(per))]
    return {
        "top1_drop_pp": None,
        "top1_drop_ci95_pp": None,
        "top5_drop_pp": None,
        "top5_drop_ci95_pp": None,
        "top1_agreement": None,
        "top1_agreement_ci95": None,
        "top5_agreement": None,
        "cosine_mean": first["cosine_mean"],
        "cosine_min": first["cosine_min"],
        "snr_db": first["snr_db"],
        "max_abs_error": first["max_abs_error"],
        "finite": all(o["finite"] for o in per.values()),
        "disagreements": 0,
        "discordant": {},
        "worst": [],
        "outputs": per,
    }


def top1_loss(vs: Mapping, labelled: bool) -> tuple[float, list[float]]:
    """The top-1 percentage points an engine loses against the reference, with its interval, from a
    :func:`classification` result: the paired drop on labelled images, else the disagreement with the
    reference's top-1 (an upper bound of the drop) with the Wilson interval turned around."""
    if labelled:
        return vs["top1_drop_pp"], list(vs["top1_drop_ci95_pp"])
    lo, hi = vs["top1_agreement_ci95"]
    return 100.0 * (1 - vs["top1_agreement"]), [100.0 * (1 - hi), 100.0 * (1 - lo)]


def short_name(name: str) -> str:
    """An image path as ``class/file`` (its last two parts)."""
    p = Path(name)
    return str(Path(*p.parts[-2:])) if len(p.parts) >= 2 else name
