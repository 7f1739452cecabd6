"""Token-budget methods. Each plugs into the block runner through `Method` hooks."""
from .base import Baseline, Method
from .registry import METHODS, build_method, get_spec, make_options, register

__all__ = ["Baseline", "METHODS", "Method", "build_method", "get_spec", "make_options", "register"]
