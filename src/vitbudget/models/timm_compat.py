"""timm's own VisionTransformer, for comparisons against it (equivalence tests, `vitbudget speed`).

timm imports torchvision at import time, although its ViT never calls it; where torchvision is
missing or cannot load (e.g. a CUDA build beside a CPU torch), `import_timm` installs an empty
stand-in for torchvision first. Nothing in vitbudget's own forward depends on timm.
"""
from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from functools import partial

import torch
from torch import nn

from .config import ViTConfig


class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return enum.Enum("InterpolationMode", {m: m.lower() for m in ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})
        return type(name, (), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def import_timm():
    """The timm package (ImportError if it is not installed), with a torchvision stand-in where needed."""
    if not timm_available():
        raise ImportError("timm is not installed (pip install --no-deps timm==1.0.31 pyyaml huggingface_hub)")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA build that cannot load here
        _drop_torchvision_modules()
        finder = _PlaceholderFinder()
        sys.meta_path.insert(0, finder)
        try:
            import timm
        finally:
            # timm keeps the stand-ins it imported; nobody else sees a torchvision (transformers
            # would take it for the real one and fail on its missing version)
            sys.meta_path.remove(finder)
            _drop_torchvision_modules()
    import timm

    return timm


def _drop_torchvision_modules() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def timm_vit(cfg: ViTConfig) -> nn.Module:
    """timm's own class for `cfg` (random init, eval mode), built from its VisionTransformer keyword arguments."""
    import_timm()
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kwargs = cfg.to_dict()
    kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=kwargs.pop("norm_eps"))
    if kwargs.pop("patch_bias") is not None:  # timm derives it: no patch bias iff pre_norm
        raise ValueError("timm has no patch_bias argument; build this config with patch_bias=None")
    distilled = kwargs.pop("dist_token")
    return (VisionTransformerDistilled if distilled else VisionTransformer)(**kwargs).eval()
