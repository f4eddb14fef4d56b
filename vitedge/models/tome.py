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
"""

from __future__ import annotations

import torch


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
    b, n, _ = x.shape
    r = merged_count(n, r)
    if size is None:
        size = torch.ones(b, n, 1, dtype=x.dtype, device=x.device)
    if r == 0:
        return x, size
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    cls_x, a_x, b_x = x[:, :1], x[:, 2::2], x[:, 1::2]
    cls_s, a_s, b_s = size[:, :1], size[:, 2::2], size[:, 1::2]
    scores = metric[:, 2::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
    best, match = scores.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values  # merged A tokens / kept A tokens, in order
    dst = match.gather(1, src)  # where each merged token goes in B
    # Rows are picked and added through flat indices into (B * tokens, C): the export then has Gather and
    # ScatterND (reduction add) on whole rows, instead of GatherElements/ScatterElements whose indices are
    # first broadcast to every channel (in an OpenVINO profile of ViT-B at r = 8 that broadcast and the
    # element-wise gathers took ~3.4 ms per inference; the flat form ~0.8 ms).
    n_a, n_b = a_x.shape[1], b_x.shape[1]
    rows = torch.arange(b, device=x.device)[:, None]
    flat_dst = (dst + rows * n_b).reshape(-1)

    def pick(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # values: (B, |A|, C)
        c = values.shape[-1]
        return values.reshape(-1, c).index_select(0, (idx + rows * n_a).reshape(-1)).reshape(b, -1, c)

    def add_into_b(b_values: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        c = b_values.shape[-1]
        return b_values.reshape(-1, c).index_add(0, flat_dst, moved.reshape(-1, c)).reshape(b, n_b, c)

    # a merged token is the size-weighted mean of its parts: sum (x * size) and size, divide once
    sum_s = add_into_b(b_s, pick(a_s, src))
    sum_x = add_into_b(b_x * b_s, pick(a_x * a_s, src))
    x = torch.cat([cls_x, pick(a_x, keep), sum_x / sum_s], dim=1)
    size = torch.cat([cls_s, pick(a_s, keep), sum_s], dim=1)
    return x, size


__all__ = ["bipartite_merge", "linear_share_removed", "max_merge", "merged_count", "merges_at", "tokens_per_block"]
