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

import math
from collections.abc import Sequence

import numpy as np

from .errors import ModelNotSupported, ShapeMismatch, VitedgeError

KINDS = ("rollout", "cls")
#: at most this many tokens before the patches (CLS + registers) when the patch size must be inferred
MAX_PREFIX_TOKENS = 17
TOP_FRACTION = 0.1  # the share of patches whose overlap attention.json reports (``top10_overlap``)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise VitedgeError(f"unknown attention map kind {kind!r}", f"use one of {', '.join(KINDS)}")
    return kind


def patch_grid(tokens: int, height: int, width: int, patch: int | None = None) -> tuple[int, int, int]:
    """``(grid_h, grid_w, prefix)``: the patch grid of an ``height x width`` input whose blocks see ``tokens``
    tokens, and how many come before the patches (CLS and register tokens).  ``patch``: the patch size when
    known (the manifest's model config); else the one that leaves 1 to :data:`MAX_PREFIX_TOKENS` prefix tokens."""
    sizes = [patch] if patch else [p for p in range(min(height, width), 0, -1) if height % p == 0 and width % p == 0]
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
