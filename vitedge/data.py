"""Image sets for calibration and validation.

Accepted layouts (see ``calibration_data/README.md``):

* a folder of images, searched recursively (jpg, jpeg, png, bmp, webp);
* the same with ``class_name/image`` sub-folders: the folder name is the label;
* a ``.npy`` (N, C, H, W) array or a ``.npz`` with such an array (``images``/``x``/first key),
  already preprocessed, optionally with ``labels``/``y``.

Images are read lazily and streamed in batches, so memory does not grow with the set size.
Unreadable images are skipped and counted; sampling is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._shipped import folder as shipped_folder
from .errors import FileProblem, ShapeMismatch, VitedgeError
from .preprocess import IMAGE_SUFFIXES, Preprocessing, load_image

log = logging.getLogger("vitedge")


def _skip(skipped: list[tuple[str, str]], path, exc: Exception) -> None:
    """Record an unreadable image and warn: one bad file costs its own result, never the run."""
    skipped.append((str(path), str(exc)))
    log.warning("skipped %s", exc)


def open_readable(paths: Sequence[Path]) -> tuple[list[Path], list, list[tuple[str, str]]]:
    """The images of ``paths`` that open, as ``(paths, PIL images, [(unreadable path, why)])``, skipping the others
    with a warning as :meth:`ImageSet.batches` does."""
    good: list[Path] = []
    images: list = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        try:
            images.append(load_image(p))
        except VitedgeError as exc:
            _skip(skipped, p, exc)
            continue
        good.append(Path(p))
    return good, images, skipped


# the shipped calibration_data/ folder, from the installed package (wheel or editable install)
SHIPPED_CALIBRATION = shipped_folder("calibration_data")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files and folders (searched recursively) as a list of files, in the order given."""
    items = [images] if isinstance(images, (str, Path)) else list(images)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileProblem(f"no images (jpg/png/bmp/webp) found in {p}")
            out.extend(found)
        elif not p.exists():
            raise FileProblem(f"image {p} does not exist")
        else:
            out.append(p)
    if not out:
        raise FileProblem("no images given", "pass image files or folders")
    return out


