"""timm-compatible Vision Transformers and their loading."""
from .config import NAMED_CONFIGS, ModelInfo, Preprocess, ViTConfig, named_config
from .hf import from_hf
from .loading import from_timm, load_model, save_model
from .vit import VisionTransformer

__all__ = ["NAMED_CONFIGS", "ModelInfo", "Preprocess", "ViTConfig", "VisionTransformer", "from_hf", "from_timm", "load_model", "named_config", "save_model"]
