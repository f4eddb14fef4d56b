"""vitedge: export, quantize, compile and validate Vision Transformers for edge deployment."""

from __future__ import annotations

from ._version import __version__
from .backends.base import Engine, Prediction
from .benchmarking import benchmark
from .compilation import compile_model
from .errors import BackendUnavailable, FileProblem, GateFailed, InputError, ModelNotSupported, ShapeMismatch, SpeedupNotMeasurable, VitedgeError
from .export import export_onnx
from .manifest import Manifest
from .models.loading import ModelSpec, load_model, save_checkpoint
from .models.vit import PRESETS, VisionTransformer, ViTConfig, create_model
from .preprocess import Preprocessing
from .quantization import quantize
from .report import Report
from .runtime import load
from .validation import EngineSpec, validate

__all__ = [
    "BackendUnavailable",
    "FileProblem",
    "GateFailed",
    "InputError",
    "ModelNotSupported",
    "ShapeMismatch",
    "SpeedupNotMeasurable",
    "Manifest",
    "ModelSpec",
    "PRESETS",
    "Preprocessing",
    "ViTConfig",
    "VisionTransformer",
    "VitedgeError",
    "Engine",
    "EngineSpec",
    "Prediction",
    "Report",
    "benchmark",
    "validate",
    "compile_model",
    "quantize",
    "create_model",
    "export_onnx",
    "load",
    "load_model",
    "save_checkpoint",
    "__version__",
]
