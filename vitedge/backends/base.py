"""The one interface every backend implements.

An :class:`Engine` wraps one deployable artifact (ONNX file, OpenVINO IR/blob, TensorRT engine)
and its manifest.  Backends implement only ``_run`` (preprocessed float batch in, named outputs
out) and ``_release`` (free the runtime's objects); everything user-facing - image preprocessing,
top-k, batching checks, context management, and closing safely under concurrent callers - lives
here once.  A backend whose runtime objects cannot serve two calls at once (OpenVINO infer requests,
a TensorRT execution context) keeps them in a list and borrows one per call with :meth:`Engine._take`
/ :meth:`Engine._give`, which wait for a free one and wake up when the engine is closed.
"""

from __future__ import annotations

import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import attention as attention_maps
from ..errors import ModelNotSupported, ShapeMismatch, VitedgeError
from ..manifest import Manifest
from ..preprocess import ImageLike, Preprocessing


@dataclass
class Prediction:
    labels: list[str]
    indices: list[int]
    probs: list[float]

    def to_dict(self) -> dict:
        return {"top": [{"label": lbl, "index": i, "prob": p} for lbl, i, p in zip(self.labels, self.indices, self.probs, strict=True)]}


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` with its last image repeated up to ``size`` images: the last batch for a model that takes a fixed
    number (a fixed-batch engine, a TensorRT profile's minimum, a static calibration graph).  The caller
    drops the outputs of the repeated images."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def mac_summary(layers: list[dict], source: str) -> dict:
    """Which precision an engine's matrix layers run in, weighted by their multiply-accumulates.

    ``layers``: ``{"name", "type", "precision", "macs"}`` per layer (``"fused": True`` for a subgraph whose
    inside the runtime does not list).  Gives ``mac_share`` per precision, ``int8_mac_share``,
    ``layer_count`` per precision and the first 400 layers: the ``precision_breakdown`` of a report,
    the same for every backend (:meth:`Engine.precision_breakdown`)."""
    macs_by: dict[str, int] = {}
    count_by: dict[str, int] = {}
    for layer in layers:
        macs_by[layer["precision"]] = macs_by.get(layer["precision"], 0) + int(layer.get("macs") or 0)
        count_by[layer["precision"]] = count_by.get(layer["precision"], 0) + 1
    total = sum(macs_by.values())
    fused = [layer["name"] for layer in layers if layer.get("fused")]
    return {
        "source": source + (f"; {len(fused)} fused subgraphs report only their input precision" if fused else ""),
        "mac_share": {k: v / total for k, v in macs_by.items() if v} if total else {},
        "int8_mac_share": macs_by.get("int8", 0) / total if total else 0.0,
        "layer_count": count_by,
        "layers": layers[:400],
    }


ATTENTION_CHUNK = 8  # images per run of an engine's attention-exposing copy (Engine.attention)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class Engine(ABC):
    """A loaded, ready-to-run artifact.  Use as a context manager, or call :meth:`close`.

    Threads: one engine may be shared by any number of threads.  :meth:`infer`, :meth:`infer_all`
    and :meth:`predict` are safe to call concurrently, and every call gets its own results (the
    same as when the calls are made one after another).  How many run at the same time depends on
    the backend: ONNX Runtime and PyTorch run them all at once; OpenVINO runs as many as it has infer
    requests (``requests=``) and the others wait for a free one; TensorRT runs one at a time (one
    execution context; open one engine per thread to run in parallel).

    :meth:`close` may be called from any thread, and more than once.  It marks the engine closed:
    calls that start afterwards, calls still waiting for an infer request / execution context, and
    the remaining chunks of a chunked batch raise ``VitedgeError: engine for ... was closed ...``
    at once.  Runs already executing finish normally and return their results; close() waits for
    them (up to ``timeout`` seconds, default :attr:`close_timeout`) and then frees the runtime's
    resources.  Resources are never freed under a running call: if runs are still executing when the
    timeout expires, close() returns and the last of them frees the resources as it finishes.
    """

    backend: str = "?"
    close_timeout: float = 30.0  # seconds close() waits for runs in flight before leaving the release to them

    def __init__(self, artifact: Path, manifest: Manifest):
        self.artifact = Path(artifact)
        self.manifest = manifest
        self._closed = False
        self._lock = threading.Lock()  # for a backend's own state; runs and close() use _state below
        # _state guards _closed, _inflight, _released and the backend's pools (_take/_give);
        # _idle: no run in flight any more (close() waits on it); _free: an item came back to a pool
        self._state = threading.RLock()
        self._idle = threading.Condition(self._state)
        self._free = threading.Condition(self._state)
        self._inflight = 0
        self._released = False

    # -- what a backend implements -----------------------------------------------------------
    @abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a preprocessed float32 (N, C, H, W) batch; return every output by name."""

    def _release(self) -> None:  # noqa: B027 - an optional hook: a backend holding nothing to free keeps this default
        """Free backend resources.  Called once, when the engine is closed and no run is in flight."""

    def precision_breakdown(self) -> dict | None:
        """Which precision the engine's matrix layers really run in (:func:`mac_summary`), as its runtime
        reports them; None when the backend cannot tell (validation shows it beside the accuracy)."""
        return None

    def _run_attention(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a preprocessed batch; return the attention probabilities of every block, in block order, each
        ``(N, heads, queries, keys)`` (the last block may attend from the CLS token only).  A backend that can
        expose them builds the variant of its engine that does on the first call (:meth:`attention`)."""
        raise VitedgeError(
            f"the {self.backend} backend cannot show attention maps",
            "open the ONNX file or the OpenVINO IR the engine was built from with the onnxruntime or openvino backend",
        )

    # -- running and closing under concurrent callers ---------------------------------------
    def _closed_error(self, waiting: bool = False) -> VitedgeError:
        if waiting:
            return VitedgeError(
                f"engine for {self.artifact} was closed while this call was waiting to run", "close an engine only when no thread still needs it"
            )
        return VitedgeError(f"engine for {self.artifact} was closed", "open it again with vitedge.load")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    @contextmanager
    def _running(self) -> Iterator[None]:
        """Count one call in flight; the last one out after a timed-out close() frees the resources."""
        with self._state:
            if self._closed:
                raise self._closed_error()
            self._inflight += 1
        try:
            yield
        finally:
            with self._state:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()
                    if self._closed and not self._released:
                        try:
                            self._release_once()
                        except Exception as exc:  # this call's result is fine: do not replace it
                            warnings.warn(f"releasing {self.artifact.name} failed: {exc}", RuntimeWarning, stacklevel=3)

    def _release_once(self) -> None:
        # under _state, with the engine closed and nothing in flight
        if not self._released:
            self._released = True
            self._release()

    def _take(self, pool: list):
        """Borrow an item (infer request, execution context) from ``pool``, waiting while all are lent.

        Raises ``VitedgeError`` when the engine is closed, including while waiting."""
        with self._state:
            while True:
                if self._closed:
                    raise self._closed_error(waiting=True)
                if pool:
                    return pool.pop()
                self._free.wait()

    def _give(self, pool: list, item) -> None:
        """Return an item borrowed with :meth:`_take` and wake one waiting caller."""
        with self._state:
            pool.append(item)
            self._free.notify()

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
            raise VitedgeError(
                f"{self.artifact} has no preprocessing in its manifest",
                "pass preprocessing= to vitedge.load (e.g. {'img_size': 224}), or use infer() with preprocessed arrays",
            )
        return pre

    # -- public API -------------------------------------------------------------------------
    def infer_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for a preprocessed (N, C, H, W) float batch, any N the engine allows."""
        self._check_open()
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4:
            raise ShapeMismatch(f"input of shape {batch.shape} is not (N, C, H, W)")
        want = self.input_shape
        for axis, (w, g) in enumerate(zip(want[1:], batch.shape[1:], strict=False), start=1):
            if isinstance(w, int) and w > 0 and w != g:
                raise ShapeMismatch(
                    f"input shape {tuple(batch.shape)} does not match the engine's {tuple(want)} (axis {axis})", "preprocess to the engine's input size"
                )
        sizes = self.manifest.dynamic_size  # a dynamic-size engine: its bounds (a few microseconds to read)
        if sizes is not None:
            sizes.check(batch.shape[2], batch.shape[3])
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._running():
            return self._run_chunked(batch)

    def _run_chunked(self, batch: np.ndarray, run=None) -> dict[str, np.ndarray]:
        """``run`` (default :meth:`_run`) on ``batch``, in chunks of a fixed-batch engine's batch."""
        run = run or self._run
        fixed = self.fixed_batch
        if fixed is None or batch.shape[0] == fixed:
            return run(batch)
        # a fixed-batch engine: run in chunks of its batch, padding the last one
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, len(batch), fixed):
            if self._closed:  # closed between two chunks: the rest of this call will not run
                raise self._closed_error(waiting=True)
            chunk = batch[i : i + fixed]
            parts.append({k: v[: len(chunk)] for k, v in run(pad_batch(chunk, fixed)).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (the first output) for a preprocessed float batch."""
        return self.infer_all(batch)[self.output_names[0]] if self.output_names else next(iter(self.infer_all(batch).values()))

    def predict(self, images: Sequence[ImageLike] | ImageLike, top_k: int = 5, size: tuple[int, int] | None = None) -> list[Prediction]:
        """Top-k labels and probabilities for image files, PIL images or uint8 arrays.

        ``size`` (height, width): feed every image at that size (a dynamic-size engine takes any size in its
        bounds); by default a dynamic-size engine sees each image at its own aspect ratio (images of one
        input size run as one batch)."""
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        self._check_classifier()  # before reading the images
        pre = self.preprocessing if size is None else self.preprocessing.at(*size)
        groups = pre.batches(images)
        logits = [self.infer(x) for _, x in groups]
        order = np.argsort(np.concatenate([idx for idx, _ in groups]), kind="stable")
        return self._top_k(np.concatenate(logits)[order], top_k)

    def predict_batch(self, x: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Top-k labels and probabilities for a batch already preprocessed (``self.preprocessing``), e.g. one of
        :meth:`vitedge.data.ImageSet.batches`, which skips unreadable images."""
        self._check_classifier()
        return self._top_k(self.infer(x), top_k)

    def _top_k(self, logits: np.ndarray, top_k: int) -> list[Prediction]:
        probs = softmax(logits.astype(np.float64))
        k = min(top_k, probs.shape[1])
        labels = self.manifest.labels or [str(i) for i in range(probs.shape[1])]
        out = []
        for row in probs:
            idx = np.argsort(-row)[:k]
            out.append(Prediction([labels[i] for i in idx], [int(i) for i in idx], [float(row[i]) for i in idx]))
        return out

    def attention(self, images: Sequence[ImageLike] | ImageLike | np.ndarray, kind: str = "rollout") -> np.ndarray:
        """Where the engine looks: attention maps on each image's patch grid, from this engine's own attention
        probabilities (not a float copy of the model: an INT8 engine's maps are INT8's).

        ``images``: image files, PIL images or uint8 arrays (preprocessed as for :meth:`predict`), or an
        already preprocessed float ``(N, C, H, W)`` batch.  ``kind``: ``"rollout"`` (attention rollout, shape
        ``(N, H/patch, W/patch)``) or ``"cls"`` (the last block's attention from the CLS token, per head:
        ``(N, heads, H/patch, W/patch)``); see :mod:`vitedge.attention`.

        The first call builds a second engine from the same file with the attention probabilities exposed
        (ONNX: an in-memory copy with the Softmax outputs added as graph outputs; OpenVINO: the IR with outputs
        added), so the engine that serves :meth:`predict` keeps its fused attention.  Token-merged engines
        have no map (their blocks no longer hold one token per patch)."""
        self._check_open()
        attention_maps.check_kind(kind)
        merging = ((self.manifest.model or {}).get("graph") or {}).get("token_merging")
        if merging and merging.get("r"):
            raise ModelNotSupported(
                f"{self.artifact.name} merges tokens (r={merging['r']}): its blocks no longer hold one token per patch, so it has no attention map",
                "use an engine exported without --merge-tokens",
            )
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            batch = images[None] if images.ndim == 3 else images
        else:
            if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or (isinstance(images, np.ndarray) and images.ndim == 3):
                images = [images]
            batch = self.preprocessing.batch(images)
        if batch.ndim != 4:
            raise ShapeMismatch(f"input of shape {batch.shape} is not (N, C, H, W)")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        patch = ((self.manifest.model or {}).get("config") or {}).get("patch_size")
        out = []
        with self._running():
            # a few images at a time: the probabilities of every block are large (ViT-B: 22 MB per image), the maps small
            for i in range(0, len(batch), ATTENTION_CHUNK):
                probs = self._run_chunked(batch[i : i + ATTENTION_CHUNK], self._run_attention)
                out.append(attention_maps.maps(list(probs.values()), batch.shape[2], batch.shape[3], kind, patch))
        return np.concatenate(out)

    def _check_classifier(self) -> None:
        """The one-line error for an engine that is closed or not a classifier (top-k needs class logits)."""
        self._check_open()
        if self.manifest.task != "classification":
            raise VitedgeError(f"{self.artifact} is not a classifier (task {self.manifest.task!r})", "use infer() for its raw outputs")

    def close(self, timeout: float | None = None) -> None:
        """Close the engine; safe from any thread and more than once (see the class docstring).

        Wakes the calls waiting to run (they raise ``VitedgeError``), waits up to ``timeout`` seconds
        (default :attr:`close_timeout`) for the runs in flight, then frees the runtime's resources; if
        runs are still in flight then, the last of them frees the resources when it finishes."""
        timeout = self.close_timeout if timeout is None else timeout
        with self._state:
            self._closed = True
            self._free.notify_all()
            if self._idle.wait_for(lambda: self._inflight == 0, timeout):
                self._release_once()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.artifact.name} {self.manifest.precision} batch={self.fixed_batch or 'dynamic'}>"
