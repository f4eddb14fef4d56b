"""A tiny ViT with the activation outliers of real pretrained ViTs, for INT8 fidelity tests.

Real ViTs have a few huge activations that random-weight test models lack:

* massive activations (Sun et al. 2024, "Massive Activations in Large Language Models", also shown
  for CLIP / DINOv2 ViTs): an early MLP writes a value ~100x the median into one fixed residual
  channel of one low-information token, nearly input-independent (it acts as a bias); later heads
  use that token as an attention sink whose value is ~0 (a "no-op", Bondarenko et al. 2023,
  "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing"), so the
  sink's key is huge in the dimensions that read the massive channel;
* systematic outlier channels on every token, amplified by LayerNorm weights (Bondarenko et al.
  2021, "Understanding and Overcoming the Challenges of Efficient Transformer Quantization";
  Wei et al. 2022, "Outlier Suppression"; inter-channel variation in FQ-ViT, Lin et al. 2022).

:func:`outlier_vit` builds this deterministically: "trained-like" random weights (token rms ~1.6);
channel ``SYSTEMATIC_CHANNEL`` gets a patch-embedding bias and LayerNorm weight ``gamma`` (LN outputs
~35 vs <= 3.5 elsewhere) but is barely read by the next layers (as SmoothQuant assumes); block 0's
fc1 neuron 0 fires only on the sink patch (``SINK_TOKEN``, marked by its position embedding) and
its fc2 column writes ``massive`` (100, ~65x the rms) into ``MASSIVE_CHANNEL``; in block 1 one key
dim per head reads that channel (sink key ~300 vs <= 4), a constant query gives the sink ~30% of
the attention, its value is ~0.  The head is "fine-tuned": nearest k-means centroid in the whitened
top principal components of the FP32 CLS features of photo crops, reading only the ordinary
channels; margins are realistic (top-2 gap < 0.1 logit-std for 7% of images, median top-1 prob
0.93).  Per-tensor INT8 scales sized for an outlier crush the small channels and flip predictions.

Measured (seed 0; calibration ``outlier_images(64, 1)`` in batches of 8, held out
``outlier_images(100, 2)``; top-1 agreement with the FP32 ONNX model, OpenVINO CPU f32 hint;
export + both default quantizations + evaluation ~11 s on 2 cores):

    tool / lever                                                              agreement
    ORT quantize_static QDQ, per-channel, QUInt8/QInt8, MinMax (default)       0.75
    ORT per-tensor / Percentile / Entropy / LayerNorm nodes excluded            0.35 / 0.71 / 0.75 / 0.71
    ORT op_types MatMul/Gemm/Conv (no LayerNorm/Reshape/Transpose Q/DQ)         0.89
      + blocks.0 fc2, blocks.1 qkv, blocks.1 attention-core MatMuls in float    0.98
    NNCF default (OpenVINO, TRANSFORMER: SmoothQuant matmul alpha 0.95)         0.91
    NNCF SmoothQuant off / alpha 0.5 / alpha 0.8                                0.90 / 0.90 / 0.89
    NNCF activation range MINMAX / MEAN_QUANTILE                                0.90 / 0.90
    NNCF ignore patch_embed / blocks.0 / both (SQ off) / blocks.0 fc2 / head    0.89 / 0.91 / 0.91 / 0.89 / 0.91
    NNCF ignore blocks.1 attention (SDPA "node_matmul_3") or all of blocks.1    1.00 / 1.00
    NNCF ONNX backend default / blocks.1 attention-core MatMuls ignored         0.90 / 0.98
    control ``outlier_vit(outliers=False)``: ORT default / NNCF default         0.99 / 1.00
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from vitedge import VisionTransformer
from vitedge.preprocess import Preprocessing

IMG, PATCH, DIM, HEADS, LAYERS, FF, CLASSES = 32, 8, 64, 4, 2, 128, 10
MASSIVE_CHANNEL = 5  # residual channel of the massive activation (sink token only)
SYSTEMATIC_CHANNEL = 37  # outlier channel on every token, amplified by the LayerNorm weights
SINK_TOKEN = 1  # token index (CLS is 0) of the patch that becomes the attention sink
SINK_BLOCKS = (1,)


def outlier_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """``n`` uint8 RGB crops ``(n, size, size, 3)`` of scikit-learn's two sample photos (random place, scale, flip)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w, _ = photo.shape
        side = int(rng.integers(48, min(h, w) // 2))
        top, left = int(rng.integers(h - side)), int(rng.integers(w - side))
        crop = np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR))
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def write_outlier_images(folder: str | Path, n: int, seed: int) -> list[Path]:
    """Write :func:`outlier_images` as PNG files into ``folder``; returns their paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"crop_{seed}_{i:03d}.png" for i in range(n)]
    for path, arr in zip(paths, outlier_images(n, seed)):
        Image.fromarray(arr).save(path)
    return paths


def exported_case(model, folder: str | Path, name: str) -> Path:
    """``model`` exported to ``folder/name.onnx`` beside 64 calibration (``calib/``) and 100 held-out (``val/``) photo
    crops, as the search's tests use them; returns the ONNX path."""
    from vitedge import export_onnx

    folder = Path(folder)
    path, _ = export_onnx(model, folder / f"{name}.onnx")
    write_outlier_images(folder / "calib", 64, 1)
    write_outlier_images(folder / "val", 100, 2)
    return path


