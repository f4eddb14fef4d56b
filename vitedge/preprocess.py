"""Image preprocessing that travels with the model.

A :class:`Preprocessing` is stored in every checkpoint and manifest so that a deployed engine
transforms raw images exactly as the model saw them in training.  Two common conventions are
covered:

* timm / torchvision style: resize the shorter side to ``resize`` then center-crop ``img_size``;
* Hugging Face style: ``resize=None`` and ``center_crop=False`` resizes straight to ``img_size``.

Pixels are scaled by ``scale`` (1/255 by default), then normalised by ``mean``/``std`` per channel,
in ``channel_order`` (RGB unless the model was trained on BGR).

A dynamic-size model (``vitedge export --dynamic-size``) carries a :class:`DynamicSize`: each image keeps
its aspect ratio instead (its shorter side resized to the target, each side rounded to the patch
multiple and clamped to the engine's bounds, no crop), so images of different shapes give different
input sizes; :meth:`Preprocessing.batches` groups them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
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


@dataclass(frozen=True)
class DynamicSize:
    """The input sizes a dynamic-size engine accepts: every height and width from ``min`` to ``max`` that is a
    multiple of ``multiple`` (the patch size).  Recorded in the manifest's preprocessing as ``dynamic_size``."""

    min: int
    max: int
    multiple: int

    def __post_init__(self):
        if self.multiple < 1 or self.min % self.multiple or self.max % self.multiple:
            raise VitedgeError(f"size bounds {self.min}..{self.max} are not multiples of the patch size {self.multiple}", "round them to the patch")
        if not 2 * self.multiple <= self.min <= self.max:
            raise VitedgeError(
                f"size bounds {self.min}..{self.max} need {2 * self.multiple} <= min <= max (at least 2 patches a side)",
                "e.g. --min-size 112 --max-size 448",
            )

    def snap(self, side: float) -> int:
        """``side`` rounded to the nearest multiple, clamped to the bounds."""
        return int(min(self.max, max(self.min, self.multiple * round(side / self.multiple))))

    def fit(self, width: int, height: int, target: int) -> tuple[int, int]:
        """(height, width) for an image of ``width`` x ``height``: the shorter side scaled to ``target`` (less when the
        longer side would pass ``max``), each side then snapped (:meth:`snap`).  The aspect ratio is kept up to
        the rounding, except for images too elongated for the bounds, which are clamped."""
        scale = min(target / min(width, height), self.max / max(width, height))
        return self.snap(height * scale), self.snap(width * scale)

    def check(self, height: int, width: int) -> None:
        """Raise a one-line :class:`ShapeMismatch` unless the engine accepts ``height`` x ``width``."""
        for name, side in (("height", height), ("width", width)):
            if not self.min <= side <= self.max or side % self.multiple:
                raise ShapeMismatch(
                    f"input {height}x{width}: {name} {side} is outside this dynamic-size engine's sizes "
                    f"({self.min} to {self.max}, multiples of {self.multiple})",
                    "resize the input into those bounds, or re-export with other --min-size/--max-size",
                )

    def check_sizes(self, target: int) -> list[tuple[int, int]]:
        """(height, width) sizes an export or compile is verified at: the square target, two non-square sizes
        (portrait and landscape, about 0.75 x 1.25 and 1.4 x 1.1 of it) and both bounds."""
        sizes = [(target, target), (self.snap(0.75 * target), self.snap(1.25 * target)), (self.snap(1.4 * target), self.snap(1.1 * target))]
        sizes += [(self.min, self.min), (self.max, self.max)]
        return list(dict.fromkeys(sizes))


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
    dynamic_size: DynamicSize | None = None  # a dynamic-size engine: img_size is the target, images keep their aspect

    def __post_init__(self):
        if isinstance(self.dynamic_size, dict):
            self.dynamic_size = DynamicSize(**self.dynamic_size)
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
        if self.dynamic_size is None:
            del d["dynamic_size"]  # fixed-size manifests stay as they were
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

    def at(self, height: int, width: int) -> Preprocessing:
        """The same preprocessing at a fixed ``height`` x ``width`` (``--size``): the resize before the crop scaled
        with it (the same crop fraction).  A dynamic-size engine checks the size against its bounds when it runs."""
        resize = None if self.resize is None else resize_for(min(height, width), min(1.0, min(self.img_size) / self.resize))
        return replace(self, img_size=(height, width), resize=resize, assumed=list(self.assumed), dynamic_size=None)

    def fixed(self) -> Preprocessing:
        """Itself, or for a dynamic-size model the same at its own size (resize, crop): one size for any images,
        the pixels a fixed-size export of the model sees."""
        return self if self.dynamic_size is None else replace(self, dynamic_size=None, assumed=list(self.assumed))

    def input_size(self, img: Image.Image) -> tuple[int, int]:
        """(height, width) this image is given to the model at: ``img_size``, or for a dynamic-size model its own
        aspect ratio fitted to the bounds (:meth:`DynamicSize.fit`)."""
        if self.dynamic_size is None:
            return self.img_size
        return self.dynamic_size.fit(img.size[0], img.size[1], min(self.img_size))

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
        """Resize and crop (the geometric part); a dynamic-size model's images are resized, never cropped."""
        h, w = self.img_size
        interp = _INTERP[self.interpolation]
        if self.dynamic_size is not None:
            h, w = self.input_size(img)
            return img.resize((w, h), interp)
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
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ShapeMismatch(
                f"images of a dynamic-size model have {len(shapes)} input sizes here, which cannot make one batch", "use batches() to group them by size"
            )
        return np.stack(arrays)

    def batches(self, images: Iterable[ImageLike]) -> list[tuple[list[int], np.ndarray]]:
        """The images preprocessed and grouped by input size: ``(indices, batch)`` per size, in order of first
        appearance (one group for a fixed-size model)."""
        groups: dict[tuple, tuple[list[int], list[np.ndarray]]] = {}
        for i, im in enumerate(images):
            arr = self(im)
            idx, arrs = groups.setdefault(arr.shape, ([], []))
            idx.append(i)
            arrs.append(arr)
        if not groups:
            raise VitedgeError("no images given")
        return [(idx, np.stack(arrs)) for idx, arrs in groups.values()]


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
