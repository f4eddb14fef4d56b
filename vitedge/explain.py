"""``vitedge explain``: where the deployed engine looks, next to where the FP32 model looks.

For each image, the engine's attention map (:meth:`~vitedge.backends.base.Engine.attention`, from the
engine's own attention probabilities) is drawn over the image the engine saw; with a reference (the FP32
ONNX file, a checkpoint, or any artifact), the reference's map is drawn beside it on the same colour
scale, and ``attention.json`` records per image the Pearson correlation of the two maps and the share of
the engine's top-10 % patches that are also the reference's (:func:`vitedge.attention.agreement`).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import attention
from ._io import atomic_dir, commit_files
from .backends.base import Engine
from .data import image_paths
from .errors import ShapeMismatch
from .runtime import load, opens_as_pytorch

BATCH = 16  # images per attention call


def open_reference(reference) -> Engine:
    """The reference as an engine: an artifact (FP32 ONNX, IR, ...), a checkpoint or model folder, or a name
    (``reference``, a preset) opened with PyTorch."""
    named = isinstance(reference, str) and not Path(reference).exists()
    return load(reference, backend="pytorch" if named or opens_as_pytorch(reference) else None)


def _label(e: Engine) -> str:
    return f"{e.manifest.precision} {e.backend}"


def explain(
    engine: str | Path | Engine,
    images: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    reference: str | Path | Engine | None = None,
    kind: str = "rollout",
    backend: str | None = None,
) -> dict:
    """Write ``<image>.png`` per image (the image, the engine's map over it, and the reference's when given) and
    ``attention.json`` into ``out_dir``; return what ``attention.json`` holds.

    ``engine`` / ``reference``: a path or name as :func:`vitedge.load` opens it, or an open engine.  ``kind``:
    ``rollout`` or ``cls`` (the last block's CLS attention, averaged over heads in the picture, per head in the
    correlation).  ``backend``: run the engine with another backend than its own.
    """
    attention.check_kind(kind)
    paths = image_paths(images)
    with contextlib.ExitStack() as stack:
        eng = engine if isinstance(engine, Engine) else stack.enter_context(load(engine, backend=backend))
        ref = None
        if reference is not None:
            ref = reference if isinstance(reference, Engine) else stack.enter_context(open_reference(reference))
        rows: list[dict] = []
        pictures: dict[str, bytes] = {}
        for i in range(0, len(paths), BATCH):
            chunk = paths[i : i + BATCH]
            ours = eng.attention(chunk, kind)
            theirs = ref.attention(chunk, kind) if ref is not None else None
            for j, path in enumerate(chunk):
                row, png = _one(i + j, path, eng, ours[j], ref, None if theirs is None else theirs[j])
                rows.append(row)
                pictures[row["png"]] = png
        result: dict = {
            "engine": str(eng.artifact),
            "engine_precision": eng.manifest.precision,
            "backend": eng.backend,
            "reference": None if ref is None else str(getattr(ref, "source", None) or ref.artifact),
            "kind": kind,
            "grid": list(attention.display_map(ours[0]).shape),
            "images": rows,
        }
        if ref is not None:
            result["summary"] = attention.summary(rows)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as scratch:
        for name, data in pictures.items():
            (scratch / name).write_bytes(data)
        (scratch / "attention.json").write_text(json.dumps(result, indent=1) + "\n")
        commit_files(scratch, {name: out_dir / name for name in [*pictures, "attention.json"]})
    return result


def _one(index: int, path: Path, eng: Engine, ours: np.ndarray, ref: Engine | None, theirs: np.ndarray | None) -> tuple[dict, bytes]:
    """One image's row of ``attention.json`` and its picture."""
    seen = eng.preprocessing.spatial(eng.preprocessing.to_pil(path))  # the image as the engine saw it
    shown = attention.display_map(ours)
    row: dict = {"image": str(path), "png": f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}.png"}
    panels = [(seen, "image")]
    if ref is None or theirs is None:
        panels.append((attention.overlay(seen, shown, float(shown.min()), float(shown.max())), f"engine ({_label(eng)})"))
    else:
        if theirs.shape != ours.shape:
            raise ShapeMismatch(
                f"{path.name}: the engine's map is {ours.shape} but the reference's {theirs.shape}",
                "give a reference with the same input size and patch size as the engine",
            )
        row.update(attention.agreement(ours, theirs))
        other = attention.display_map(theirs)
        lo, hi = float(min(shown.min(), other.min())), float(max(shown.max(), other.max()))  # one colour scale for both
        panels.append((attention.overlay(seen, shown, lo, hi), f"engine ({_label(eng)})"))
        panels.append((attention.overlay(seen, other, lo, hi), f"reference ({_label(ref)}), r={row['correlation']:.3f}"))
    return row, attention.png_bytes(attention.side_by_side(panels))
