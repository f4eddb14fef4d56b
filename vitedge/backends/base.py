"""The one interface every backend implements.

An :class:`Engine` wraps one deployable artifact (ONNX file, OpenVINO IR/blob, TensorRT engine)
and its manifest.  Backends implement only ``_run`` (preprocessed float batch in, named outputs
out) and ``close``; everything user-facing - image preprocessing, top-k, batching checks, context
management - lives here once.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ShapeMismatch, VitedgeError
from ..manifest import Manifest
from ..preprocess import ImageLike, Preprocessing


@dataclass
class Prediction:
    labels: list[str]
    indices: list[int]
    probs: list[float]

    def to_dict(self) -> dict:
        return {"top": [{"label": l, "index": i, "prob": p} for l, i, p in zip(self.labels, self.indices, self.probs)]}


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class Engine(ABC):
    """A loaded, ready-to-run artifact.  Use as a context manager, or call :meth:`close`."""

    backend: str = "?"

    def __init__(self, artifact: Path, manifest: Manifest):
        self.artifact = Path(artifact)
        self.manifest = manifest
        self._closed = False
        self._lock = threading.Lock()  # backends that are not re-entrant serialise on it

    # -- what a backend implements -----------------------------------------------------------
    @abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a preprocessed float32 (N, C, H, W) batch; return every output by name."""

    def _release(self) -> None:
        """Free backend resources."""

    # -- shape information ------------------------------------------------------------------
    @property
    def input_name(self) -> str:
        return self.manifest.inputs[0].name

    @property
    def input_shape(self) -> list:
        return list(self.manifest.inputs[0].shape)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.manifest.outputs]

    @property
    def fixed_batch(self) -> int | None:
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    @property
    def preprocessing(self) -> Preprocessing:
        pre = self.manifest.preprocessing_obj
        if pre is None:
            raise VitedgeError(f"{self.artifact} has no preprocessing in its manifest",
                               "pass preprocessing= to vitedge.load (e.g. {'img_size': 224}), or use infer() with preprocessed arrays")
        return pre

    # -- public API -------------------------------------------------------------------------
    def infer_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for a preprocessed (N, C, H, W) float batch, any N the engine allows."""
        if self._closed:
            raise VitedgeError(f"engine for {self.artifact} is closed")
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4:
            raise ShapeMismatch(f"input of shape {batch.shape} is not (N, C, H, W)")
        want = self.input_shape
        for axis, (w, g) in enumerate(zip(want[1:], batch.shape[1:]), start=1):
            if isinstance(w, int) and w > 0 and w != g:
                raise ShapeMismatch(f"input shape {tuple(batch.shape)} does not match the engine's {tuple(want)} (axis {axis})",
                                   "preprocess to the engine's input size")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        fixed = self.fixed_batch
        if fixed is None or batch.shape[0] == fixed:
            return self._run(batch)
        # a fixed-batch engine: run in chunks of its batch, padding the last one
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, len(batch), fixed):
            chunk = batch[i : i + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            parts.append({k: v[:n] for k, v in self._run(chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (the first output) for a preprocessed float batch."""
        return self.infer_all(batch)[self.output_names[0]] if self.output_names else next(iter(self.infer_all(batch).values()))

    def predict(self, images: Sequence[ImageLike] | ImageLike, top_k: int = 5) -> list[Prediction]:
        """Top-k labels and probabilities for image files, PIL images or uint8 arrays."""
        if self.manifest.task != "classification":
            raise VitedgeError(f"{self.artifact} is not a classifier (task {self.manifest.task!r})", "use infer() for its raw outputs")
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        probs = softmax(self.infer(self.preprocessing.batch(images)).astype(np.float64))
        k = min(top_k, probs.shape[1])
        labels = self.manifest.labels or [str(i) for i in range(probs.shape[1])]
        out = []
        for row in probs:
            idx = np.argsort(-row)[:k]
            out.append(Prediction([labels[i] for i in idx], [int(i) for i in idx], [float(row[i]) for i in idx]))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.artifact.name} {self.manifest.precision} batch={self.fixed_batch or 'dynamic'}>"
