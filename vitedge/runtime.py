"""``vitedge.load``: open any artifact by its manifest, one interface for every backend."""

from __future__ import annotations

from pathlib import Path

from .artifact import Artifact
from .backends.base import Engine
from .errors import FileProblem
from .manifest import Manifest


def load(path: str | Path, backend: str | None = None, *, preprocessing=None, labels: list[str] | None = None, **options) -> Engine:
    """Open an engine: an artifact file, its ``.vitedge.json`` manifest or a bundle folder.

    ``backend`` overrides the choice made from the manifest / file type (e.g. run an ONNX file
    with OpenVINO).  ``options`` go to the backend (threads, device, config, ...).

    An ONNX file without a vitedge manifest (exported by transformers, timm, torch.onnx, ...) opens
    too: ``preprocessing`` (a :class:`~vitedge.preprocess.Preprocessing`, a dict such as
    ``{"img_size": 224, "mean": "0.5,0.5,0.5"}`` or a JSON file) and ``labels`` say what the file
    does not; otherwise ImageNet-style preprocessing at its input size is assumed (listed in
    ``engine.manifest.assumptions``), and a dynamic-size file can only run ``infer()`` on arrays.
    """
    from .foreign import ensure_manifest

    artifact, manifest = Manifest.find(path)
    if not artifact.exists():
        raise FileProblem(f"artifact {artifact} named by the manifest does not exist")
    if manifest is None or preprocessing is not None or labels is not None:
        _, manifest = ensure_manifest(artifact if manifest is None else path, preprocessing, labels, announce=False,
                                      require_preprocessing=False, hash_file=False)
    return Artifact(artifact, manifest).load(backend, **options)
