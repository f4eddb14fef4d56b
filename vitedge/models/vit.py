"""The classic Vision Transformer (Dosovitskiy et al., 2020), written to export cleanly.

Layout mirrors timm's ``VisionTransformer`` so that its state dicts map one to one:
``patch_embed.proj`` (stride-P conv), ``cls_token``, ``pos_embed``, ``blocks.N`` (pre-norm
attention + GELU MLP with residuals), ``norm`` and ``head`` on the CLS token.

The default ``forward`` is plain tensor algebra (MatMul / Softmax / LayerNorm / Gelu) so every
exporter and backend sees the same simple graph.  ``forward(x, return_attention=True)`` also
returns the attention maps, per layer, as ``(batch, heads, tokens, tokens)`` tensors.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .tome import bipartite_merge, merges_at


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to rebuild a :class:`VisionTransformer`."""

    img_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    d_model: int = 768
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    layer_scale: bool = False  # per-channel scales on both residual branches (DeiT III / DINOv2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViT config keys: {', '.join(unknown)}")
        return cls(**data)


# name -> (d_model, num_heads, num_layers, d_ff); all patch 16.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny": (192, 3, 12, 768),
    "vit_small": (384, 6, 12, 1536),
    "vit_base": (768, 12, 12, 3072),
    "vit_large": (1024, 16, 24, 4096),
    "vit_huge": (1280, 16, 32, 5120),
}


