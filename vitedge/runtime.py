"""``vitedge.load``: open any artifact by its manifest, one interface for every backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .artifact import Artifact
from .backends import pytorch, registry
from .backends.base import Engine, Prediction
from .data import open_readable
from .errors import FileProblem
from .foreign import ensure_manifest
from .manifest import Manifest


def load(path: str | Path, backend: str | None = None, *, preprocessing=None, labels: list[str] | None = None, **options) -> Engine:
    """Open an engine: an artifact file, its ``.vitedge.json`` manifest or a bundle folder - or a PyTorch
    checkpoint / Hugging Face folder, which opens as the FP32 reference (backend ``pytorch``).

    ``backend`` overrides the choice made from the manifest / file type (e.g. run an ONNX file
    with OpenVINO).  ``options`` go to the backend (threads, device, config, ...).

    An ONNX file without a vitedge manifest (exported by transformers, timm, torch.onnx, ...) opens
    too: ``preprocessing`` (a :class:`~vitedge.preprocess.Preprocessing`, a dict such as
    ``{"img_size": 224, "mean": "0.5,0.5,0.5"}`` or a JSON file) and ``labels`` say what the file
    does not; otherwise ImageNet-style preprocessing at its input size is assumed (listed in
    ``engine.manifest.assumptions``), and a dynamic-size file can only run ``infer()`` on arrays.
    """
    if opens_as_pytorch(path, backend):
        source = path if Path(path).exists() else str(path)  # a name: "reference" or a preset
        return pytorch.open(source, preprocessing=preprocessing, labels=labels, **options)
    artifact, manifest = Manifest.find(path)
    if not artifact.exists():
        raise FileProblem(f"artifact {artifact} named by the manifest does not exist")
    if manifest is None or preprocessing is not None or labels is not None:
        _, manifest = ensure_manifest(
            artifact if manifest is None else path, preprocessing, labels, announce=False, require_preprocessing=False, hash_file=False
        )
    return Artifact(artifact, manifest).load(backend, **options)


def opens_as_pytorch(path, backend: str | None = None) -> bool:
    """Whether :func:`load` opens ``path`` as the PyTorch FP32 reference: ``backend="pytorch"`` (needed for a
    name such as ``reference`` or a preset), a checkpoint file, or a model folder (``config.json``, no vitedge
    manifest)."""
    if backend is not None:
        return backend == "pytorch"
    p = Path(path)
    if not p.exists():
        return False
    found = registry.for_file(p)
    return (found is not None and found.name == "pytorch") or (p.is_dir() and (p / "config.json").exists() and not any(p.glob("*.vitedge.json")))


def predict_files(
    engine: Engine, paths: Sequence[Path], *, top_k: int = 5, batch_size: int = 16, strict: bool = False, size: tuple[int, int] | None = None
) -> tuple[list[tuple[Path, Prediction]], list[tuple[str, str]]]:
    """Classify image files in batches: ``([(path, prediction)], [(unreadable path, why)])``.

    An unreadable file is skipped with a warning, as calibration and validate skip one
    (:meth:`vitedge.data.ImageSet.batches`), so one bad file in a folder costs its own result only; a
    :class:`~vitedge.errors.FileProblem` is raised when none could be read.  ``strict``: the first unreadable
    file raises its FileProblem and nothing is returned.  ``size``: as :meth:`Engine.predict` (a dynamic-size
    engine otherwise sees each image at its own aspect ratio)."""
    results: list[tuple[Path, Prediction]] = []
    skipped: list[tuple[str, str]] = []
    for i in range(0, len(paths), batch_size):
        chunk: list = [Path(p) for p in paths[i : i + batch_size]]
        names = chunk
        if not strict:
            names, chunk, bad = open_readable(chunk)
            skipped += bad
        if chunk:
            results += zip(names, engine.predict(chunk, top_k=top_k, size=size), strict=True)
    if not results:
        raise FileProblem(f"none of the {len(paths)} images could be read; the first: {skipped[0][1]}")
    return results, skipped
