"""Token-budget methods. Each plugs into the block runner through `Method` hooks."""
from .base import Baseline, Method
from .registry import METHODS, build_method, get_spec, make_options, register
from .checkpoint import load_method, save_method
from .abs import ABS, ABSOptions  # these modules register their methods on import
from .tta import MultiCrop, Resolution, UniformDepth

__all__ = ["ABS", "ABSOptions", "Baseline", "METHODS", "Method", "build_method", "get_spec", "load_method", "make_options", "save_method", "MultiCrop", "register", "Resolution", "UniformDepth"]
from .evit import EViT, EViTOptions
from .tome import ToMe, ToMeOptions
from .dynamicvit import DynamicViT, DynamicViTOptions
from .spot import SPOT, SPOTHeuristic, SPOTOptions
from .avit import AViT, AViTOptions