def preset_config(name: str, **overrides) -> ViTConfig:
    """Config of a named preset (``vit_tiny`` ... ``vit_huge``), with optional overrides."""
    key = name.replace("-", "_").lower()
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d, h, n, ff = PRESETS[key]
    return ViTConfig(**{"patch_size": 16, "d_model": d, "num_heads": h, "num_layers": n, "d_ff": ff, **overrides})


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, d_model: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)
        self.split: nn.ModuleList | None = None  # see split_qkv

    @property
    def split_qkv(self) -> bool:
        return self.split is not None

    @split_qkv.setter
    def split_qkv(self, on: bool) -> None:
        """For export: Q, K and V as three projections (copies of the qkv weights), each reshaped to (B, H, N, hd)
        on its own.  Exact; the runtimes then see the plain Transpose-MatMul-Softmax-MatMul attention pattern,
        without the 5-D permute and gathers of the fused output.  Eager PyTorch keeps the one fused GEMM."""
        if not on:
            self.split = None
            return
        d, bias = self.qkv.in_features, self.qkv.bias is not None
        lins = [nn.Linear(d, d, bias=bias) for _ in range(3)]
        parts = nn.ModuleList(lins).to(self.qkv.weight)  # moves the Linears themselves
        with torch.no_grad():
            for i, lin in enumerate(lins):
                lin.weight.copy_(self.qkv.weight[i * d : (i + 1) * d])
                if self.qkv.bias is not None:
                    lin.bias.copy_(self.qkv.bias[i * d : (i + 1) * d])
        self.split = parts

    def _project(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Query (0), key (1) or value (2) of ``x`` as (B, H, N, hd), from the split projections."""
        assert self.split is not None, "split_qkv is off"
        b, n, _ = x.shape
        return self.split[i](x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, return_attention: bool = False, cls_only: bool = False, size: torch.Tensor | None = None):
        """Returns ``(out, attention maps or None, keys averaged over heads)``.

        ``cls_only``: attend from the CLS token only (every token is still a key and a value), so the
        output has one token; exact for the CLS token's row.  ``size`` (B, N, 1): patches each token
        stands for after token merging; adds ``log(size)`` to the logits (ToMe's proportional attention)."""
        b, n, d = x.shape
        if self.split_qkv:  # (with cls_only, the query of the CLS token only)
            q, k, v = self._project(x[:, :1] if cls_only else x, 0), self._project(x, 1), self._project(x, 2)
        else:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        if cls_only:
            q, n = q[:, :, :1], 1  # (a no-op for split projections)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if size is not None:
            logits = logits + size.log().transpose(1, 2)[:, None]  # (B, 1, 1, N)
        attn = logits.softmax(dim=-1)
        out = self.attn_drop(attn) @ v
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
        return out, (attn if return_attention else None), k.mean(dim=1)


class Mlp(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (timm's ``LayerScale``: parameter ``gamma``)."""

    def __init__(self, d_model: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d_model,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)) (each branch scaled by
    ``ls1`` / ``ls2`` when the config has ``layer_scale``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.qkv_bias, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.ls1 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()
        self.ls2 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False, cls_only: bool = False, merge: int = 0, size: torch.Tensor | None = None):
        """Returns ``(x, attention maps or None, size)``.  ``merge`` > 0: merge that many tokens between
        the attention and the MLP (token merging, :mod:`vitedge.models.tome`); ``size`` tracks how many
        patches each token stands for (``None`` until the first merge)."""
        y, attn, keys = self.attn(self.norm1(x), return_attention, cls_only, size)
        x = (x[:, :1] if cls_only else x) + self.ls1(y)
        if merge and not cls_only:
            x, size = bipartite_merge(x, size, keys, merge)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, attn, size


CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic kernel parameter


def bicubic_weights(n_in: int, n_out, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` weights that resample a length-``n_in`` axis to ``n_out`` exactly as
    ``F.interpolate(mode="bicubic", align_corners=False)`` does (half-pixel source coordinates, kernel
    :data:`CUBIC_A`, taps beyond the border clamped to it, no antialiasing).  ``n_out`` may be symbolic (an
    export with dynamic sizes): the weights are then built in the graph from a few element-wise ops."""
    dst = torch.arange(n_out, dtype=torch.float32)
    src = (dst + 0.5) * n_in / n_out - 0.5
    first = torch.floor(src)
    t = src - first

    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    index = torch.arange(n_in)
    start = first.to(torch.int64) - 1
    weights = torch.zeros((), dtype=torch.float32)
    for k, w in enumerate(taps):
        at = torch.clamp(start + k, 0, n_in - 1)
        weights = weights + w[:, None] * (at[:, None] == index[None, :]).to(torch.float32)
    return weights.to(dtype)


class VisionTransformer(nn.Module):
    """ViT classifier.  Accepts any input size divisible by ``patch_size``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        d_model: int = 768,
        num_heads: int = 12,
        num_layers: int = 12,
        d_ff: int = 3072,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        layer_scale: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.config = ViTConfig(
            img_size,
            patch_size,
            in_channels,
            num_classes,
            d_model,
            num_heads,
            num_layers,
            d_ff,
            dropout,
            layer_norm_eps,
            qkv_bias,
            layer_scale,
        )
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_channels, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d_model))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.cls_only_last_block = False  # see forward_features; export turns it on
        self.merge_tokens = 0  # token merging: tokens merged per block (lossy, opt-in; see tome.py)
        self.merge_every = 1  # ... in every this-many-th block (tome.merges_at)
        self._init_weights()

    @classmethod
    def from_config(cls, cfg: ViTConfig) -> VisionTransformer:
        return cls(**cfg.to_dict())

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a ``grid_h x grid_w`` patch grid (bicubic, CLS kept).

        Traced with symbolic sizes (a dynamic-size export), the interpolation is always in the graph: one graph
        serves every size, and at the trained size bicubic interpolation gives the table back.  Comparing the
        sizes there would make the exporter specialise the graph to the traced size."""
        pos = self.pos_embed
        n_trained = pos.shape[1] - 1
        side = int(math.isqrt(n_trained))
        if side * side != n_trained:
            raise ValueError(f"trained position embedding of {n_trained} patches is not a square grid")
        symbolic = isinstance(grid_h, torch.SymInt) or isinstance(grid_w, torch.SymInt)
        if not symbolic and (grid_h, grid_w) == (side, side):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        d = pos.shape[-1]
        # bicubic as two small matrix products (rows, then columns): a graph Resize of the table costs ONNX Runtime
        # milliseconds per inference (measured: 16 ms of a ViT-S's 140 at 288 px), these microseconds
        rows, cols = bicubic_weights(side, grid_h, pos.dtype), bicubic_weights(side, grid_w, pos.dtype)
        by_rows = torch.matmul(rows, patch_pos.reshape(side, side * d)).reshape(grid_h, side, d)
        patch_pos = torch.matmul(cols, by_rows).reshape(1, grid_h * grid_w, d)  # (grid_h, grid_w, d): row-major patches
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        p = self.config.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not divisible by the patch size {p}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_embed(h // p, w // p)
        x = self.pos_drop(x)
        maps, size = [], None
        last = len(self.blocks) - 1
        merges = merges_at(len(self.blocks), self.merge_every)
        for i, blk in enumerate(self.blocks):
            # the classifier reads the CLS token only: the last block needs to run its attention output,
            # MLP and norm for that one token (an exact saving, used by export).  The last block never
            # merges: CLS is never merged, so merging there cannot change the output.
            cls_only = self.cls_only_last_block and i == last and not return_attention
            x, attn, size = blk(x, return_attention, cls_only=cls_only, merge=self.merge_tokens if merges[i] else 0, size=size)
            if return_attention:
                maps.append(attn)
        return self.norm(x), maps

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        feats, maps = self.forward_features(x, return_attention)
        logits = self.head(feats[:, 0])
        return (logits, maps) if return_attention else logits


@contextlib.contextmanager
def graph_options(model, *, cls_only: bool = False, merge: int = 0, merge_every: int = 1, split_qkv: bool = False):
    """Set a :class:`VisionTransformer`'s graph options for the duration (restored afterwards): the last block
    computed for the CLS token only, ``merge`` tokens merged in every ``merge_every``-th block, Q/K/V as three projections.  Export
    turns them on; any other module passes through unchanged."""
    if not isinstance(model, VisionTransformer):
        yield
        return
    attns = [blk.attn for blk in model.blocks if isinstance(blk, Block)]  # all are; ModuleList types its items as Module
    saved = model.cls_only_last_block, model.merge_tokens, model.merge_every, [a.split_qkv for a in attns]
    model.cls_only_last_block, model.merge_tokens, model.merge_every = cls_only, merge, merge_every
    for a in attns:
        a.split_qkv = split_qkv
    try:
        yield
    finally:
        model.cls_only_last_block, model.merge_tokens, model.merge_every = saved[:3]
        for a, split in zip(attns, saved[3], strict=True):
            a.split_qkv = split


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a preset with random weights (for trials; train or load weights for real use)."""
    return VisionTransformer.from_config(preset_config(name, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ViTConfig", "VisionTransformer", "PRESETS", "graph_options", "preset_config", "create_model", "count_parameters"]
