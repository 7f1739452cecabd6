"""vitbudget: spend a Vision Transformer's compute where the tokens matter."""
from .errors import CheckpointError, ConfigError, DataError, InputError, OutputError, VitbudgetError
from .models import VisionTransformer, ViTConfig, from_hf, from_timm, load_model, save_model
from .runtime import ExecutionRecord, Hooks, TokenState, run
from .methods import build_method, compose, load_method
from .apply import Applied, apply

__version__ = "0.1.0"

__all__ = [
    "Applied", "apply", "build_method", "compose", "load_method",
    "CheckpointError", "ConfigError", "DataError", "ExecutionRecord", "Hooks", "InputError", "OutputError",
    "TokenState", "ViTConfig", "VisionTransformer", "VitbudgetError", "from_hf", "from_timm", "load_model", "run", "save_model",
]
