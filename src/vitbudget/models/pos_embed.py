"""Resample absolute position embeddings to another patch grid (timm's method: bicubic, antialiased)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_abs_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], num_prefix_tokens: int, antialias: bool = True) -> Tensor:
    """(1, prefix + H*W, D) -> (1, prefix + H'*W', D); prefix embeddings are kept as they are.

    antialias=True is timm's resampling; Hugging Face's ViT, DeiT, CLIP and DINOv2 interpolate
    without it (DINOv2 with registers with it), so their adapters pass what each model computes.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patch tokens is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
