"""PyTorch backend: a checkpoint run eagerly in FP32, as an :class:`~vitedge.backends.base.Engine`.

This is the reference every deployed engine is measured against (``vitedge validate`` / ``benchmark``),
opened and run like any other engine.  A checkpoint has no vitedge manifest, so one is made in memory
from the loaded model (:func:`manifest_for`): task, labels, preprocessing, input and output shapes,
so ``predict``, ``infer`` and ``infer_all`` work as for an exported file.

Threads: PyTorch's intra-op thread count is process-wide.  ``threads=`` sets it when the engine is
opened (``torch.set_num_threads``); the engine records the count it runs with (``engine.threads``,
``engine.options``) and restores it before each run should something else have changed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import ShapeMismatch, VitedgeError
from ..manifest import Manifest, TensorSpec
from ..models.loading import ModelSpec, load_model
from ..models.vit import VisionTransformer
from .base import Engine
from .registry import Backend, register

NAME = "pytorch"
#: what a PyTorch engine runs: checkpoint files (Hugging Face folders and presets are opened by name, see :func:`open`)
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
INPUT_NAME = "pixel_values"  # the names vitedge's ONNX export gives the same model
OUTPUT_NAME = "logits"


def manifest_for(spec) -> Manifest:
    """An in-memory manifest describing a loaded :class:`~vitedge.models.loading.ModelSpec` (format ``pytorch``)."""
    h, w = spec.preprocessing.img_size
    channels = spec.config.in_channels if spec.config is not None else 3
    classes = spec.num_classes
    if spec.config is not None:
        task = "classification" if spec.config.num_classes > 0 else "features"
    else:  # a generic module: a classifier unless told otherwise (its outputs are only known once run)
        task = "classification"
    out_shape = ["batch", classes if classes else (spec.config.d_model if spec.config is not None else "?")]
    return Manifest(
        artifact=Path(str(spec.source)).name or str(spec.source),
        format="pytorch",
        precision="fp32",
        backend=NAME,
        task=task,
        model=spec.model_info(),
        preprocessing=spec.preprocessing.to_dict(),
        labels=spec.labels,
        inputs=[TensorSpec(INPUT_NAME, ["batch", channels, h, w])],
        outputs=[TensorSpec(OUTPUT_NAME, out_shape)],
        assumptions=list(spec.notes),
    )


class PyTorchEngine(Engine):
    """A PyTorch module in eval mode, run under ``torch.inference_mode`` in FP32.

    ``PyTorchEngine(artifact, manifest=None, threads=None, spec=None, img_size=None)``: the model is
    ``spec`` if given (a :class:`~vitedge.models.loading.ModelSpec`), else loaded from ``artifact`` (a
    checkpoint file, Hugging Face folder, preset name or ``"reference"``).  ``manifest`` defaults to
    :func:`manifest_for` the model.
    """

    backend = NAME

    def __init__(self, artifact, manifest: Manifest | None = None, *, threads: int | None = None, spec=None, img_size: int | None = None):
        import torch

        if spec is None:
            spec = load_model(str(artifact), img_size=img_size)
        super().__init__(Path(str(artifact)), manifest if manifest is not None else manifest_for(spec))
        self.spec = spec
        self.source = str(spec.source)  # as the loader names it ("preset:vit_tiny", a path, a module's class)
        self.model = spec.model.eval()
        if threads is not None:
            if int(threads) < 1:
                raise VitedgeError(f"threads={threads} must be >= 1")
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()

    @classmethod
    def from_spec(cls, spec, *, threads: int | None = None) -> PyTorchEngine:
        return cls(spec.source, spec=spec, threads=threads)

    @property
    def options(self) -> dict:
        return {"threads": self.threads}

    @property
    def preprocessing(self):
        """The loaded model's own :class:`~vitedge.preprocess.Preprocessing` (not a copy made from the manifest)."""
        return self.spec.preprocessing if self.spec is not None else super().preprocessing

    def size_bytes(self) -> int:
        """Bytes of the checkpoint on disk (a Hugging Face folder: its weight files), else of the parameters in memory."""
        src = Path(self.source) if self.source else None
        if src is not None and src.is_file():
            return src.stat().st_size
        if src is not None and src.is_dir():
            return sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".safetensors", ".bin"))
        return int(sum(p.numel() * p.element_size() for p in self.spec.model.parameters()))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # thread-safe: an eval-mode module under inference_mode keeps no state between calls
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch))
        return self._named(out)

    def _run_attention(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # vitedge's ViT returns every block's attention probabilities itself
        import torch

        if not isinstance(self.model, VisionTransformer):
            raise VitedgeError(
                f"{type(self.model).__name__} is not vitedge's VisionTransformer: its attention cannot be read",
                "export it to ONNX and open the file for attention maps",
            )
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            _, probs = self.model(torch.from_numpy(batch), return_attention=True)
        return {f"attention_{i}": p.float().numpy() for i, p in enumerate(probs)}

    def _named(self, out) -> dict[str, np.ndarray]:
        """A tensor is the first declared output; tuples get ``output_<i>`` after it; mappings keep their keys."""
        import torch

        def arr(t) -> np.ndarray:
            return t.float().numpy()

        if isinstance(out, torch.Tensor):
            return {self.output_names[0]: arr(out)}
        if isinstance(out, Mapping):
            return {str(k): arr(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
        if isinstance(out, (tuple, list)):
            tensors = [t for t in out if isinstance(t, torch.Tensor)]
            return {(self.output_names[0] if i == 0 else f"output_{i}"): arr(t) for i, t in enumerate(tensors)}
        raise VitedgeError(f"{type(self.model).__name__} returned {type(out).__name__}, not tensors")

    def _release(self) -> None:
        # Engine.close() calls this once no run is in flight
        self.model = None
        self.spec = None


def open(
    source,
    *,
    threads: int | None = None,
    img_size: int | None = None,
    preprocessing=None,
    labels: list[str] | None = None,
    input_size: tuple[int, int] | None = None,
) -> PyTorchEngine:
    """Open a PyTorch engine from a checkpoint file, Hugging Face folder, preset name, ``"reference"``, an
    ``nn.Module`` (with ``img_size``) or a :class:`~vitedge.models.loading.ModelSpec` (used as is).

    ``input_size`` (height, width): a vitedge ViT fed at that size, square or not (its position table is
    interpolated as a dynamic-size export does); the reference of ``vitedge validate --size``."""
    if isinstance(source, ModelSpec) and img_size is None and preprocessing is None and labels is None:
        spec = source
    else:
        spec = load_model(source, img_size=img_size, preprocessing=preprocessing, labels=labels)
    if input_size is not None and spec.config is not None:
        p = spec.config.patch_size
        if input_size[0] % p or input_size[1] % p:
            raise ShapeMismatch(
                f"input size {input_size[0]}x{input_size[1]} is not a multiple of the patch size {p}", "give a size whose sides are multiples of it"
            )
        spec = replace(spec, preprocessing=spec.preprocessing.at(*input_size))  # a copy: the caller's spec is not edited
    return PyTorchEngine.from_spec(spec, threads=threads)


BACKEND = register(
    Backend(
        name=NAME,
        summary="PyTorch eager FP32 (checkpoints, Hugging Face folders, presets): the reference every engine is measured against",
        engine=PyTorchEngine,
        runs=CHECKPOINT_SUFFIXES,
    )
)
