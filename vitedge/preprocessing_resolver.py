"""One answer to "how was this model fed?", for the loader, foreign ONNX files, parity and export.

:func:`resolve_preprocessing` takes what is known about a model and returns one
:class:`~vitedge.preprocess.Preprocessing`.  Sources, the first one given wins:

1. **timm**: a data config / ``pretrained_cfg`` (the hub ``config.json`` next to a checkpoint, or
   embedded in it).  Read as timm's eval transform uses it: crop_mode ``center`` resizes the shorter
   side to ``floor(size / crop_pct)`` and center-crops ``size``; ``squash`` with crop_pct 1 resizes
   straight to ``size``; ``interpolation``, ``mean``, ``std``; pixels scaled by 1/255.
2. **Hugging Face**: a ``preprocessor_config.json`` (ViTImageProcessor and kin): ``size``
   ``{height, width}`` resizes straight to it (``resize=None``), ``shortest_edge`` + ``crop_size``
   resizes then center-crops; ``resample`` is a PIL code; ``image_mean``/``image_std`` apply when
   ``do_normalize``, ``rescale_factor`` when ``do_rescale``.  Keys it lacks take ViTImageProcessor's
   defaults (bilinear, mean = std = 0.5), as transformers would; no ``size`` means the model's size.
3. **vitedge**: a manifest's or checkpoint's preprocessing, or a small vitedge JSON (any of its fields).

Then explicit **flags** override every field they set (a new ``img_size`` keeps the source's crop
fraction).  Whatever is still unknown comes from the default rule (``DEFAULT_CROP_PCT``,
``DEFAULT_INTERPOLATION``, ImageNet mean/std in :mod:`vitedge.preprocess`), and every field filled
that way is listed in ``Preprocessing.assumed``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import VitedgeError
from .preprocess import DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, Preprocessing, parse_floats, resize_for

VITEDGE_KEYS = ("img_size", "resize", "center_crop", "interpolation", "mean", "std", "scale", "channel_order")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "bilinear"}
_HF_DEFAULT_MEAN = _HF_DEFAULT_STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN / _STD in transformers


# -- what kind of config a JSON object is ---------------------------------------------------------
def is_timm_config(cfg: dict) -> bool:
    """A timm data config, ``pretrained_cfg`` or hub ``config.json`` ({"architecture", "pretrained_cfg", ...})."""
    return isinstance(cfg, dict) and "model_type" not in cfg and ("pretrained_cfg" in cfg or "architecture" in cfg or "input_size" in cfg or "crop_pct" in cfg)


def is_hf_processor_config(cfg: dict) -> bool:
    """A Hugging Face ``preprocessor_config.json``."""
    return isinstance(cfg, dict) and any(k in cfg for k in ("image_processor_type", "feature_extractor_type", "do_normalize", "image_mean"))


def read_json(path: str | Path) -> dict:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitedgeError(
            f"preprocessing JSON {p} cannot be read ({type(exc).__name__}: {str(exc)[:120]})", "give a JSON object with img_size, mean, std, ..."
        ) from None
    if not isinstance(cfg, dict):
        raise VitedgeError(f"preprocessing JSON {p} is not an object", 'e.g. {"img_size": 224, "mean": [0.5, 0.5, 0.5]}')
    return cfg


def sources_from_json(path: str | Path) -> tuple[dict, str]:
    """``{"timm": cfg}``, ``{"hf": cfg}`` or ``{"manifest": cfg}`` for :func:`resolve_preprocessing`, and a description."""
    p = Path(path)
    cfg = read_json(p)
    if is_hf_processor_config(cfg):
        return {"hf": cfg}, f"Hugging Face image processor ({p})"
    if is_timm_config(cfg):
        return {"timm": cfg}, f"timm data config ({p})"
    unknown = sorted(set(cfg) - set(VITEDGE_KEYS))
    if unknown:
        raise VitedgeError(f"unknown preprocessing keys in {p.name}: {', '.join(unknown)}", f"use {', '.join(VITEDGE_KEYS)}")
    return {"manifest": cfg}, f"vitedge preprocessing JSON ({p})"


def sources_near(checkpoint: str | Path) -> tuple[dict, str | None]:
    """The timm ``config.json`` / Hugging Face ``preprocessor_config.json`` in a checkpoint's folder (or the folder given)."""
    p = Path(checkpoint)
    folder = p if p.is_dir() else p.parent
    found: dict = {}
    where = None
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        cfg = read_json(cfg_path)
        if is_timm_config(cfg):
            found["timm"], where = cfg, str(cfg_path)
    hf_path = folder / "preprocessor_config.json"
    if hf_path.exists():
        found["hf"] = read_json(hf_path)
        where = where or str(hf_path)
    return found, where