def default_check_images(limit: int = 8) -> list[Path] | None:
    """A few real images from the shipped calibration set (None when it is missing)."""
    if not SHIPPED_CALIBRATION.is_dir():
        return None
    found = list_images(SHIPPED_CALIBRATION)
    return found[:: max(1, len(found) // limit)][:limit] or None


@dataclass
class Batch:
    x: np.ndarray  # (n, C, H, W) float32
    labels: list[str | None]
    names: list[str]


@dataclass
class ImageSet:
    """An ordered, lazily-read set of images (or preprocessed arrays) with optional labels."""

    source: str
    paths: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    arrays: np.ndarray | None = None  # preprocessed (N, C, H, W) when loaded from .npy/.npz
    skipped: list[tuple[str, str]] = field(default_factory=list)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> ImageSet:
        path = Path(path)
        if not path.exists():
            raise FileProblem(f"data {path} does not exist", "give a folder of images or a .npy/.npz file")
        if path.is_file():
            if path.suffix in (".npy", ".npz"):
                return cls._from_array_file(path)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                return cls(str(path), [path], [None])
            raise VitedgeError(f"data {path} is neither an image folder nor a .npy/.npz file")
        paths = list_images(path)
        if not paths:
            raise FileProblem(f"data folder {path} holds no images (jpg/png/bmp/webp)", "check the path")
        labels = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in paths]
        if any(lbl is None for lbl in labels):
            labels = [None] * len(paths)  # mixed layout: treat as unlabelled
        return cls(str(path), paths, labels)

    @classmethod
    def _from_array_file(cls, path: Path) -> ImageSet:
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FileProblem(f"{path} cannot be read as a numpy file ({exc})") from None
        labels: list[str | None] | None = None
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = list(data.keys())
                key = next((k for k in ("images", "x", "pixel_values") if k in keys), keys[0] if keys else None)
                if key is None:
                    raise VitedgeError(f"{path} is an empty .npz")
                try:
                    arr = data[key]
                    lk = next((k for k in ("labels", "y") if k in keys), None)
                    labels = _label_strings(data[lk]) if lk else None
                except (ValueError, OSError) as exc:
                    raise FileProblem(f"{path} cannot be read as a numpy file ({exc})") from None
        else:
            arr = data
        if arr.dtype.kind not in "fiub":
            raise VitedgeError(f"{path}: array of dtype {arr.dtype} is not numeric image data")
        if arr.ndim != 4:
            raise ShapeMismatch(f"{path}: array of shape {arr.shape} is not (N, C, H, W) preprocessed images")
        if labels is not None and len(labels) != len(arr):
            raise VitedgeError(f"{path}: {len(labels)} labels for {len(arr)} images")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise VitedgeError(f"{path} contains NaN or inf values", "fix the preprocessing that produced it")
        return cls(str(path), [], labels or [None] * len(arr), arrays=arr)

    # -- properties -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.paths)

    @property
    def labelled(self) -> bool:
        return len(self) > 0 and all(lbl is not None for lbl in self.labels)

    def fingerprint(self) -> str:
        """Hash of the content (file bytes or arrays) - recorded in manifests for reproducibility."""
        h = hashlib.sha256()
        if self.arrays is not None:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        else:
            for p, lbl in zip(self.paths, self.labels, strict=True):
                h.update(f"{lbl}/{p.name}".encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    def sample(self, n: int | None, seed: int = 0) -> ImageSet:
        """A deterministic subset of ``n`` items (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise VitedgeError(f"sample size {n} must be >= 1")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        if self.arrays is not None:
            return ImageSet(self.source, [], [self.labels[i] for i in idx], arrays=self.arrays[idx])
        return ImageSet(self.source, [self.paths[i] for i in idx], [self.labels[i] for i in idx])

    def check_shape(self, shape: Sequence) -> None:
        """For preprocessed arrays: (C, H, W) must match the model input."""
        if self.arrays is None:
            return
        want = tuple(int(d) if isinstance(d, int) else None for d in shape[1:])
        got = self.arrays.shape[1:]
        if any(w is not None and w != g for w, g in zip(want, got, strict=False)):
            raise ShapeMismatch(
                f"{self.source}: arrays of shape {got} do not match the model input {tuple(shape[1:])}",
                "preprocess to the model's input size, or pass a folder of images",
            )

    # -- streaming --------------------------------------------------------------------------
    def batches(self, pre: Preprocessing | None, batch_size: int = 8, min_count: int = 1) -> Iterator[Batch]:
        """Yield preprocessed batches; unreadable images are skipped and recorded in ``skipped``."""
        if self.arrays is not None:
            for i in range(0, len(self.arrays), batch_size):
                n = min(batch_size, len(self.arrays) - i)
                yield Batch(self.arrays[i : i + n], self.labels[i : i + n], [f"{self.source}[{i + k}]" for k in range(n)])
            return
        if pre is None:
            raise VitedgeError("images need preprocessing, but the model has no manifest", "pass --img-size/--mean/--std or a preprocessing JSON")
        self.skipped = []
        xs, lbls, names = [], [], []
        good = 0
        for p, lbl in zip(self.paths, self.labels, strict=True):
            try:
                xs.append(pre(load_image(p)))
            except VitedgeError as exc:
                _skip(self.skipped, p, exc)
                continue
            lbls.append(lbl)
            names.append(str(p))
            good += 1
            if len(xs) == batch_size:
                yield Batch(np.stack(xs), lbls, names)
                xs, lbls, names = [], [], []
        if xs:
            yield Batch(np.stack(xs), lbls, names)
        if good < min_count:
            raise VitedgeError(
                f"only {good} usable images in {self.source} ({len(self.skipped)} unreadable), {min_count} needed",
                "add images or lower --calib-samples",
            )

    def load_all(self, pre: Preprocessing | None, min_count: int = 1) -> Batch:
        """All items at once (for small validation sets)."""
        parts = list(self.batches(pre, 64, min_count))
        if not parts:
            raise VitedgeError(f"no usable images in {self.source} ({len(self.skipped)} unreadable)")
        return Batch(np.concatenate([b.x for b in parts]), sum((b.labels for b in parts), []), sum((b.names for b in parts), []))


def _label_strings(values: np.ndarray) -> list[str | None]:
    """npz labels as strings; integer-valued numbers become "3", not "3.0"."""
    if values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)
    return [str(v) for v in values.reshape(-1)]


def label_indices(labels: Sequence[str | None], class_names: Sequence[str] | None, source: str) -> np.ndarray:
    """Map folder labels to model class indices (by label name, else by integer folder name)."""
    lookup = {name: i for i, name in enumerate(class_names)} if class_names else {}
    out = []
    for lbl in labels:
        if lbl is None:
            raise VitedgeError(f"{source} has unlabelled images", "put images in class_name/ sub-folders (or give labels in the .npz)")
        if lbl in lookup:
            out.append(lookup[lbl])
        elif lbl.isdigit() and (not class_names or int(lbl) < len(class_names)):
            out.append(int(lbl))
        else:
            raise VitedgeError(
                f"{source}: class folder {lbl!r} matches no model label",
                "name class folders after the model's labels or their indices (0, 1, ...)",
            )
    return np.asarray(out, dtype=np.int64)