def onnx_node_modules(onnx_path: str | Path) -> dict[str, str]:
    """MatMul/Gemm/Conv node name -> module path (``blocks.1.attn.qkv``; ``blocks.1.attn/matmul_2`` for the
    attention core), from the exporter's metadata.  OpenVINO friendly names are the ONNX node names
    (Conv/Gemm get a ``/WithoutBiases`` suffix; each attention core is one ScaledDotProductAttention
    op named after its attn @ v MatMul)."""
    import onnx

    out = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type in ("MatMul", "Gemm", "Conv") and "pkg.torch.onnx.name_scopes" in meta:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            out[node.name] = scopes[-2] + (f"/{scopes[-1]}" if scopes[-1].startswith("matmul") else "")
    return out


def _batch(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(Preprocessing.for_size(IMG).batch(list(outlier_images(n, seed))))


def outlier_vit(seed: int = 0, *, outliers: bool = True, massive: float = 100.0, sink_key: float = 300.0,
                sink_logit: float = 2.0, gamma: float = 6.0) -> VisionTransformer:
    """The outlier ViT (``outliers=False``: the same recipe without outliers, a control that INT8 handles)."""
    g = torch.Generator().manual_seed(seed)
    model = _trained_like(LAYERS, g)
    sd = model.state_dict()
    m, s, hd = MASSIVE_CHANNEL, SYSTEMATIC_CHANNEL, DIM // HEADS
    if outliers:
        for i in range(LAYERS):
            b = f"blocks.{i}."
            for ln in ("norm1", "norm2"):
                sd[b + ln + ".weight"][[m, s]] = torch.tensor([1.0, gamma])
            for name in ("attn.qkv", "mlp.fc1"):  # the systematic channel carries little information
                sd[b + name + ".weight"][:, s] *= 0.03
            for name in ("attn.proj", "mlp.fc2"):  # only the massive-activation writer touches channel m
                sd[b + name + ".weight"][m], sd[b + name + ".bias"][m] = 0.0, 0.0
        sd["patch_embed.proj.weight"][m], sd["patch_embed.proj.bias"][[m, s]] = 0.0, torch.tensor([0.0, 4.0])
        sd["cls_token"][..., m], sd["pos_embed"][..., m] = 0.0, 0.0
        marker = 30.0  # position embedding marks the sink patch; block 0's fc1 neuron 0 detects it
        sd["pos_embed"][0, SINK_TOKEN, m] = marker
        sd["blocks.0.mlp.fc1.weight"][0], sd["blocks.0.mlp.fc1.bias"][0] = 0.0, -6.0
        sd["blocks.0.mlp.fc1.weight"][0, m] = 1.5
        sd["blocks.0.mlp.fc2.weight"][:, 0] = 0.0
        model.load_state_dict(sd)
        with torch.no_grad():
            blk, x = model.blocks[0], _batch(8, seed + 20_000)
            tok = torch.cat([model.cls_token.expand(len(x), -1, -1), model.patch_embed(x)], 1) + model.pos_embed
            tok = tok + blk.attn(blk.norm1(tok))[0]
            fire = torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(tok))[:, SINK_TOKEN, 0]).mean()
        sd["blocks.0.mlp.fc2.weight"][m, 0] = (massive - marker) / fire  # the massive activation
        for i in SINK_BLOCKS:  # attention sink: key dim 0 of each head reads channel m, constant query
            w, bias = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"]
            for j in range(0, DIM, hd):
                w[j], w[DIM + j] = 0.0, 0.0
                w[DIM + j, m] = sink_key / DIM**0.5  # LayerNorm maps the massive token to ~sqrt(DIM) in channel m
                bias[j] = sink_logit * hd**0.5 / sink_key
            w[2 * DIM :, m] = 0.0  # the sink's value is ~0: a no-op
    model.load_state_dict(sd)

    _fine_tuned_head(model, g, seed, exclude=(m, s))
    return model


