"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), for export.

Between the attention and the MLP of a block, the ``r`` most redundant tokens are averaged into the
token they are most similar to, so every later layer runs on fewer tokens.  No training is needed;
the cost is a small, model-dependent accuracy drop, which vitedge measures (``vitedge export
--merge-tokens auto`` picks ``r`` from the user's validation images).

How one merge works (bipartite soft matching):

1. Similarity is the cosine of the tokens' attention *keys* (averaged over heads): keys already
   summarise what a token contributes to attention.
2. The tokens are split alternately into two sets: ``A`` = even positions after the CLS token,
   ``B`` = odd positions.  Each ``A`` token finds its most similar ``B`` token.
3. The ``r`` ``A`` tokens with the highest best-match similarity are merged into their match (a
   size-weighted mean); the other ``A`` tokens are kept in their original order.  The CLS token is
   never merged, and stays first.
4. ``size`` counts how many original patches each token stands for.  Attention adds ``log(size)``
   to its logits ("proportional attention"), so a merged token weighs as much as its parts did.

Every shape depends only on the input size and ``r``, never on the data, so the exported graph has
static token counts per layer (TopK for the ranking, Gather/ScatterND with flat row indices for the merge).

What a merge costs on a CPU (``benchmarks/token_merging.md``): not its arithmetic, which is tiny, but its
two dozen small ops, each a kernel launch and a thread sync.  So the graph keeps them few: the weighted sum
and the size travel as one tensor (one gather and one scatter instead of two of each), and the best match is
looked up for the ``r`` merged tokens only, after the ranking (a max over every row, then an argmax over
``r`` rows), instead of an argmax over every ``A`` row.  Where the ops still eat the saving, merging in
fewer blocks (:func:`merges_at`, ``--merge-every``) pays for fewer of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Matching:
    """Which tokens each merge picked, one ``(B, 2r + kept)`` int64 tensor per merge: the merged ``A`` tokens
    (``src``), the ``B`` tokens they go into (``dst``) and the kept ``A`` tokens, in that order.

    ``forced``: make the merges pick these instead of choosing.  Which tokens merge depends on which pairs score
    highest, so two correct implementations can pick differently on a near-tie (float rounding, bf16); forcing
    one's picks onto the other compares the arithmetic with the choice held equal (export's check)."""

    def __init__(self, forced: list[torch.Tensor] | None = None) -> None:
        self.picked: list[torch.Tensor] = []
        self.forced = list(forced) if forced is not None else None


_active: Matching | None = None


@contextlib.contextmanager
def matching(m: Matching) -> Iterator[Matching]:
    """Record (and with ``m.forced``, impose) the picks of every merge run inside the block."""
    global _active
    saved, _active = _active, m
    try:
        yield m
    finally:
        _active = saved


def merges_at(num_layers: int, every: int = 1) -> list[bool]:
    """Which blocks merge: every ``every``-th block from the first, never the last (CLS is never merged, so
    merging there could not change the output).  ``every`` > 1 merges in fewer places, each merge costing the
    same dozen small ops (similarity, ranking, gathers) whatever ``r`` is: on a CPU those ops, not the tokens,
    can eat the saving (``benchmarks/token_merging.md``)."""
    if every < 1:
        raise ValueError(f"merge every must be >= 1, got {every}")
    return [i < num_layers - 1 and i % every == 0 for i in range(num_layers)]


def tokens_per_block(n_tokens: int, num_layers: int, r: int, every: int = 1) -> list[int]:
    """Tokens entering each block when the blocks of :func:`merges_at` merge ``r`` tokens each (CLS included in
    the count).  ``r`` is clipped where set ``A`` (even positions after CLS) runs out of tokens."""
    if r < 0:
        raise ValueError(f"merge r must be >= 0, got {r}")
    counts, n = [], n_tokens
    for merges in merges_at(num_layers, every):
        counts.append(n)
        if merges:
            n -= merged_count(n, r)
    return counts


def merged_count(n_tokens: int, r: int) -> int:
    """How many tokens one merge removes from ``n_tokens`` (CLS first): ``r``, at most the size of A."""
    return max(0, min(r, (n_tokens - 1) // 2))


def max_merge(n_tokens: int, num_layers: int, every: int = 1) -> int:
    """The largest useful ``r``: beyond it, later blocks would clip it anyway and nothing changes.
    Bounded so that at least 4 tokens (CLS + 3) reach the last block."""
    best = 0
    for r in range(1, n_tokens):
        if tokens_per_block(n_tokens, num_layers, r, every)[-1] < 4:
            break
        best = r
    return best


def linear_share_removed(counts: list[int]) -> float:
    """The share of the blocks' linear-layer multiply-adds (QKV, projection, MLP: per token) that merging
    removes, from the tokens entering each block."""
    return 1.0 - sum(counts) / (counts[0] * len(counts)) if counts else 0.0


def bipartite_merge(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, D); returns ``(x, size)`` with N - r tokens.

    ``size`` is (B, N, 1) patches per token (``None`` = all ones); ``metric`` is (B, N, C), the keys
    averaged over heads.  Token 0 (CLS) is kept first and never merged.
    """
    b, n, c = x.shape
    r = merged_count(n, r)
    if size is None:
        size = torch.ones(b, n, 1, dtype=x.dtype, device=x.device)
    if r == 0:
        return x, size
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, 2::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
    order = scores.amax(dim=-1).argsort(dim=-1, descending=True)  # A tokens by their best match
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values  # merged A tokens / kept A tokens, in order
    n_a0, n_b0 = scores.shape[1], scores.shape[2]
    src_scores = scores.reshape(-1, n_b0).index_select(0, (src + torch.arange(b, device=x.device)[:, None] * n_a0).reshape(-1))
    dst = src_scores.reshape(b, -1, n_b0).argmax(dim=-1)  # where each merged token goes in B (its best match)
    if _active is not None:
        # the merge reads its picks back from the one tensor that is recorded, so that in an exported graph that
        # tensor is what the gathers consume: a check can then impose other picks on the graph (vitedge compile)
        picks = _active.forced.pop(0).to(src.device) if _active.forced is not None else torch.cat([src, dst, keep], dim=1)
        _active.picked.append(picks)
        src, dst, keep = picks[:, :r], picks[:, r : 2 * r], picks[:, 2 * r :]
    # A merged token is the size-weighted mean of its parts.  The weighted sum (x * size) and the size travel as
    # one (B, N, C + 1) tensor, so each step below is one op, not one per tensor (on a CPU runtime every op of a
    # merge costs about the same, whatever its size: benchmarks/token_merging.md); divided once at the end.
    xs = torch.cat([x * size, size], dim=-1)
    cls_xs, a_xs, b_xs = xs[:, :1], xs[:, 2::2], xs[:, 1::2]
    # Rows are picked and added through flat indices into (B * tokens, C + 1): the export then has Gather and
    # ScatterND (reduction add) on whole rows, instead of GatherElements/ScatterElements whose indices are
    # first broadcast to every channel (in an OpenVINO profile of ViT-B at r = 8 that broadcast and the
    # element-wise gathers took ~3.4 ms per inference; the flat form ~0.8 ms).
    n_a, n_b = a_xs.shape[1], b_xs.shape[1]
    rows = torch.arange(b, device=x.device)[:, None]
    flat_a = a_xs.reshape(-1, c + 1)

    def pick(idx: torch.Tensor) -> torch.Tensor:  # rows of A, per image
        return flat_a.index_select(0, (idx + rows * n_a).reshape(-1)).reshape(b, -1, c + 1)

    merged = b_xs.reshape(-1, c + 1).index_add(0, (dst + rows * n_b).reshape(-1), pick(src).reshape(-1, c + 1)).reshape(b, n_b, c + 1)
    xs = torch.cat([cls_xs, pick(keep), merged], dim=1)
    size = xs[..., c:]
    return xs[..., :c] / size, size


__all__ = ["Matching", "bipartite_merge", "matching", "linear_share_removed", "max_merge", "merged_count", "merges_at", "tokens_per_block"]
