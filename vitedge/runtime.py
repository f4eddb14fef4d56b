"""``vitedge.load``: open any artifact by its manifest, one interface for every backend."""

from __future__ import annotations

from pathlib import Path

from .backends.base import Engine
from .errors import VitedgeError
from .manifest import Manifest

_BY_SUFFIX = {".onnx": "onnxruntime", ".xml": "openvino", ".blob": "openvino", ".engine": "tensorrt", ".plan": "tensorrt"}


def _manifest_from_onnx(path: Path) -> Manifest:
    """A manifest for an ONNX file vitedge did not write (metadata if present, else shapes only)."""
    from .foreign import manifest_for_onnx

    return manifest_for_onnx(path)


def load(path: str | Path, backend: str | None = None, **options) -> Engine:
    """Open an engine: an artifact file, its ``.vitedge.json`` manifest or a bundle folder.

    ``backend`` overrides the choice made from the manifest / file type (e.g. run an ONNX file
    with OpenVINO).  ``options`` go to the backend (threads, device, config, ...).
    """
    artifact, manifest = Manifest.find(path)
    if not artifact.exists():
        raise VitedgeError(f"artifact {artifact} named by the manifest does not exist")
    if manifest is None:
        if artifact.suffix != ".onnx":
            raise VitedgeError(f"{artifact} has no vitedge manifest ({Manifest.sidecar_path(artifact).name})",
                               "only ONNX files can be opened without one")
        manifest = _manifest_from_onnx(artifact)
    backend = backend or manifest.backend or _BY_SUFFIX.get(artifact.suffix)
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeEngine as cls
    elif backend == "openvino":
        from .backends.openvino import OpenVINOEngine as cls
    elif backend == "tensorrt":
        from .backends.tensorrt import TensorRTEngine as cls
    else:
        raise VitedgeError(f"cannot tell which backend runs {artifact}", "pass backend='onnxruntime', 'openvino' or 'tensorrt'")
    return cls(artifact, manifest, **options)
