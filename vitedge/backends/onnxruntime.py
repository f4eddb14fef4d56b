"""ONNX Runtime backend: the embedded default that runs everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import VitedgeError
from ..manifest import Manifest
from .base import Engine


def session_options(threads: int | None = None, optimized_model_path: str | None = None, opt_level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[opt_level]
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


def available_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = (["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []) + ["CPUExecutionProvider"]
    return [p for p in order if p in have]


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, artifact: Path, manifest: Manifest, threads: int | None = None, providers: list[str] | None = None):
        super().__init__(artifact, manifest)
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(artifact), session_options(threads), providers=providers or available_providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise VitedgeError(f"ONNX Runtime cannot load {artifact}: {str(exc).splitlines()[0][:240]}") from None
        self._names = [o.name for o in self.session.get_outputs()]
        self._input = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe: concurrent callers need no lock
        return dict(zip(self._names, self.session.run(None, {self._input: batch})))

    def _release(self) -> None:
        del self.session
