"""One line from a model you have to the same model with a method: `vb.apply(model, "tome", r=13)`.

The result is a drop-in `nn.Module` in eval mode whose forward returns what the original
returned: logits for a timm or vitbudget ViT; for a Hugging Face model its own kind of output
object (`ImageClassifierOutput` for classifiers, `BaseModelOutputWithPooling` for backbones, whose
`last_hidden_state` then holds the tokens that remain after the method, final norm applied).
What the method did stays reachable: `.record` (tokens executed per block, FLOPs),
`.output` (the whole `RunOutput`: `.output.patch_grid()` for a full token grid where the
runtime provides it) and `.token_map()`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .methods import build_method
from .methods.base import Method
from .models import VisionTransformer, from_hf, from_timm
from .models.hf import is_hf_model
from .runtime import ExecutionRecord, RunOutput


class Applied(nn.Module):
    """A model run by a method, called like the original (see the module docstring)."""

    def __init__(self, method: Method, hf_output: str | None = None):
        super().__init__()
        self.method = method
        self.hf_output = hf_output  # None: return logits; else the transformers output class to build
        self.output: RunOutput | None = None
        self.eval()

    @property
    def model(self) -> VisionTransformer:
        return self.method.model

    @property
    def record(self) -> ExecutionRecord | None:
        """The last forward's execution record (None before the first call)."""
        return None if self.output is None else self.output.record

    def token_map(self):
        """The last forward's per-patch picture of what the method chose (None when it draws none)."""
        return None if self.output is None else self.method.token_map(self.output)

    def forward(self, pixel_values: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        images = pixel_values if pixel_values is not None else kwargs.pop("x", None)
        if images is None:
            raise TypeError("call with the image batch (B, 3, H, W), positionally or as pixel_values=")
        self.output = self.method(images)
        if self.hf_output is None:
            return self.output.logits
        from transformers import modeling_outputs

        if self.hf_output == "ImageClassifierOutput":
            return modeling_outputs.ImageClassifierOutput(logits=self.output.logits)
        tokens = self.model.norm(self.output.state.x)
        return modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=self.output.logits)


def apply(model: nn.Module, method: str = "tome", **options: Any) -> Applied:
    """`model` (timm ViT, Hugging Face ViT/DeiT/DINOv2/CLIP vision, or ours) run by `method` with `options`.

    The weights are copied into vitbudget's runtime (an exact mapping, tested per family);
    the original model is left as it was.
    """
    hf_output = None
    if isinstance(model, Applied):
        model = model.model
    if is_hf_model(model):
        vit = from_hf(model)
        hf_output = "ImageClassifierOutput" if vit.cfg.num_classes else "BaseModelOutputWithPooling"
    elif isinstance(model, VisionTransformer):
        vit = model
    elif isinstance(model, nn.Module):
        vit = from_timm(model)
    else:
        raise TypeError(f"apply takes a timm, Hugging Face or vitbudget ViT, got {type(model).__name__}")
    device = next(model.parameters()).device
    with torch.no_grad():
        return Applied(build_method(method, vit.to(device), **options), hf_output).to(device)
