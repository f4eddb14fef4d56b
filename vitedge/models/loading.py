"""Load a trained ViT from local files into a :class:`ModelSpec`.  Nothing is ever downloaded.

Preprocessing is resolved by :func:`vitedge.preprocessing_resolver.resolve_preprocessing` (timm
config, then Hugging Face preprocessor config, then vitedge's own, else the default rule).

Supported sources (tried in this order):

* a preset name (``vit_tiny`` ... ``vit_huge``): random weights, for trials and speed tests;
* a ``torch.nn.Module`` (Python API only);
* vitedge's own checkpoint: a ``.safetensors`` file whose metadata carries the config,
  preprocessing and labels (written by :func:`save_checkpoint`);
* a timm-style ViT/DeiT state dict (``.pth``/``.pt``/``.bin``/``.safetensors``), with or without
  LayerScale (``blocks.N.ls1/ls2.gamma``, DeiT III / DINOv2 style): config inferred from tensor
  shapes; preprocessing from timm's ``config.json`` next to it (or a folder holding both) or a
  ``pretrained_cfg`` embedded in it;
* a Hugging Face ``ViTForImageClassification`` folder (``config.json`` + weights, optional
  ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_output
from ..errors import FileProblem, ModelNotSupported, VitedgeError, did_you_mean
from ..preprocess import Preprocessing
from ..preprocessing_resolver import is_timm_config, resolve_preprocessing, sources_near
from .vit import PRESETS, VisionTransformer, ViTConfig, preset_config

CHECKPOINT_METADATA_KEY = "vitedge"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_CHECKPOINT = ASSETS / "digits_vit.safetensors"  # trained by scripts/train_reference.py


@dataclass
class ModelSpec:
    """A PyTorch model plus everything needed to deploy it."""

    model: nn.Module
    preprocessing: Preprocessing
    config: ViTConfig | None = None  # None for a generic nn.Module
    labels: list[str] | None = None
    source: str = "<module>"
    notes: list[str] = field(default_factory=list)  # what the loader had to assume
    # the configs the preprocessing was resolved from (resolve_preprocessing keywords), to resolve it
    # again at another img_size; None = only ``preprocessing`` itself is known
    preprocessing_sources: dict | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes if self.config else (len(self.labels) if self.labels else None)

    def model_info(self) -> dict:
        info: dict[str, Any] = {"family": "vit" if self.config else "module", "source": self.source}
        if self.config:
            info["config"] = self.config.to_dict()
        return info


# ------------------------------------------------------------------------------------------
# vitedge checkpoint
# ------------------------------------------------------------------------------------------
def save_checkpoint(spec: ModelSpec, path: str | Path) -> Path:
    """Write weights + config + preprocessing + labels as one ``.safetensors`` file."""
    from safetensors.torch import save_file

    if spec.config is None:
        raise VitedgeError("only vitedge VisionTransformer models can be saved as vitedge checkpoints")
    meta = {
        "config": spec.config.to_dict(),
        "preprocessing": spec.preprocessing.to_dict(),
        "labels": spec.labels,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in spec.model.state_dict().items()}
    path = Path(path)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={CHECKPOINT_METADATA_KEY: json.dumps(meta)})
    return path


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else f"{type(exc).__name__}, empty or truncated file"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileProblem(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    return tensors, meta


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata (vitedge's, or an embedded timm ``pretrained_cfg`` as a dict)."""
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        if isinstance(meta.get("pretrained_cfg"), str):
            try:
                meta["pretrained_cfg"] = json.loads(meta["pretrained_cfg"])
            except json.JSONDecodeError:
                raise FileProblem(f"{path}: the pretrained_cfg in its metadata is not valid JSON") from None
        return sd, meta
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise FileProblem(f"{path} cannot be opened ({exc.strerror or exc})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch zip archive / legacy pickle
        raise FileProblem(
            f"{path} is not a PyTorch file (neither a torch.save zip archive nor a pickle; empty or corrupt?)",
            "save weights with torch.save(model.state_dict(), path) or as .safetensors",
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/pickled files
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise VitedgeError(
                f"{path} holds pickled Python objects{what}, not just tensors; vitedge does not unpickle code",
                "save model.state_dict() instead of the whole model, or use .safetensors",
            ) from None
        raise FileProblem(
            f"{path} cannot be read as a PyTorch state dict ({_first_line(exc)})",
            "save weights with torch.save(model.state_dict(), path) or as .safetensors",
        ) from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("pretrained_cfg"), dict):  # timm config saved with the weights
        meta["pretrained_cfg"] = obj["pretrained_cfg"]
        obj = {k: v for k, v in obj.items() if k != "pretrained_cfg"}
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitedgeError(f"{path} does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP
    if sd and all(k.startswith("model.") for k in sd):  # e.g. a Lightning module holding the ViT as self.model
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    return sd, meta


# ------------------------------------------------------------------------------------------
# timm layout
# ------------------------------------------------------------------------------------------
_HEAD_DIM_BY_WIDTH = {1280: 80}  # ViT-H/14 uses 16 heads of 80; the other standard sizes use 64


def _infer_timm_config(sd: dict[str, torch.Tensor], path: Path, num_heads: int | None) -> tuple[ViTConfig, list[str]]:
    notes = []
    for unsupported, what in (
        ("dist_token", "distilled DeiT (two heads)"),
        ("reg_token", "ViT with register tokens"),
        ("fc_norm.weight", "global-pool ViT (no CLS head)"),
        ("norm_pre.weight", "CLIP-style ViT"),
        ("blocks.0.attn.q_norm.weight", "ViT with QK-norm"),
        ("attn_pool.latent", "attention-pool ViT (no CLS head)"),
    ):
        if unsupported in sd:
            raise ModelNotSupported(f"{path} is a {what}, which is not the classic ViT vitedge supports", "use a CLS-token ViT/DeiT checkpoint")
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"):
        if key not in sd:
            raise VitedgeError(f"{path} has a patch embedding but no {key}", "expected timm ViT blocks (blocks.N.attn.qkv, blocks.N.mlp.fc1 ...)")
    if sd["pos_embed"].ndim != 3 or sd["patch_embed.proj.weight"].ndim != 4:
        raise VitedgeError(
            f"{path}: pos_embed {tuple(sd['pos_embed'].shape)} / patch_embed.proj.weight "
            f"{tuple(sd['patch_embed.proj.weight'].shape)} are not the (1, tokens, D) / (D, C, P, P) of a ViT"
        )
    w = sd["patch_embed.proj.weight"]
    d_model, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    if w.shape[2] != w.shape[3]:
        raise ModelNotSupported(f"{path}: non-square patches {tuple(w.shape[2:])} are not supported")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise VitedgeError(f"{path} has a patch embedding but no 'blocks.N' encoder layers")
    n_tokens = sd["pos_embed"].shape[1]
    grid = int(round((n_tokens - 1) ** 0.5))
    if grid * grid != n_tokens - 1:
        raise VitedgeError(f"{path}: pos_embed of {n_tokens} tokens is not CLS + a square patch grid")
    if num_heads is None:
        head_dim = _HEAD_DIM_BY_WIDTH.get(d_model, 64)
        if d_model % head_dim:
            raise VitedgeError(f"{path}: cannot guess the number of heads for width {d_model}", "pass num_heads= to load_model")
        num_heads = d_model // head_dim
        notes.append(f"num_heads={num_heads} assumed from width {d_model} (pass num_heads to override)")
    elif num_heads < 1 or d_model % num_heads:
        raise VitedgeError(f"{path}: width {d_model} is not divisible by num_heads={num_heads}")
    head = sd.get("head.weight")
    cfg = ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_channels=in_ch,
        num_classes=head.shape[0] if head is not None else 0,
        d_model=d_model,
        num_heads=num_heads,
        num_layers=len(layers),
        d_ff=sd["blocks.0.mlp.fc1.weight"].shape[0],
        dropout=0.0,
        layer_norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,  # DeiT III / DINOv2: ls1/ls2.gamma in every block
    )
    return cfg, notes


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(f"{path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict):
        raise VitedgeError(f"{path} is not a model config (a JSON object)")
    return cfg


def _timm_weights(folder: Path) -> Path:
    """The weights file of a timm folder (hub layout: config.json + model.safetensors / pytorch_model.bin)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"))
    if len(found) != 1:
        what = "no weights file" if not found else f"{len(found)} weights files ({', '.join(p.name for p in found[:3])})"
        raise FileProblem(f"timm folder {folder} has {what}", "keep one model.safetensors (or .pth) next to config.json, or pass the file")
    return found[0]


# ------------------------------------------------------------------------------------------
# Hugging Face layout
# ------------------------------------------------------------------------------------------
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    # saved files (transformers 4.x, and 5.x save_pretrained, which writes the 4.x names)
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    # transformers 5.x in-memory names (torch.save(model.state_dict()) of a 5.x model)
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
# q/k/v, fused into timm's qkv: 4.x "attention.attention.query" (older: "attention.self.query"),
# 5.x in memory "layers.N.attention.q_proj".
_HF_QKV = re.compile(
    r"^(?:encoder\.layer\.(\d+)\.attention\.(?:attention|self)\.(query|key|value)"
    r"|layers\.(\d+)\.attention\.(q|k|v)_proj)\.(weight|bias)$"
)
_QKV_NAME = {"q": "query", "k": "key", "v": "value"}


def hf_to_timm(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename HF ViT keys (transformers 4.x and 5.x) to the timm layout, fusing q/k/v."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        k = key.removeprefix("vit.")
        if k.startswith("pooler."):
            continue  # ViTModel's pooler is unused by the classifier
        if m := _HF_QKV.match(k):
            layer = int(m.group(1) or m.group(3))
            part = m.group(2) or _QKV_NAME[m.group(4)]
            qkv.setdefault((layer, m.group(5)), {})[part] = t
            continue
        for pat, rep in _HF_RENAMES:
            new, n = re.subn(pat, rep, k)
            if n:
                out[new] = t
                break
        else:
            raise VitedgeError(f"{path}: unexpected Hugging Face key {key!r}", "only ViTForImageClassification / ViTModel checkpoints are supported")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise VitedgeError(f"{path}: layer {layer} lacks one of query/key/value {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def _hf_preprocessing(folder: Path, img_size: int) -> tuple[Preprocessing, list[str], dict]:
    path = folder / "preprocessor_config.json"
    if not path.exists():
        note = "no preprocessor_config.json: assumed ViTImageProcessor defaults (resize to size, bilinear, mean=std=0.5)"
        return resolve_preprocessing(img_size, hf={}), [note], {"hf": {}}
    try:
        cfg = json.loads(path.read_text())
        return preprocessing_from_hf(cfg, img_size), [], {"hf": cfg}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise VitedgeError(f"{path} is not a valid image-processor config ({type(exc).__name__}: {exc})") from None


def preprocessing_from_hf(cfg: dict, img_size: int) -> Preprocessing:
    """Preprocessing equal to a Hugging Face image-processor config (ViTImageProcessor and kin)."""
    return resolve_preprocessing(img_size, hf=cfg)


def _hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a save_pretrained folder (single file or sharded with an index)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            sd, _ = _read_state_dict(folder / name)
            return sd, folder / name
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
                raise VitedgeError(f"{index} is not a valid weight index ({type(exc).__name__}: {exc})") from None
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).exists():
                    raise FileProblem(f"{index} names shard {shard}, which is missing from {folder}")
                merged.update(_read_state_dict(folder / shard)[0])
            return merged, index
    raise VitedgeError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin", "save the model with save_pretrained() into this folder")


def _load_hf_folder(folder: Path) -> ModelSpec:
    cfg_path = folder / "config.json"
    hf = _read_config(cfg_path)
    model_type = hf.get("model_type")
    if model_type == "deit":
        raise ModelNotSupported(
            f"{cfg_path}: model_type 'deit' is a distilled DeiT (extra distillation token), which is not the classic ViT vitedge supports",
            "use a CLS-token ViT; DeiT weights saved as ViTForImageClassification (model_type 'vit') load fine",
        )
    if model_type != "vit":
        raise ModelNotSupported(f"{cfg_path}: model_type {model_type!r} is not a ViT", "vitedge loads model_type 'vit' (ViTForImageClassification / ViTModel)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ModelNotSupported(f"{cfg_path}: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size") if k not in hf]
    if missing:
        raise VitedgeError(f"{cfg_path} lacks {', '.join(missing)}", "save the model with save_pretrained() to get a complete config")
    image_size, patch_size = hf.get("image_size", 224), hf.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ModelNotSupported(f"{cfg_path}: only square image_size/patch_size are supported (got {image_size!r}, {patch_size!r})")
    sd, weights = _hf_weights(folder)
    sd = hf_to_timm(sd, weights)
    id2label = hf.get("id2label") or {}
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    cfg = ViTConfig(
        img_size=image_size,
        patch_size=patch_size,
        in_channels=hf.get("num_channels", 3),
        num_classes=num_classes,
        d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        num_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"],
        dropout=0.0,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        qkv_bias=hf.get("qkv_bias", True),
    )
    model = _build(cfg, sd, weights)
    labels = [str(id2label.get(str(i), i)) for i in range(num_classes)] if id2label else None
    pre, notes, sources = _hf_preprocessing(folder, cfg.img_size)
    if num_classes == 0:
        notes.append("no classifier weights: the model outputs CLS features, not class logits")
    return ModelSpec(model, pre, cfg, labels, str(folder), notes, sources)


# ------------------------------------------------------------------------------------------
def _build(cfg: ViTConfig, sd: dict[str, torch.Tensor], path: Path) -> VisionTransformer:
    try:
        model = VisionTransformer.from_config(cfg)
    except ValueError as exc:
        raise VitedgeError(f"{path}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise VitedgeError(f"{path}: weights do not match a ViT of the inferred config: {'; '.join(parts)}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise VitedgeError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)} for {cfg}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def _labels_from(meta_labels, num_classes: int) -> list[str] | None:
    if meta_labels and len(meta_labels) == num_classes:
        return list(meta_labels)
    return None


def load_model(
    source: str | Path | nn.Module | ModelSpec,
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
    preprocessing: Preprocessing | None = None,
    labels: list[str] | None = None,
) -> ModelSpec:
    """Load a ViT from a preset name, a module, a checkpoint file or a Hugging Face folder.

    ``"reference"`` names the shipped digits ViT (``vitedge/assets/digits_vit.safetensors``).
    A :class:`ModelSpec` is passed through (a shallow copy, so overrides do not touch the original).

    ``img_size`` changes the input resolution (position embeddings are interpolated);
    ``num_heads`` overrides the head count guessed for timm state dicts;
    ``preprocessing`` and ``labels`` override what the checkpoint says.
    """
    if img_size is not None and img_size < 1:
        raise VitedgeError(f"img_size {img_size} must be a positive multiple of the patch size")
    if isinstance(source, str) and source == "reference" and not Path(source).exists():
        source = REFERENCE_CHECKPOINT
    if isinstance(source, ModelSpec):
        spec = replace(source, notes=list(source.notes), labels=list(source.labels) if source.labels else source.labels)
    elif isinstance(source, nn.Module):
        spec = _from_module(source, img_size)
    elif isinstance(source, str) and source.replace("-", "_").lower() in PRESETS and not Path(source).exists():
        if img_size and img_size % 16:
            raise VitedgeError(f"img_size {img_size} is not divisible by the patch size 16 of preset {source}")
        cfg = preset_config(source, **({"img_size": img_size} if img_size else {}))
        model = VisionTransformer.from_config(cfg).eval()
        spec = ModelSpec(
            model,
            resolve_preprocessing(cfg.img_size),
            cfg,
            None,
            f"preset:{source}",
            ["random weights (preset): fine for shape and speed trials, meaningless predictions"],
            {},
        )
    else:
        spec = _from_path(Path(source), num_heads)
    if img_size and spec.config and (img_size, img_size) != tuple(spec.preprocessing.img_size):
        if img_size % spec.config.patch_size:
            raise VitedgeError(f"img_size {img_size} is not divisible by the patch size {spec.config.patch_size}")
        sources = spec.preprocessing_sources if spec.preprocessing_sources is not None else {"manifest": spec.preprocessing}
        spec.preprocessing = resolve_preprocessing(img_size, **sources, flags={"img_size": img_size})
        if img_size != spec.config.img_size:
            spec.notes.append(f"input resolution {img_size}: position embeddings interpolated from {spec.config.img_size}")
    if preprocessing is not None:
        spec.preprocessing, spec.preprocessing_sources = preprocessing, None
    if labels is not None:
        spec.labels = list(labels)
    return spec


_DEFAULT_RULE = "assumed the default rule (resize to floor(size / 0.875) + center crop, bicubic, ImageNet mean/std)"


def _from_module(module: nn.Module, img_size: int | None) -> ModelSpec:
    module = module.eval()
    if isinstance(module, VisionTransformer):
        cfg = module.config
        return ModelSpec(
            module, resolve_preprocessing(img_size or cfg.img_size), cfg, None, type(module).__name__, [f"preprocessing not given: {_DEFAULT_RULE}"], {}
        )
    if img_size is None:
        raise VitedgeError(f"{type(module).__name__} is not a vitedge VisionTransformer", "pass img_size= so vitedge knows the input shape")
    return ModelSpec(
        module, resolve_preprocessing(img_size), None, None, type(module).__name__, [f"generic nn.Module: preprocessing not given: {_DEFAULT_RULE}"], {}
    )


def _from_path(path: Path, num_heads: int | None) -> ModelSpec:
    if not path.exists():
        hint = f"give a checkpoint file, a Hugging Face folder, or a preset: {', '.join(PRESETS)}"
        close = did_you_mean(str(path), [*PRESETS, "reference"]) if len(path.parts) == 1 else None
        raise FileProblem(f"model {path} does not exist", f"{close} {hint}" if close else hint)
    if path.is_dir():
        if (path / "config.json").exists():
            if is_timm_config(_read_config(path / "config.json")):
                return _from_path(_timm_weights(path), num_heads)
            return _load_hf_folder(path)
        raise FileProblem(f"folder {path} has no config.json", "a model folder must be a Hugging Face save_pretrained folder")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise VitedgeError(f"{path}: unknown model file type {path.suffix!r}", "use .safetensors, .pth, .pt or .bin")
    sd, meta = _read_state_dict(path)
    if CHECKPOINT_METADATA_KEY in meta:
        try:
            info = json.loads(meta[CHECKPOINT_METADATA_KEY])
            cfg = ViTConfig.from_dict(info["config"])
            pre = Preprocessing.from_dict(info["preprocessing"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FileProblem(f"{path}: vitedge metadata is damaged ({type(exc).__name__}: {exc})", "re-save it with save_checkpoint") from None
        model = _build(cfg, sd, path)
        return ModelSpec(model, pre, cfg, _labels_from(info.get("labels"), cfg.num_classes), str(path), [], {"manifest": pre})
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        cfg, notes = _infer_timm_config(sd, path, num_heads)
        model = _build(cfg, sd, path)
        sources, where = sources_near(path)
        if isinstance(meta.get("pretrained_cfg"), dict):  # embedded in the checkpoint: it wins over a file next to it
            sources["timm"], where = meta["pretrained_cfg"], f"the pretrained_cfg in {path.name}"
        pre = resolve_preprocessing(cfg.img_size, **sources)
        if not sources:
            notes.append(f"timm state dict without timm's config.json or a pretrained_cfg: preprocessing {_DEFAULT_RULE}")
        else:
            notes.append(f"timm state dict: preprocessing from {where}")
            notes += [f"preprocessing {a}" for a in pre.assumed]
        if tuple(pre.img_size) != (cfg.img_size, cfg.img_size):
            notes.append(f"input resolution {pre.img_size[0]}x{pre.img_size[1]} from {where}: position embeddings interpolated from {cfg.img_size}")
        labels = (sources.get("timm") or {}).get("label_names")
        return ModelSpec(model, pre, cfg, _labels_from(labels, cfg.num_classes), str(path), notes, sources)
    if any(k.startswith(("vit.embeddings", "embeddings.patch_embeddings")) for k in sd):
        raise VitedgeError(
            f"{path} looks like Hugging Face ViT weights", "load the whole save_pretrained folder (with config.json) instead of the weights file"
        )
    sample = ", ".join(list(sd)[:3])
    raise VitedgeError(
        f"{path} is not a ViT checkpoint vitedge knows (keys like {sample})",
        "expected timm keys (patch_embed.proj, cls_token, pos_embed, blocks.N...) or a vitedge/Hugging Face checkpoint",
    )
