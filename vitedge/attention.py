"""Attention maps from a ViT's attention probabilities, and how far two maps agree.

An engine exposes its attention probabilities (the Softmax outputs of its blocks, see
:meth:`~vitedge.backends.base.Engine.attention`); this module turns them into maps on the image's patch
grid.  Two kinds:

* ``rollout`` (Abnar & Zuidema, 2020): per block, the heads averaged, the identity added (the residual
  path) and each row renormalised; the blocks multiplied from the first to the last; the CLS token's row
  over the patches.  Only the last block's CLS row is needed, so an engine whose last block attends from
  the CLS token only (vitedge's export) gives the exact rollout.
* ``cls``: the last block's attention from the CLS token to each patch, per head.

Tokens: ``[CLS, registers..., patches...]``; the patches are the last ``grid_h * grid_w`` tokens, so
register tokens (between CLS and the patches) are left out of the map.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import ModelNotSupported, ShapeMismatch, VitedgeError

KINDS = ("rollout", "cls")
#: at most this many tokens before the patches (CLS + registers) when the patch size must be inferred
MAX_PREFIX_TOKENS = 17
TOP_FRACTION = 0.1  # the share of patches whose overlap attention.json reports (``top10_overlap``)
#: viridis at 9 evenly spaced stops (perceptually uniform, readable in grey and by colour-blind readers)
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140], [40, 174, 128], [94, 201, 98], [173, 220, 48], [253, 231, 37]], np.float64
)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise VitedgeError(f"unknown attention map kind {kind!r}", f"use one of {', '.join(KINDS)}")
    return kind


def patch_grid(tokens: int, height: int, width: int, patch: int | None = None) -> tuple[int, int, int]:
    """``(grid_h, grid_w, prefix)``: the patch grid of an ``height x width`` input whose blocks see ``tokens``
    tokens, and how many come before the patches (CLS and register tokens).  ``patch``: the patch size when
    known (the manifest's model config); else the smallest that leaves 1 to :data:`MAX_PREFIX_TOKENS` prefix tokens
    (the fewest prefix tokens)."""
    sizes = [patch] if patch else [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
    for p in sizes:
        gh, gw = height // p, width // p
        prefix = tokens - gh * gw
        if 1 <= prefix <= (MAX_PREFIX_TOKENS if not patch else tokens):
            return gh, gw, prefix
    raise ShapeMismatch(
        f"{tokens} attention tokens do not fit a {height}x{width} input"
        + (f" with {patch}-pixel patches" if patch else " with any patch size and a CLS token"),
        "the map needs a ViT with one token per patch after its CLS (and register) tokens",
    )


def _checked(probs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The per-block probabilities as ``(N, heads, queries, keys)``; one token count throughout."""
    if not probs:
        raise VitedgeError("no attention probabilities to make a map from")
    out = [np.asarray(p, np.float64) for p in probs]
    if any(p.ndim != 4 for p in out):
        raise ShapeMismatch(f"attention probabilities of shapes {[p.shape for p in out]} are not (batch, heads, queries, keys)")
    if len({p.shape[-1] for p in out}) > 1:
        raise ModelNotSupported(
            f"the blocks attend over different numbers of tokens ({', '.join(str(p.shape[-1]) for p in out)}): a token-merged model",
            "attention maps need every patch as its own token: use an engine exported without --merge-tokens",
        )
    return out


def rollout(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Attention rollout: the CLS token's row ``(N, tokens)`` of the product of the blocks' head-averaged
    attention with the identity added and rows renormalised.  The last block may hold the CLS query only."""
    blocks = _checked(probs)
    joint: np.ndarray | None = None
    for i, p in enumerate(blocks):
        a = p.mean(axis=1)  # (N, queries, keys)
        queries, keys = a.shape[-2:]
        if queries != keys and i != len(blocks) - 1:
            raise ShapeMismatch(f"block {i} attends from {queries} of {keys} tokens: only the last block may attend from the CLS token alone")
        a = a + np.eye(keys)[:queries]  # the residual path; the queries are the first tokens (CLS first)
        a = a / a.sum(axis=-1, keepdims=True)
        joint = a if joint is None else a @ joint
    assert joint is not None
    return joint[:, 0]


def maps(probs: Sequence[np.ndarray], height: int, width: int, kind: str = "rollout", patch: int | None = None) -> np.ndarray:
    """Maps on the patch grid: ``rollout`` ``(N, grid_h, grid_w)``, ``cls`` ``(N, heads, grid_h, grid_w)``
    (float32), from the per-block probabilities of an ``height x width`` input."""
    check_kind(kind)
    blocks = _checked(probs)
    gh, gw, prefix = patch_grid(blocks[-1].shape[-1], height, width, patch)
    if kind == "rollout":
        return rollout(blocks)[:, prefix:].reshape(-1, gh, gw).astype(np.float32)
    last = blocks[-1][:, :, 0, prefix:]  # (N, heads, patches): the CLS query's row
    return last.reshape(last.shape[0], last.shape[1], gh, gw).astype(np.float32)


# -- comparing two maps ---------------------------------------------------------------------------------------------------
def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape (1.0 for two equal flat maps, 0.0 for one flat map)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ShapeMismatch(f"maps of shapes {np.shape(a)} and {np.shape(b)} cannot be compared")
    x, y = x - x.mean(), y - y.mean()
    nx, ny = math.sqrt(float(x @ x)), math.sqrt(float(y @ y))
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(np.clip((x @ y) / (nx * ny), -1.0, 1.0))


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """The share of ``a``'s top ``fraction`` of patches (at least one) that are also among ``b``'s."""
    x, y = np.asarray(a).ravel(), np.asarray(b).ravel()
    k = max(1, math.ceil(fraction * x.size))
    top_a = set(np.argsort(-x, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-y, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """``{"correlation", "top10_overlap"}`` of an engine's map ``a`` and the reference's ``b``."""
    return {"correlation": correlation(a, b), "top10_overlap": top_overlap(a, b)}


def summary(rows: Sequence[dict]) -> dict:
    """The distribution of :func:`agreement` over images: ``{"images", "correlation": {mean, median, min, p10},
    "top10_overlap": {mean, median, min}}``."""
    out: dict = {"images": len(rows)}
    for key in ("correlation", "top10_overlap"):
        v = np.array([r[key] for r in rows], np.float64)
        stats = {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min())} if len(v) else {}
        if key == "correlation" and len(v):
            stats["p10"] = float(np.percentile(v, 10))
        out[key] = stats
    return out


def compare_maps(ours: np.ndarray, theirs: np.ndarray, names: Sequence[str], moved: int = 3) -> dict:
    """An engine's maps against the reference's, image by image (``names``, in order): :func:`summary`,
    ``per_image`` agreement, and the ``moved`` images of lowest correlation with both maps (rounded lists)."""
    rows = [{"image": names[i], **agreement(ours[i], theirs[i])} for i in range(len(ours))]
    worst = sorted(range(len(rows)), key=lambda i: rows[i]["correlation"])[:moved]

    def rounded(m: np.ndarray) -> list:
        return np.round(np.asarray(m, np.float64), 5).tolist()

    return {**summary(rows), "per_image": rows, "moved": [{**rows[i], "engine_map": rounded(ours[i]), "reference_map": rounded(theirs[i])} for i in worst]}


# -- pictures -------------------------------------------------------------------------------------------------------------
def colormap(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] (clipped) as uint8 RGB (shape ``values.shape + (3,)``), on the viridis scale."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(v.astype(int), len(_VIRIDIS) - 2)
    t = (v - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).astype(np.uint8)


def heatmap(grid: np.ndarray, size: tuple[int, int], lo: float, hi: float) -> Image.Image:
    """A ``(grid_h, grid_w)`` map scaled from ``[lo, hi]`` to the colour scale, resized (bilinear) to ``size`` (w, h)."""
    g = np.asarray(grid, np.float32)
    g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    smooth = Image.fromarray(g.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return Image.fromarray(colormap(np.asarray(smooth)))


def overlay(image: Image.Image, grid: np.ndarray, lo: float, hi: float, alpha: float = 0.55) -> Image.Image:
    """``grid`` as a heat map over ``image`` (what the model saw), ``alpha`` of it heat."""
    return Image.blend(image.convert("RGB"), heatmap(grid, image.size, lo, hi), alpha)


def side_by_side(panels: Sequence[tuple[Image.Image, str]], min_side: int = 224) -> Image.Image:
    """Panels in a row, each scaled so its shorter side is at least ``min_side`` pixels, with its caption below."""
    scaled = []
    for img, caption in panels:
        f = max(1.0, min_side / min(img.size))
        scaled.append((img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.BICUBIC) if f > 1 else img, caption))
    gap, text_h = 8, 16
    width = sum(i.width for i, _ in scaled) + gap * (len(scaled) + 1)
    height = max(i.height for i, _ in scaled) + text_h + 2 * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for img, caption in scaled:
        canvas.paste(img, (x, gap))
        draw.text((x, gap + img.height + 3), caption, fill=(30, 30, 30))
        x += img.width + gap
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def display_map(m: np.ndarray) -> np.ndarray:
    """The ``(grid_h, grid_w)`` map a picture shows: a ``cls`` map ``(heads, h, w)`` averaged over its heads."""
    m = np.asarray(m)
    return m.mean(axis=0) if m.ndim == 3 else m
