from .loading import ModelSpec, load_model, save_checkpoint
from .vit import PRESETS, VisionTransformer, ViTConfig, create_model, preset_config

__all__ = ["ModelSpec", "load_model", "save_checkpoint", "PRESETS", "ViTConfig", "VisionTransformer", "create_model", "preset_config"]
