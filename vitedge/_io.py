"""File helpers: hashing, all-or-nothing writes (temporary file, then rename), saving ONNX models."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: ONNX models above this size keep their weights in a ``.data`` file beside the ``.onnx``:
#: protobuf cannot serialize a message over 2 GiB, and this leaves room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000
#: ``vitedge export`` decides before torch.onnx serializes anything, from the parameter bytes alone, so it
#: keeps a wider margin: models with over 1 GB of weights (ViT-L 1.2 GB, ViT-H 2.5 GB) are exported with
#: external data, which leaves headroom for later steps that add tensors or hold copies.
EXPORT_EXTERNAL_WEIGHT_BYTES = 1_000_000_000


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory beside the final outputs; files are moved out by :func:`commit_files`.

    Whatever is left in it (on error: everything) is deleted, so a failed step leaves no
    half-written artifact behind.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vitedge-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_files(scratch: Path, moves: dict[str, Path]) -> None:
    """Move ``scratch/name`` to each destination (renames on one filesystem: all-or-nothing per file)."""
    for name, dest in moves.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / name, dest)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def needs_external_data(model: Any) -> bool:
    """Whether an ONNX model (a ``ModelProto`` or a path) is, or must be, stored with external data."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return p.stat().st_size > EXTERNAL_DATA_BYTES or any(q.suffix == ".data" for q in p.parent.glob(glob.escape(p.name) + "*"))
    return model.ByteSize() > EXTERNAL_DATA_BYTES


def save_onnx(proto: Any, path: str | os.PathLike, data_name: str | None = None) -> None:
    """``onnx.save``, with the weights in ``data_name`` (default ``<file>.data``) when the model is too big for one file."""
    import onnx

    path = Path(path)
    big = needs_external_data(proto)
    onnx.save(proto, str(path), save_as_external_data=big, location=(data_name or path.name + ".data") if big else None)


def json_safe(obj):
    """``obj`` with its non-finite floats as None (JSON has no inf/nan), through dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
