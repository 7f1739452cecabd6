"""vitbudget: spend a Vision Transformer's compute where the tokens matter."""
from .errors import CheckpointError, ConfigError, DataError, InputError, OutputError, VitbudgetError
from .models import VisionTransformer, ViTConfig, from_hf, from_timm, load_model, save_model
from .runtime import ExecutionRecord, Hooks, TokenState, run

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ExecutionRecord", "Hooks", "InputError", "OutputError",
    "TokenState", "ViTConfig", "VisionTransformer", "VitbudgetError", "from_hf", "from_timm", "load_model", "run", "save_model",
]