# -- each source as the fields it states ----------------------------------------------------------
def _size(value, what: str) -> tuple[int, int]:
    try:
        if isinstance(value, (int, float, str)):
            return int(value), int(value)
        if len(value) == 3:  # timm's (C, H, W)
            value = value[1:]
        return int(value[0]), int(value[1])
    except (TypeError, ValueError, IndexError):
        raise VitedgeError(f"{what} {value!r} is not a size", "use one number, e.g. 224, or [height, width]") from None


def timm_fields(cfg: dict) -> tuple[dict, list[str]]:
    """The fields a timm config states (as timm's eval transform uses them) and what timm's defaults filled."""
    cfg = cfg.get("pretrained_cfg") or cfg
    fields: dict = {"scale": 1.0 / 255.0, "channel_order": "RGB"}
    assumed: list[str] = []
    if "input_size" in cfg:
        fields["img_size"] = _size(cfg["input_size"], "timm input_size")
    crop_pct = cfg.get("crop_pct")
    if crop_pct is None:
        crop_pct = DEFAULT_CROP_PCT
        assumed.append(f"crop_pct {DEFAULT_CROP_PCT} (timm's default; the config has none)")
    mode = cfg.get("crop_mode") or "center"
    if mode == "center":
        fields["crop_pct"], fields["center_crop"] = float(crop_pct), True
    elif mode == "squash" and float(crop_pct) == 1.0:
        fields["resize"], fields["center_crop"] = None, False
    else:
        raise VitedgeError(
            f"timm crop_mode {mode!r} with crop_pct {crop_pct} is not supported", "vitedge reproduces crop_mode 'center', and 'squash' with crop_pct 1.0"
        )
    for key in ("interpolation", "mean", "std"):
        if cfg.get(key) is not None:
            fields[key] = cfg[key]
    return fields, assumed