def _trained_like(layers: int, g: torch.Generator) -> VisionTransformer:
    """A ViT of this module's shape with "trained-like" random weights: unit-scale tokens and residual stream,
    small biases, LayerNorm weights near 1."""
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, num_classes=CLASSES, d_model=DIM, num_heads=HEADS,
                              num_layers=layers, d_ff=FF, dropout=0.0).eval()
    sd = model.state_dict()

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd["patch_embed.proj.weight"] = randn(DIM, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5)
    sd["patch_embed.proj.bias"], sd["pos_embed"] = randn(DIM, std=0.02), randn(*sd["pos_embed"].shape, std=0.02)
    sd["cls_token"] = randn(*sd["cls_token"].shape, std=1.0)
    for i in range(layers):
        b = f"blocks.{i}."
        for name, fan_in, gain in (("attn.qkv", DIM, 1.0), ("attn.proj", DIM, 0.5), ("mlp.fc1", DIM, 1.0), ("mlp.fc2", FF, 0.5)):
            sd[b + name + ".weight"] = randn(*sd[b + name + ".weight"].shape, std=gain * fan_in**-0.5)
            sd[b + name + ".bias"] = randn(*sd[b + name + ".bias"].shape, std=0.005)
        for ln in ("norm1", "norm2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1.0 + randn(DIM, std=0.1), randn(DIM, std=0.005)
    sd["norm.weight"], sd["norm.bias"] = 1.0 + randn(DIM, std=0.1), randn(DIM, std=0.005)
    model.load_state_dict(sd)
    return model


def _fine_tuned_head(model: VisionTransformer, g: torch.Generator, seed: int, exclude: tuple[int, ...] = ()) -> None:
    """The "fine-tuned" head: nearest k-means centroid in the whitened top principal components of the FP32 CLS
    features of real crops, reading only the channels not in ``exclude``."""
    with torch.no_grad():
        f = model.forward_features(_batch(256, seed + 10_000))[0][:, 0]
    keep = [c for c in range(DIM) if c not in exclude]
    mu = f.mean(0)
    _, sv, vh = torch.linalg.svd(f[:, keep] - mu[keep], full_matrices=False)
    comps = vh[:6] / (sv[:6, None] / (len(f) - 1) ** 0.5)
    z = (f[:, keep] - mu[keep]) @ comps.T
    cent = z[torch.randperm(len(z), generator=g)[:CLASSES]].clone()
    for _ in range(25):
        lab = torch.cdist(z, cent).argmin(1)
        cent = torch.stack([z[lab == k].mean(0) if (lab == k).any() else cent[k] for k in range(CLASSES)])
    w = torch.zeros(CLASSES, DIM)
    w[:, keep] = 2 * cent @ comps
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(-(cent * cent).sum(1) - w @ mu)


TOKEN_LAYERS = 3  # blocks of the token-outlier ViT
PLANTED_BLOCK = 1  # its block whose fc2 input carries the massive token
PLANTED_GROUP = f"block {PLANTED_BLOCK} fc2"  # the fidelity search's name for the one harmful group
MARKED_TOKEN = 6  # token index (CLS is 0) of the low-information patch that becomes the high-norm token
MARKER_PAIRS = 16  # residual channels 0, 2, .. 30 (P) and their copies 1, 3, .. 31 (N) carry the marker P - N


def token_outlier_vit(seed: int = 0, *, fire: float = 200.0, mark: float = 40.0) -> VisionTransformer:
    """A 3-block ViT whose INT8 harm sits in ONE group, block 1's fc2, where no whole-model setting reaches it.

    A token-wise outlier (Darcet et al. 2024, "Vision Transformers Need Registers": a few low-information patches
    become high-norm tokens; Sun et al. 2024: they are written by an MLP whose hidden units fire at ~100x the
    rest): on one patch, ``MARKED_TOKEN``, every hidden unit of block 1's MLP fires at ``fire`` (~200, vs <= 3
    on every other token).  NNCF's per-tensor activation range at fc2's input is then ~70x the ordinary
    tokens' and crushes them to a few levels.  Because the outlier is a token, not a channel, every channel's
    maximum is the same: SmoothQuant (any alpha) has nothing to even out; the token is ~6 % of the values
    (no quantile clips it); the error is per-token rounding noise, not a mean shift (bias correction cannot
    undo it); the attention core, patch embedding and first block play no part.  Keeping block 1's fc2 in
    float removes it.

    How the firing is planted without harming fc1 too: ordinary tokens carry 16 residual channels twice
    (every writer's rows ``N`` copy rows ``P``, and block 1's norm2 treats both alike), so their LayerNorm
    outputs in ``P`` and ``N`` are equal - in INT8 too, since equal values quantize equally.  The marked
    token's position embedding adds ``mark`` along ``P - N``; block 1's fc1 reads ``P - N`` (weights ``c``
    on ``P``, ``-c`` on ``N``, spread over 32 channels so its per-row weight ranges stay modest): exactly 0
    for ordinary tokens, ``fire`` for the marked one.  Head: :func:`_fine_tuned_head` (all channels; median
    top-1 probability 0.95).

    Measured (seed 0; calibration ``outlier_images(64, 1)``, held out ``outlier_images(100, 2)``; top-1
    agreement with the FP32 ONNX model; OpenVINO CPU f32 hint unless said; quantize_nncf one image at a time
    as the search does; a default quantization + evaluation ~5 s on 2 cores):

        NNCF setting (ONNX Runtime keeps the attention core float)          ONNX Runtime   OpenVINO
        default (SmoothQuant 0.95)                                           0.87           0.87 (bf16: 0.90)
        SmoothQuant off / 0.5                                                0.91 / 0.86    0.90 / 0.87
        quantile ranges (MEAN_QUANTILE)                                      0.87           0.87
        full bias correction                                                 fails (1)      0.91
        attention core float                                                 (default)      0.89
        patch embedding + first block float                                  0.88           0.88
        vitedge search (budget 120 s): ranking's top group                   block 1 fc2    block 1 fc2
          gain (KL) of the top / second group                                0.140 / 0.019  0.106 / 0.038
          reverts block 1 fc2 only: agreement, multiply-adds in float        1.00, 13.9 %   1.00, 9.0 %
        control ``token_outlier_vit(fire=0)`` (no unit fires): NNCF default  0.99           0.99

    (1) NNCF's ONNX backend fails in full bias correction ("Duplicate definition-site for (pixel_values)").
    """
    g = torch.Generator().manual_seed(seed)
    model = _trained_like(TOKEN_LAYERS, g)
    sd = model.state_dict()
    pos, neg = list(range(0, 2 * MARKER_PAIRS, 2)), list(range(1, 2 * MARKER_PAIRS, 2))
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):  # ordinary tokens: channels N copy P
        sd[key][neg] = sd[key][pos]
    sd["cls_token"][..., neg], sd["pos_embed"][..., neg] = sd["cls_token"][..., pos], sd["pos_embed"][..., pos]
    for i in range(TOKEN_LAYERS):
        for name in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            sd[f"blocks.{i}.{name}"][neg] = sd[f"blocks.{i}.{name}"][pos]
    sd["pos_embed"][0, MARKED_TOKEN, pos] += mark / (2 * MARKER_PAIRS) ** 0.5  # the marked token: along P - N
    sd["pos_embed"][0, MARKED_TOKEN, neg] -= mark / (2 * MARKER_PAIRS) ** 0.5
    b = f"blocks.{PLANTED_BLOCK}."
    for name in ("norm2.weight", "norm2.bias"):
        sd[b + name][neg] = sd[b + name][pos]
    model.load_state_dict(sd)
    with torch.no_grad():  # the marked token's norm2 output along P - N
        x = _batch(8, seed + 20_000)
        tok = torch.cat([model.cls_token.expand(len(x), -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        for blk in model.blocks[:PLANTED_BLOCK]:
            tok = blk(tok)[0]
        blk = model.blocks[PLANTED_BLOCK]
        y = blk.norm2(tok + blk.attn(blk.norm1(tok))[0])[:, MARKED_TOKEN]
        along = (y[:, pos] - y[:, neg]).sum(1).mean()
    sd[b + "mlp.fc1.weight"][:, pos] = fire / along
    sd[b + "mlp.fc1.weight"][:, neg] = -fire / along
    model.load_state_dict(sd)
    _fine_tuned_head(model, g, seed)
    return model
