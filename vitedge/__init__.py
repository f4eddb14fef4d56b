"""vitedge: export, quantize, compile and validate Vision Transformers for edge deployment."""

from __future__ import annotations

from .errors import BackendUnavailable, GateFailed, VitedgeError
from .export import export_onnx
from .manifest import Manifest
from .models.loading import ModelSpec, load_model, save_checkpoint
from .models.vit import PRESETS, ViTConfig, VisionTransformer, create_model
from .preprocess import Preprocessing
from .runtime import load

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "GateFailed", "Manifest", "ModelSpec", "PRESETS", "Preprocessing", "ViTConfig",
    "VisionTransformer", "VitedgeError", "create_model", "export_onnx", "load", "load_model", "save_checkpoint",
]