def hf_fields(cfg: dict) -> tuple[dict, list[str]]:
    """The fields a Hugging Face image-processor config states, with ViTImageProcessor's defaults for the rest."""
    size = cfg.get("size")  # none: straight to the model's input size
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if isinstance(size, (int, float)):
        size = {"shortest_edge": int(size)} if crop else {"height": int(size), "width": int(size)}
    if size is None:
        size = {}
    if not isinstance(size, dict):
        raise VitedgeError(f"Hugging Face size {size!r} is not understood", 'use {"height": 224, "width": 224}')
    fields: dict = {"channel_order": "RGB"}
    if crop:
        fields["img_size"] = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        fields["resize"], fields["center_crop"] = size.get("shortest_edge") or size.get("height"), True
    elif "height" in size:
        fields["img_size"], fields["resize"], fields["center_crop"] = (size["height"], size["width"]), None, False
    elif "shortest_edge" in size:
        fields["resize"], fields["center_crop"] = size["shortest_edge"], True  # the crop is the model's input size
    else:
        fields["resize"], fields["center_crop"] = None, False
    if not cfg.get("do_resize", True):
        fields["resize"] = None
    fields["interpolation"] = _PIL_RESAMPLE.get(cfg.get("resample", 2), "bilinear")
    if cfg.get("do_normalize", True):
        fields["mean"] = tuple(cfg.get("image_mean") or _HF_DEFAULT_MEAN)
        fields["std"] = tuple(cfg.get("image_std") or _HF_DEFAULT_STD)
    else:
        fields["mean"], fields["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    fields["scale"] = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    return fields, []


def vitedge_fields(given) -> tuple[dict, list[str]]:
    """The fields a vitedge manifest / checkpoint / small JSON states (a Preprocessing or a dict)."""
    if isinstance(given, Preprocessing):
        d = given.to_dict()
        assumed = list(d.pop("assumed", []) or [])
        return d, assumed
    unknown = sorted(set(given) - set(VITEDGE_KEYS) - {"assumed"})
    if unknown:
        raise VitedgeError(f"unknown preprocessing keys {', '.join(unknown)}", f"use {', '.join(VITEDGE_KEYS)}")
    d = {k: v for k, v in given.items() if k in VITEDGE_KEYS}
    return d, list(given.get("assumed") or [])


# -- the resolver ----------------------------------------------------------------------------------
def resolve_preprocessing(
    img_size: int | tuple[int, int] | None = None,
    *,
    timm: dict | None = None,
    hf: dict | None = None,
    manifest: dict | Preprocessing | None = None,
    flags: dict | None = None,
) -> Preprocessing:
    """The model's preprocessing from what is known about it (see the module docstring for the rules).

    ``img_size``: the model's own input size (from its weights or its ONNX input), used when no
    source states one.  ``timm`` / ``hf`` / ``manifest``: the configs found (first given wins).
    ``flags``: explicit values (``img_size, resize, center_crop`` or ``crop``, ``interpolation, mean,
    std, scale, channel_order``) that override the source.  Fields filled by the default rule are
    listed in the result's ``assumed``.
    """
    fields: dict = {}
    assumed: list[str] = []
    readers: list[tuple[Callable[[Any], tuple[dict, list[str]]], Any]] = [(timm_fields, timm), (hf_fields, hf), (vitedge_fields, manifest)]
    for reader, cfg in readers:
        if cfg is not None:
            fields, assumed = reader(cfg)
            break
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if "crop" in flags:
        flags["center_crop"] = flags.pop("crop")
    unknown = sorted(set(flags) - set(VITEDGE_KEYS))
    if unknown:
        raise VitedgeError(f"unknown preprocessing options {', '.join(unknown)}", f"use {', '.join(VITEDGE_KEYS)}")
    if "img_size" in flags:
        flags["img_size"] = _size(flags["img_size"], "img_size")
        old = fields.get("img_size")
        if old is not None and fields.get("resize") and "resize" not in flags and tuple(_size(old, "img_size")) != flags["img_size"]:
            # a new size keeps the source's crop fraction
            fields["resize"] = int(round(min(flags["img_size"]) * fields["resize"] / min(_size(old, "img_size"))))
    for key in ("mean", "std"):
        if key in flags:
            flags[key] = parse_floats(flags[key], 3, key)
    if "resize" in flags or flags.get("center_crop") is not None:
        fields.pop("crop_pct", None)  # the flags say how to resize / crop
    fields.update(flags)
    return _complete(fields, assumed, img_size)


def _complete(fields: dict, assumed: list[str], model_size) -> Preprocessing:
    """Fill what no source stated from the default rule, recording each filled field."""
    assumed = list(assumed)
    if fields.get("img_size") is None:
        if model_size is None:
            raise VitedgeError(
                "the input size is not known (no config states it and the model's input is dynamic)",
                "pass --img-size (and --mean/--std, or --preprocessing FILE)",
            )
        fields["img_size"] = model_size
    size = _size(fields["img_size"], "img_size")
    if min(size) < 1:
        raise VitedgeError(f"img_size {size} must be positive")
    fields["img_size"], side = size, min(size)
    for key in ("mean", "std"):
        if isinstance(fields.get(key), str):
            fields[key] = parse_floats(fields[key], 3, key)
        elif key in fields and not isinstance(fields[key], (list, tuple)):
            raise VitedgeError(f"{key} must be 3 numbers, got {fields[key]!r}")
    crop_pct = fields.pop("crop_pct", None)
    has_resize, crop = "resize" in fields, fields.get("center_crop")
    if crop_pct is not None and not has_resize:
        fields["resize"], fields["center_crop"] = resize_for(side, crop_pct), True
    elif has_resize and crop is None:
        fields["center_crop"] = fields["resize"] is not None
        if fields["resize"] is not None:
            assumed.append(f"center-crop {size[0]}x{size[1]} after the resize to {fields['resize']}")
    elif not has_resize and crop is None:
        fields["resize"], fields["center_crop"] = resize_for(side), True
        assumed.append(f"resize shorter side to {fields['resize']} then center-crop {side} (crop_pct {DEFAULT_CROP_PCT})")
    elif not has_resize and crop:
        fields["resize"] = resize_for(side)
        assumed.append(f"resize shorter side to {fields['resize']} before the center-crop (crop_pct {DEFAULT_CROP_PCT})")
    elif not has_resize:
        fields["resize"] = None  # no crop and no resize: straight to img_size (Hugging Face style)
    if fields["resize"] is not None and int(fields["resize"]) < side and fields["center_crop"]:
        raise VitedgeError(f"resize {fields['resize']} is smaller than the crop {side}", f"use --resize >= {side}")
    if fields.get("interpolation") is None:
        fields["interpolation"] = DEFAULT_INTERPOLATION
        assumed.append(f"{DEFAULT_INTERPOLATION} interpolation")
    if fields.get("mean") is None:
        fields["mean"] = IMAGENET_MEAN
        assumed.append(f"mean = ImageNet {IMAGENET_MEAN}")
    if fields.get("std") is None:
        fields["std"] = IMAGENET_STD
        assumed.append(f"std = ImageNet {IMAGENET_STD}")
    try:
        pre = Preprocessing(**{k: v for k, v in fields.items() if k in VITEDGE_KEYS})
    except (TypeError, ValueError) as exc:
        raise VitedgeError(f"invalid preprocessing: {exc}") from None
    pre.assumed = list(dict.fromkeys(assumed))
    return pre


__all__ = [
    "resolve_preprocessing",
    "timm_fields",
    "hf_fields",
    "vitedge_fields",
    "sources_from_json",
    "sources_near",
    "is_timm_config",
    "is_hf_processor_config",
]
