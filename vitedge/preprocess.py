"""Image preprocessing that travels with the model.

A :class:`Preprocessing` is stored in every checkpoint and manifest so that a deployed engine
transforms raw images exactly as the model saw them in training.  Two common conventions are
covered:

* timm / torchvision style: resize the shorter side to ``resize`` then center-crop ``img_size``;
* Hugging Face style: ``resize=None`` and ``center_crop=False`` resizes straight to ``img_size``.

Pixels are scaled by ``scale`` (1/255 by default), then normalised by ``mean``/``std`` per channel,
in ``channel_order`` (RGB unless the model was trained on BGR).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FileProblem, ShapeMismatch, VitedgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The default rule, used everywhere nothing says otherwise (see vitedge.preprocessing_resolver, which
# records every field it fills from here as assumed): timm's defaults for an ImageNet ViT -
# resize the shorter side to floor(size / 0.875), center-crop ``size``, bicubic, ImageNet mean/std.
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"


def resize_for(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The shorter side before a center crop of ``size``, as timm computes it: floor(size / crop_pct)."""
    if not 0 < crop_pct <= 1:
        raise VitedgeError(f"crop_pct {crop_pct} is not in (0, 1]", "timm configs use e.g. 0.875, 0.9 or 1.0")
    return int(math.floor(size / crop_pct))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Preprocessing:
    img_size: tuple[int, int] = (224, 224)
    resize: int | None = -1  # shorter side before the crop; None = straight to img_size; -1 = the default rule
    center_crop: bool = True
    interpolation: str = DEFAULT_INTERPOLATION
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    assumed: list[str] = field(default_factory=list)  # fields vitedge had to guess (reported)

    def __post_init__(self):
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        if self.resize == -1:
            self.resize = resize_for(min(self.img_size))
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.interpolation not in _INTERP:
            raise VitedgeError(f"unknown interpolation {self.interpolation!r}", f"use one of {', '.join(_INTERP)}")
        if self.channel_order not in ("RGB", "BGR"):
            raise VitedgeError(f"unknown channel order {self.channel_order!r}", "use RGB or BGR")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise VitedgeError("mean and std need 3 values each, std > 0", "e.g. --mean 0.5,0.5,0.5")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def for_size(cls, img_size: int, **kw) -> Preprocessing:
        """The default rule at ``img_size``: resize to floor(size / 0.875), center crop, bicubic, ImageNet mean/std."""
        return cls(img_size=(img_size, img_size), **kw)

    # -- transforms -------------------------------------------------------------------------
    def to_pil(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise VitedgeError(
                    f"image array of dtype {image.dtype} and shape {image.shape} is not an image",
                    "pass uint8 HxWx3 (RGB) or HxW arrays, or use infer() for preprocessed floats",
                )
            if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
                raise ShapeMismatch(f"image array shape {image.shape} is not HxWxC with C in 1,3,4")
            return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
        return load_image(image)

    def spatial(self, img: Image.Image) -> Image.Image:
        """Resize and crop (the geometric part)."""
        h, w = self.img_size
        interp = _INTERP[self.interpolation]
        if self.resize is None:
            return img.resize((w, h), interp)
        iw, ih = img.size
        # shorter side -> resize, longer side truncated like torchvision / Hugging Face
        if iw <= ih:
            nw, nh = self.resize, max(1, int(self.resize * ih / iw))
        else:
            nw, nh = max(1, int(self.resize * iw / ih)), self.resize
        img = img.resize((nw, nh), interp)
        if self.center_crop:
            if nw < w or nh < h:
                img = img.resize((max(w, nw), max(h, nh)), interp)
                nw, nh = img.size
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        elif (nw, nh) != (w, h):
            img = img.resize((w, h), interp)
        return img

    def __call__(self, image: ImageLike) -> np.ndarray:
        """One image -> float32 CHW array, ready for the model."""
        arr: np.ndarray = np.asarray(self.spatial(self.to_pil(image)), dtype=np.float32)
        if self.channel_order == "BGR":
            arr = arr[..., ::-1]
        arr = arr * self.scale
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)

    def batch(self, images: Iterable[ImageLike]) -> np.ndarray:
        arrays = [self(im) for im in images]
        if not arrays:
            raise VitedgeError("no images given")
        return np.stack(arrays)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with a one-line error for missing or corrupt files."""
    path = Path(path)
    if not path.exists():
        raise FileProblem(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FileProblem(f"image {path} cannot be read ({type(exc).__name__}: {exc})", "is it a valid jpg/png/bmp/webp?") from exc


def parse_floats(text: str | Sequence[float], n: int = 3, what: str = "value") -> tuple[float, ...]:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5) with a clear error."""
    if not isinstance(text, str):
        vals = tuple(float(v) for v in text)
    else:
        try:
            vals = tuple(float(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            raise VitedgeError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if len(vals) != n:
        raise VitedgeError(f"{what} needs {n} numbers, got {len(vals)}", f"e.g. {','.join(['0.5'] * n)}")
    return vals
