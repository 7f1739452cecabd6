"""Token-budget methods. Each plugs into the block runner through `Method` hooks.

Importing a method's module registers it by name (see `registry.register`).
"""
from .base import Baseline, Method
from .registry import METHODS, build_method, get_spec, make_options, register
from .checkpoint import load_method, save_method
from .abs import ABS, ABSOptions
from .tta import MultiCrop, Resolution, UniformDepth
from .avit import AViT, AViTOptions
from .evit import EViT, EViTOptions
from .tome import ToMe, ToMeOptions
from .mctf import MCTF, MCTFOptions
from .zerotprune import ZeroTPrune, ZeroTPruneOptions
from .pitome import PiToMe, PiToMeOptions
from .tofu import ToFu, ToFuOptions
from .thresh import Thresh, ThreshOptions
from .dynamicvit import DynamicViT, DynamicViTOptions
from .spot import SPOT, SPOTHeuristic, SPOTOptions
from .compose import Stack, compose

__all__ = [
    "ABS", "ABSOptions", "AViT", "AViTOptions", "Baseline", "DynamicViT", "DynamicViTOptions", "EViT", "EViTOptions", "METHODS",
    "Method", "MultiCrop", "Resolution", "SPOT", "SPOTHeuristic", "SPOTOptions", "ToMe", "ToMeOptions", "UniformDepth",
    "build_method", "get_spec", "load_method", "make_options", "register", "save_method",
]
__all__ += ["Stack", "compose"]
__all__ += ["MCTF", "MCTFOptions", "ZeroTPrune", "ZeroTPruneOptions", "PiToMe", "PiToMeOptions", "ToFu", "ToFuOptions", "Thresh", "ThreshOptions"]
